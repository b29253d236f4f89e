"""The shared contract: `UnitLayout` (shapes, names, parsing, selection) and `Contributions`."""

from __future__ import annotations

import pytest
import torch

from residual_lightning.contributions import (
    Contributions,
    UnitLayout,
    head_name,
    mlp_name,
    parse_unit,
)
from residual_lightning.units import decompose, decompose_compact, layout_from_config, unit_layout


def test_names_parse_and_index_round_trip():
    layout = UnitLayout(layers=3, heads=2, head_width=4, output_dim=5)
    assert layout.names[:4] == ["emb", "l0.mlp", "l1.mlp", "l2.mlp"]
    assert layout.names[4:6] == ["l0.h0", "l0.h1"] and layout.num_units == 1 + 3 + 6
    for position, name in enumerate(layout.names):
        assert layout.index(name) == position
        ref = layout.parse(name)
        rebuilt = {"emb": "emb", "mlp": None, "head": None}[ref.kind]
        if ref.kind == "mlp":
            rebuilt = mlp_name(ref.layer)
        elif ref.kind == "head":
            rebuilt = head_name(ref.layer, ref.head)
        assert rebuilt == name


@pytest.mark.parametrize(
    "name, message",
    [("l3.h0", "layer 3 is outside 0..2"), ("l0.h2", "head 2 is outside 0..1"), ("l0.attn", "is not")],
)
def test_parse_names_the_problem(name, message):
    with pytest.raises(ValueError, match=message):
        UnitLayout(layers=3, heads=2, head_width=4, output_dim=5).parse(name)


def test_select_kinds_and_names_in_order_without_repeats():
    layout = UnitLayout(layers=2, heads=2, head_width=4, output_dim=5)
    assert layout.select("mlps") == ["l0.mlp", "l1.mlp"]
    assert layout.select(["l1.h1", "emb", "l1.h1"]) == ["l1.h1", "emb"]
    assert layout.select("all") == layout.names
    with pytest.raises(ValueError, match="unit name 'heads2'"):
        layout.select(["heads2"])


def test_k_depends_on_the_convention_once():
    layout = UnitLayout.from_shape((4, 4, 67, 128), "equal_share")
    assert (layout.head_width, layout.k, layout.shape) == (64, 67, (4, 4, 67, 128))
    assert layout.with_convention("default").shape == (4, 4, 64, 128)
    with pytest.raises(ValueError, match="too small"):
        UnitLayout.from_shape((1, 1, 2, 3), "equal_share")


def test_config_layout_matches_the_built_model(tiny_clip):
    from_config = layout_from_config("RL-Tiny-ViT-64")
    built = unit_layout(tiny_clip)
    assert from_config.shape == built.shape and from_config.names == built.names


@pytest.mark.parametrize("convention", ["default", "equal_share"])
def test_one_type_recomposes_the_embedding_exactly(tiny_clip, convention):
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        compact = decompose_compact(tiny_clip, images, convention)
        full = decompose(tiny_clip, images, convention).contributions
        reference = tiny_clip.encode_image(images)
    assert isinstance(compact, Contributions) and len(compact) == 3
    torch.testing.assert_close(compact.embedding(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compact.expand(), full, rtol=1e-5, atol=1e-5)
    # A batch read from a cache carries no head maps: the model's are passed in.
    bare = Contributions(compact.heads, compact.mlps, compact.emb, label=torch.arange(3))
    torch.testing.assert_close(bare.embedding(compact.head_maps), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="carry no head_maps"):
        bare.embedding()
    part = bare[1:]
    assert len(part) == 2 and part.label.tolist() == [1, 2]
    assert (
        bare.to(torch.float64).heads.dtype == torch.float64
        and bare.to(torch.float64).label.dtype == torch.long
    )


def test_old_spellings_warn_and_still_work():
    from residual_lightning.data.batch import CachedBatch, embedding
    from residual_lightning.units import CompactContributions

    heads, mlps, emb = torch.ones(2, 1, 1, 3), torch.ones(2, 1, 4), torch.ones(2, 4)
    with pytest.warns(DeprecationWarning, match="use residual_lightning.contributions.Contributions"):
        batch = CachedBatch(heads, mlps, emb, torch.zeros(2, dtype=torch.long))
    with pytest.warns(DeprecationWarning, match="Contributions.embedding"):
        z = embedding(batch, torch.ones(1, 1, 4, 3))
    assert torch.equal(z, torch.full((2, 4), 5.0))
    with pytest.warns(DeprecationWarning, match="CompactContributions is deprecated"):
        old = CompactContributions(heads, mlps, emb, torch.ones(1, 1, 4, 3), ["emb", "l0.mlp", "l0.h0"])
    assert torch.equal(old.embedding(), z) and old.names[2] == "l0.h0"
    assert parse_unit("l0.h0").kind == "head"

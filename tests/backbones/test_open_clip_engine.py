"""The canonical ViT, its open_clip reader and the exact decomposition engine (residual_lightning.backbones)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import build_clip

from residual_lightning.backbones import decompose, decompose_compact, is_supported, read_open_clip
from residual_lightning.units import UnsupportedModelError
from tests.backbones.engine_helpers import rel_err

MHA = {
    "tok": {},
    "tok_final_ln_after_pool": dict(final_ln_after_pool=True),
    "avg_ln_per_token": dict(pool_type="avg"),
    "avg_final_ln_after_pool": dict(pool_type="avg", final_ln_after_pool=True),
    "layerscale": dict(ls_init_value=0.1),
    "no_ln_pre": dict(no_ln_pre=True),
    "many_heads": dict(width=64, head_width=8, layers=2),
}
CUSTOM = {
    "custom_plain": dict(block_type="custom"),
    "qk_norm": dict(qk_norm=True),
    "scale_heads": dict(scale_heads=True),
    "scale_attn_inner": dict(scale_attn_inner=True),
    "scale_attn": dict(scale_attn=True),
    "scale_fc": dict(scale_fc=True),
    "all_custom_options": dict(
        qk_norm=True,
        scale_heads=True,
        scale_attn_inner=True,
        scale_attn=True,
        scale_fc=True,
        ls_init_value=0.1,
    ),
    "all_custom_avg_ln_per_token": dict(
        pool_type="avg", qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True
    ),
    "all_custom_avg_final_ln_after_pool": dict(
        pool_type="avg", final_ln_after_pool=True, scale_heads=True, scale_attn_inner=True, scale_attn=True
    ),
}
CONFIGS = {**MHA, **CUSTOM}


def fresh_model(name: str) -> torch.nn.Module:
    """A tiny randomised CLIP of config `name`, head_scale randomised too."""
    model = build_clip(**CONFIGS[name])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # randomise_ leaves head_scale (H, 1, 1) at one
        for block in model.visual.transformer.resblocks:
            head_scale = getattr(getattr(block, "attn", None), "head_scale", None)
            if head_scale is not None:
                head_scale.copy_(0.5 + torch.rand(head_scale.shape, generator=g))
    return model


@functools.cache
def model_for(name: str) -> torch.nn.Module:
    """`fresh_model`, built once per config (tests that alter a model take a fresh one)."""
    return fresh_model(name)


def images_for(model, n=4, seed=1):
    size = model.visual.image_size[0]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_reference_forward_matches_encode_image(cfg):
    model = model_for(cfg)
    x = images_for(model)
    with torch.no_grad():
        assert rel_err(read_open_clip(model).forward(x), model.encode_image(x)) <= 1e-5


def test_custom_configs_build_custom_blocks():
    from open_clip.transformer import Attention, CustomResidualAttentionBlock

    for cfg in CUSTOM:
        block = model_for(cfg).visual.transformer.resblocks[0]
        assert isinstance(block, CustomResidualAttentionBlock) and isinstance(block.attn, Attention), cfg


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_contributions_sum_to_encode_image(cfg):
    model = model_for(cfg)
    x = images_for(model)
    canonical = read_open_clip(model)
    with torch.no_grad():
        ref = model.encode_image(x)
        for convention in ("default", "equal_share"):
            compact = decompose_compact(canonical, x, convention)
            layout = canonical.layout(convention)
            full = compact.expand()
            assert compact.names == layout.names
            assert compact.heads.shape[1:] == layout.shape[:3]
            assert full.shape == (4, layout.num_units, ref.shape[1])
            assert rel_err(full.sum(1), ref) <= 1e-5, convention
            assert rel_err(compact.embedding(), ref) <= 1e-5, convention


def test_decompose_is_the_expanded_compact_form():
    model = model_for("all_custom_options")
    x = images_for(model)
    canonical = read_open_clip(model)
    with torch.no_grad():
        out = decompose(canonical, x, "equal_share")
        compact = decompose_compact(canonical, x, "equal_share")
    assert out.names == compact.names
    torch.testing.assert_close(out.contributions, compact.expand())
    torch.testing.assert_close(out.unit("l1.h2"), compact.head_contributions()[:, 1, 2])


def test_scaled_cosine_attention_is_refused_by_name():
    model = build_clip(block_type="custom", scaled_cosine_attn=True)
    with pytest.raises(UnsupportedModelError, match="logit_scale"):
        read_open_clip(model)
    assert not is_supported(model)
    assert is_supported(model_for("all_custom_options"))


def test_other_unsupported_towers_are_refused_by_name():
    pooled = build_clip(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    with pytest.raises(UnsupportedModelError, match="attn_pool"):
        read_open_clip(pooled)
    model = fresh_model("custom_plain")
    model.visual.transformer.resblocks[1].attn.extra = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match="extra"):
        read_open_clip(model)
    model = fresh_model("tok")
    model.visual.proj = None
    with pytest.raises(UnsupportedModelError, match="proj"):
        read_open_clip(model)


def test_unknown_convention_is_refused():
    model = model_for("tok")
    with pytest.raises(ValueError, match="convention"):
        decompose_compact(read_open_clip(model), images_for(model), "halves")  # type: ignore[arg-type]

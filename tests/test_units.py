"""Exactness and API of the residual-unit decomposition (residual_lightning.units)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from conftest import build_clip, randomise_

from residual_lightning.units import (
    UnsupportedModelError,
    decompose,
    decompose_compact,
    expand,
    load_backbone,
    unit_layout,
    unit_names,
)

CONFIGS = {
    "tok": {},
    "tok_final_ln_after_pool": dict(final_ln_after_pool=True),
    "avg_ln_per_token": dict(pool_type="avg"),
    "avg_final_ln_after_pool": dict(pool_type="avg", final_ln_after_pool=True),
    "layerscale": dict(ls_init_value=0.1),
    "no_ln_pre": dict(no_ln_pre=True),
    "odd_shapes": dict(image_size=40, patch_size=10, width=96, head_width=32, layers=2),
    "many_heads": dict(width=64, head_width=8, layers=2),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def images_for(model, n=5, seed=1):
    size = model.visual.image_size[0]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("convention", ["default", "equal_share"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_sum_equals_encode_image(cfg, convention):
    model = build_clip(**CONFIGS[cfg])
    x = images_for(model)
    with torch.no_grad():
        ref = model.encode_image(x)
        out = decompose(model, x, convention=convention)
    assert out.contributions.shape == (5, len(unit_names(model)), ref.shape[1])
    assert rel_err(out.contributions.sum(1), ref) <= 1e-5


def test_quickgelu_and_shipped_tiny_config(tiny_clip):
    quick = build_clip(seed=3)
    quick_q = open_clip.CLIP(
        embed_dim=48,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1),
        quick_gelu=True,
    )
    randomise_(quick_q).eval()
    for model in (quick, quick_q, tiny_clip):
        x = images_for(model, n=3)
        with torch.no_grad():
            assert rel_err(decompose(model, x).contributions.sum(1), model.encode_image(x)) <= 1e-5


def test_unit_names_order():
    model = build_clip(layers=2, width=64, head_width=32)
    names = unit_names(model)
    assert names == ["emb", "l0.mlp", "l1.mlp", "l0.h0", "l0.h1", "l1.h0", "l1.h1"]
    assert unit_names(model.visual) == names


def test_real_architecture_counts():
    layout = unit_layout(open_clip.create_model("ViT-B-16", pretrained=None).visual)
    assert layout.num_units == 157 and (layout.head_width, layout.output_dim) == (64, 512)


def test_default_convention_heads_have_rank_d():
    model = build_clip(width=64, head_width=16, layers=2)
    x = images_for(model, n=40)
    with torch.no_grad():
        out = decompose(model, x)
    head = out.unit("l1.h2")  # (N, D)
    s = torch.linalg.svdvals(head.double())
    assert (s > s[0] * 1e-5).sum().item() <= 16
    # Under equal_share the mean and beta shares add directions: rank up to d + 2.
    with torch.no_grad():
        eq = decompose(model, x, convention="equal_share").unit("l1.h2")
    s_eq = torch.linalg.svdvals((eq - eq.mean(0)).double())
    assert (s_eq > s_eq[0] * 1e-5).sum().item() > 16


@pytest.mark.parametrize("convention", ["default", "equal_share"])
def test_compact_expands_to_the_same_contributions(convention):
    model = build_clip(ls_init_value=0.3)
    x = images_for(model)
    with torch.no_grad():
        compact = decompose_compact(model, x, convention=convention)
        full = decompose(model, x, convention=convention).contributions
    k = 16 if convention == "default" else 19
    assert compact.heads.shape == (5, 3, 4, k)
    assert compact.head_maps.shape == (3, 4, 48, k)
    assert compact.mlps.shape == (5, 3, 48) and compact.emb.shape == (5, 48)
    torch.testing.assert_close(expand(compact), full)


def test_conventions_differ_but_sum_to_the_same():
    model = build_clip()
    x = images_for(model)
    with torch.no_grad():
        a = decompose(model, x).contributions
        b = decompose(model, x, convention="equal_share").contributions
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a.sum(1), b.sum(1), rtol=1e-5, atol=1e-5)


def test_inference_mode_and_bf16_autocast():
    model = build_clip()
    x = images_for(model, n=8)
    with torch.inference_mode():
        ref = model.encode_image(x)
        assert rel_err(decompose(model, x).contributions.sum(1), ref) <= 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf = model.encode_image(x).float()
            out = decompose(model, x).contributions
    assert out.dtype == torch.float32
    assert rel_err(out.sum(1), ref_bf) <= 2e-2
    assert rel_err(out.sum(1), ref) <= 2e-2


def test_model_is_not_modified():
    model = build_clip()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        decompose(model, images_for(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_attentional_pooler_is_refused():
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(
            image_size=32, patch_size=8, width=64, layers=2, head_width=16, attentional_pool=True
        ),
        text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1),
    )
    with pytest.raises(UnsupportedModelError, match="attentional pooler"):
        unit_names(model)


@pytest.mark.parametrize("convention", ["default", "equal_share"])
def test_custom_attention_blocks_decompose_exactly(convention):
    from open_clip.transformer import Attention, CustomResidualAttentionBlock

    model = build_clip(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True)
    block = model.visual.transformer.resblocks[0]
    assert isinstance(block, CustomResidualAttentionBlock) and isinstance(block.attn, Attention)
    x = images_for(model)
    with torch.no_grad():
        ref = model.encode_image(x)
        out = decompose(model, x, convention=convention)
    assert out.names == unit_names(model)
    assert rel_err(out.contributions.sum(1), ref) <= 1e-5


def test_non_vit_tower_is_refused():
    model = open_clip.create_model("RN50", pretrained=None)
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        unit_names(model)


def test_unknown_convention():
    model = build_clip()
    with pytest.raises(ValueError, match="equal_share"):
        decompose(model, images_for(model), convention="halves")


def test_load_backbone_errors():
    with pytest.raises(ValueError, match="Did you mean.*ViT-B-16"):
        load_backbone("ViT-B-61")
    with pytest.raises(ValueError, match="unknown pretrained tag 'laion5b'.*laion2b_s34b_b88k"):
        load_backbone("ViT-B-16", pretrained="laion5b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone("ViT-B-16", pretrained="/nonexistent/model.safetensors")


def test_load_backbone_offline_message():
    with pytest.raises(RuntimeError, match="offline.*local path"):
        load_backbone("ViT-B-32", pretrained="laion2b_s34b_b79k")


def test_load_backbone_tiny_and_local_checkpoint(tmp_path):
    bb = load_backbone("RL-Tiny-ViT-64")
    assert bb.weights_id == "random-seed0" and unit_layout(bb.model).layers == 4
    path = tmp_path / "tiny.pt"
    torch.save(bb.model.state_dict(), path)
    bb2 = load_backbone("RL-Tiny-ViT-64", pretrained=str(path))
    assert bb2.weights_id.startswith("file-")
    for a, b in zip(bb.model.state_dict().values(), bb2.model.state_dict().values()):
        assert torch.equal(a, b)
    tokens = bb.tokenizer(["a photo of a cat"])
    assert tokens.shape[0] == 1
    img = bb.transform(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (100, 80)))
    assert img.shape == (3, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16"])
@pytest.mark.parametrize("convention", ["default", "equal_share"])
def test_real_architectures_exact(name, convention):
    torch.manual_seed(0)
    model = randomise_(open_clip.create_model(name, pretrained=None)).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(decompose(model, x, convention).contributions.sum(1), model.encode_image(x)) <= 1e-5

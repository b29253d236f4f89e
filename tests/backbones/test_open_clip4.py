"""The open_clip reader on open_clip 4.x's attention (`openclip4_standin`): fused and separate
q/k/v in-projections, working scaled cosine attention, and the custom options, decomposed exactly."""

from __future__ import annotations

import functools

import pytest
import torch

from residual_lightning.backbones import decompose_compact, is_supported, read_open_clip
from residual_lightning.units import UnsupportedModelError
from tests.backbones.engine_helpers import rel_err
from tests.backbones.openclip4_standin import StandinAttention, build_standin_vit

CONFIGS = {
    "default_fused": dict(),
    "default_separate_qkv": dict(separate_qkv=True),
    "default_layerscale_avg": dict(separate_qkv=True, ls_init_value=0.1, pool_type="avg"),
    "custom_fused": dict(block_type="custom"),
    "custom_separate_qkv": dict(block_type="custom", separate_qkv=True),
    "scaled_cosine": dict(scaled_cosine=True),
    "scaled_cosine_separate_qkv": dict(scaled_cosine=True, separate_qkv=True),
    "scaled_cosine_all_options": dict(
        scaled_cosine=True,
        scale_heads=True,
        scale_attn_inner=True,
        scale_attn=True,
        scale_fc=True,
        ls_init_value=0.1,
    ),
    "scaled_cosine_separate_avg_final_ln_after_pool": dict(
        scaled_cosine=True,
        separate_qkv=True,
        scale_heads=True,
        scale_attn=True,
        pool_type="avg",
        final_ln_after_pool=True,
    ),
    "qk_norm_head_scale": dict(qk_norm=True, scale_heads=True),
    "qk_norm_all_options_separate": dict(
        qk_norm=True,
        separate_qkv=True,
        scale_heads=True,
        scale_attn_inner=True,
        scale_attn=True,
        ls_init_value=0.1,
    ),
    "ln_inner_ln_attn_avg": dict(scale_attn_inner=True, scale_attn=True, pool_type="avg"),
}


@functools.cache
def model_for(name: str) -> torch.nn.Module:
    return build_standin_vit(**CONFIGS[name])


def images_for(model, n=4, seed=1):
    size = model.image_size[0]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_standin_has_the_4x_layouts():
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    fused = model_for("default_fused").transformer.resblocks[0]
    assert type(fused) is ResidualAttentionBlock and isinstance(fused.attn, StandinAttention)
    assert fused.attn.in_proj_weight is not None and fused.attn.q_proj_weight is None
    separate = model_for("custom_separate_qkv").transformer.resblocks[0]
    assert type(separate) is CustomResidualAttentionBlock
    assert separate.attn.in_proj_weight is None and separate.attn.q_proj_weight.shape == (64, 64)
    names = {n for n, _ in separate.attn.named_parameters(recurse=False)}
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"} <= names
    cosine = model_for("scaled_cosine").transformer.resblocks[0].attn
    assert cosine.logit_scale.shape == (4, 1, 1) and (cosine.logit_scale > cosine.logit_scale_max).any()


def test_separate_and_fused_layouts_agree():
    """The same weights in either layout give the same forward and the same contributions."""
    fused, separate = (
        build_standin_vit(block_type="custom"),
        build_standin_vit(block_type="custom", separate_qkv=True),
    )
    with torch.no_grad():
        for a, b in zip(fused.transformer.resblocks, separate.transformer.resblocks, strict=True):
            q, k, v = a.attn.in_proj_weight.chunk(3)
            b.attn.q_proj_weight.copy_(q), b.attn.k_proj_weight.copy_(k), b.attn.v_proj_weight.copy_(v)
        separate.load_state_dict(
            {k: v for k, v in fused.state_dict().items() if "in_proj_weight" not in k}, strict=False
        )
        x = images_for(fused)
        assert rel_err(separate(x), fused(x)) <= 1e-6
        ca = decompose_compact(read_open_clip(fused), x).heads
        cb = decompose_compact(read_open_clip(separate), x).heads
    assert rel_err(cb, ca) <= 1e-5


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_reference_forward_matches_standin_forward(cfg):
    model = model_for(cfg)
    x = images_for(model)
    with torch.no_grad():
        assert rel_err(read_open_clip(model).forward(x), model(x)) <= 1e-5


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_contributions_sum_to_standin_forward(cfg):
    model = model_for(cfg)
    x = images_for(model)
    canonical = read_open_clip(model)
    with torch.no_grad():
        ref = model(x)
        for convention in ("default", "equal_share"):
            compact = decompose_compact(canonical, x, convention)
            layout = canonical.layout(convention)
            assert compact.names == layout.names
            assert rel_err(compact.expand().sum(1), ref) <= 1e-5, convention
            assert rel_err(compact.embedding(), ref) <= 1e-5, convention


def test_scaled_cosine_logits_are_clamped_per_head():
    """The clamp matters: without it the reference forward would differ."""
    model = build_standin_vit(scaled_cosine=True)
    x = images_for(model)
    canonical = read_open_clip(model)
    with torch.no_grad():
        ref = model(x)
        assert rel_err(canonical.forward(x), ref) <= 1e-5
        q_norm = canonical.blocks[0].attention.q_norm
        q_norm.max_log = 1e9  # no clamp
        assert rel_err(canonical.forward(x), ref) > 1e-4


def test_bf16_autocast_smoke():
    model = model_for("scaled_cosine_all_options")
    x = images_for(model, n=8)
    canonical = read_open_clip(model)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf = model(x).float()
            compact = decompose_compact(canonical, x)
    emb = compact.embedding()
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert rel_err(emb, ref_bf) <= 5e-2
    assert rel_err(emb, ref) <= 5e-2


def test_4x_refusals_are_named():
    model = build_standin_vit(block_type="custom", separate_qkv=True)
    attn = model.transformer.resblocks[1].attn
    with torch.no_grad():
        attn.k_proj_weight = torch.nn.Parameter(torch.randn(64, 32))  # kdim != dim
    with pytest.raises(UnsupportedModelError, match="kdim"):
        read_open_clip(model)
    model = build_standin_vit()
    model.transformer.resblocks[0].ln_1_kv = torch.nn.LayerNorm(64)
    with pytest.raises(UnsupportedModelError, match="ln_1_kv"):
        read_open_clip(model)
    model = build_standin_vit()
    model.transformer.resblocks[2].attn.extra = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match="extra"):
        read_open_clip(model)
    model = build_standin_vit()
    model.pool_type = "avg_all"  # 4.x's mean over every token, class token included
    with pytest.raises(UnsupportedModelError, match="avg_all"):
        read_open_clip(model)
    assert is_supported(model_for("scaled_cosine"))

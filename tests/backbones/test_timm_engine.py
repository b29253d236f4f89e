"""The timm reader (residual_lightning.backbones.timm) on tiny random-weight timm ViTs, built offline."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import (  # noqa: E402
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)

from residual_lightning.backbones import decompose, decompose_compact  # noqa: E402
from residual_lightning.backbones.canonical import UnsupportedModelError  # noqa: E402
from residual_lightning.backbones.timm import is_supported_timm, read_timm  # noqa: E402
from tests.backbones.engine_helpers import images, pre_logits, rel_err  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10)

CONFIGS = {
    "token": {},
    "token_fc_norm": dict(fc_norm=True),
    "avg_fc_norm": dict(global_pool="avg"),
    "avg_norm_per_token": dict(global_pool="avg", fc_norm=False),
    "layerscale": dict(init_values=0.1),
    "qk_norm": dict(qk_norm=True),
    "scale_attn_norm": dict(scale_attn_norm=True),
    "scale_mlp_norm": dict(scale_mlp_norm=True),
    "no_biases": dict(qkv_bias=False, proj_bias=False),
    "no_embed_class": dict(no_embed_class=True),
    "no_class_token_avg": dict(class_token=False, global_pool="avg"),
    "no_class_token_avg_norm_per_token": dict(class_token=False, global_pool="avg", fc_norm=False),
    "pre_norm_clip_style": dict(pre_norm=True),
    "dinov2_registers": dict(reg_tokens=4, no_embed_class=True, init_values=1e-5),
    "registers_avg_fc_norm": dict(reg_tokens=4, global_pool="avg"),
    "registers_avg_norm_per_token": dict(reg_tokens=4, global_pool="avg", fc_norm=False),
    "registers_avg_include_prefix": dict(reg_tokens=2, global_pool="avg", pool_include_prefix=True),
    "dynamic_img_size": dict(dynamic_img_size=True, reg_tokens=1),
    "everything": dict(
        reg_tokens=4,
        no_embed_class=True,
        init_values=0.1,
        qk_norm=True,
        scale_attn_norm=True,
        scale_mlp_norm=True,
        pre_norm=True,
        global_pool="avg",
    ),
}

REFUSED = {
    "ResPostBlock": (dict(block_fn=ResPostBlock), "ResPostBlock"),
    "ParallelScalingBlock": (dict(block_fn=ParallelScalingBlock), "ParallelScalingBlock"),
    "ParallelThingsBlock": (dict(block_fn=ParallelThingsBlock), "ParallelThingsBlock"),
    "DiffAttention": (dict(attn_layer="diff"), "DiffAttention"),
    "prr": (dict(global_pool="prr"), "'prr'"),
    "max": (dict(global_pool="max"), "'max'"),
    "avgmax": (dict(global_pool="avgmax"), "'avgmax'"),
    "no_pool": (dict(global_pool=""), "global_pool=''"),
    "final_norm_false": (dict(final_norm=False), "final_norm=False"),
    "rmsnorm": (dict(norm_layer="rmsnorm"), "RmsNorm, not a LayerNorm"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_timm_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise every bias, norm affine, LayerScale gamma and class/register/position token,
    which timm initialises to 0, 1, ``init_values`` or ~1e-6, so that a misplaced constant shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif leaf == "weight" and p.ndim == 1:  # norm gammas
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif leaf == "gamma":  # LayerScale
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif leaf in ("cls_token", "reg_token", "pos_embed"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def build_vit(seed: int = 0, **options) -> VisionTransformer:
    """A tiny randomised timm ViT in eval mode (no pretrained weights, no download)."""
    torch.manual_seed(seed)
    return randomise_timm_(VisionTransformer(**{**TINY, **options}), seed).eval()


@functools.cache
def model_for(name: str) -> VisionTransformer:
    return build_vit(**CONFIGS[name])


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_reference_forward_matches_pre_logits(cfg):
    model = model_for(cfg)
    x = images()
    with torch.no_grad():
        assert rel_err(read_timm(model).forward(x), pre_logits(model, x)) <= 1e-5


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_contributions_sum_to_pre_logits(cfg):
    model = model_for(cfg)
    x = images()
    canonical = read_timm(model)
    with torch.no_grad():
        ref = pre_logits(model, x)
        for convention in ("default", "equal_share"):
            compact = decompose_compact(canonical, x, convention)
            layout = canonical.layout(convention)
            full = compact.expand()
            assert compact.names == layout.names
            assert layout.library == "timm" and layout.width == 64 and layout.output_dim == 64
            assert full.shape == (4, layout.num_units, 64)
            assert rel_err(full.sum(1), ref) <= 1e-5, convention
            assert rel_err(decompose(canonical, x, convention).contributions.sum(1), ref) <= 1e-5, convention


def test_layouts_follow_the_readout():
    assert read_timm(model_for("token")).layout().pool == "tok"
    assert read_timm(model_for("avg_fc_norm")).layout().pool == "avg_ln"
    assert read_timm(model_for("avg_norm_per_token")).layout().pool == "ln_avg"
    assert read_timm(model_for("registers_avg_fc_norm")).readout.num_prefix_tokens == 5
    assert read_timm(model_for("no_class_token_avg")).readout.num_prefix_tokens == 0
    assert read_timm(model_for("registers_avg_include_prefix")).readout.num_prefix_tokens == 0
    assert read_timm(model_for("scale_attn_norm")).blocks[0].attention.inner_norm is not None
    assert read_timm(model_for("layerscale")).blocks[2].ls2 is not None


def test_dynamic_img_size_at_another_resolution():
    model = model_for("dynamic_img_size")
    x = images(size=48)
    canonical = read_timm(model)
    with torch.no_grad():
        ref = pre_logits(model, x)
        assert rel_err(canonical.forward(x), ref) <= 1e-5
        assert rel_err(decompose(canonical, x, "equal_share").contributions.sum(1), ref) <= 1e-5


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_models_are_refused_by_name(case):
    options, message = REFUSED[case]
    model = VisionTransformer(**{**TINY, **options}).eval()
    with pytest.raises(UnsupportedModelError, match=message):
        read_timm(model)
    assert not is_supported_timm(model)


def test_other_model_classes_and_modules_are_refused_by_name():
    from timm.models.deit import VisionTransformerDistilled

    assert issubclass(UnsupportedModelError, TypeError)
    assert is_supported_timm(model_for("everything"))
    with pytest.raises(UnsupportedModelError, match="VisionTransformerDistilled"):
        read_timm(VisionTransformerDistilled(**TINY))
    with pytest.raises(UnsupportedModelError, match="Linear"):
        read_timm(torch.nn.Linear(2, 2))
    model = build_vit()
    model.blocks[1].attn.gate = torch.nn.Linear(64, 64)
    with pytest.raises(UnsupportedModelError, match="gate"):
        read_timm(model)
    model = build_vit()
    model.blocks[2].extra = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match="extra"):
        read_timm(model)
    model = build_vit(init_values=0.1)
    model.blocks[0].ls2 = torch.nn.Linear(64, 64)
    with pytest.raises(UnsupportedModelError, match="ls2"):
        read_timm(model)

"""The open_clip TimmModel reader (residual_lightning.backbones.open_clip_timm) on tiny random-weight
CLIPs whose vision tower is a timm ViT or Eva trunk, built offline.

open_clip's ``TimmModel`` builds its trunk with ``timm.create_model(timm_model_name, ...)`` and
takes no architecture overrides, so the tiny trunks are registered here as timm models.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.timm_model import TimmModel  # noqa: E402
from timm.layers import RotAttentionPool2d  # noqa: E402
from timm.models import register_model  # noqa: E402
from timm.models._registry import is_model  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.eva import Eva  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from residual_lightning.backbones import decompose, decompose_compact  # noqa: E402
from residual_lightning.backbones.canonical import UnsupportedModelError  # noqa: E402
from residual_lightning.backbones.open_clip_timm import (  # noqa: E402
    is_supported_open_clip_timm,
    read_open_clip_timm,
)
from tests.backbones.engine_helpers import images, rel_err  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
# eva02_base_patch16_clip_224 made tiny: the EVA02-CLIP towers' trunk
TINY_EVA02_CLIP = dict(
    TINY,
    qkv_fused=False,
    mlp_ratio=4 * 2 / 3,
    swiglu_mlp=True,
    scale_mlp=True,
    scale_attn_inner=True,
    use_rot_pos_emb=True,
    ref_feat_shape=(2, 2),
)
TEXT = dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1)
EMBED_DIM = 48


def _tiny(cls, defaults: dict, **kwargs):
    """A timm entrypoint body: timm.create_model passes its own options, which the classes refuse."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = cls(**{**defaults, **kwargs})
    model.pretrained_cfg = model.default_cfg = {}  # TimmModel reads default_cfg
    return model


def _register() -> None:
    if is_model("rl_test_tiny_vit"):
        return

    @register_model
    def rl_test_tiny_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return _tiny(VisionTransformer, TINY, **kwargs)

    @register_model
    def rl_test_tiny_eva02_clip(pretrained: bool = False, **kwargs) -> Eva:
        kwargs.setdefault("global_pool", "token")  # as eva02_*_clip_* do
        return _tiny(Eva, TINY_EVA02_CLIP, **kwargs)


_register()

# vision_cfg entries; open_clip's EVA02-CLIP configs use timm_proj None: the trunk's own classifier
# (num_classes=embed_dim) is the projection; SigLIP configs use timm_proj 'none' and pool 'map'.
CONFIGS = {
    "vit_token_linear": dict(timm_model_name="rl_test_tiny_vit", timm_pool="token", timm_proj="linear"),
    "vit_avg_linear_bias": dict(
        timm_model_name="rl_test_tiny_vit", timm_pool="avg", timm_proj="linear", timm_proj_bias=True
    ),
    "vit_token_classifier": dict(timm_model_name="rl_test_tiny_vit", timm_pool="token", timm_proj=None),
    "vit_token_no_proj": dict(timm_model_name="rl_test_tiny_vit", timm_pool="token", timm_proj="none"),
    "eva02_clip": dict(timm_model_name="rl_test_tiny_eva02_clip", timm_pool="token", timm_proj=None),
    "eva02_linear_bias": dict(
        timm_model_name="rl_test_tiny_eva02_clip", timm_pool="token", timm_proj="linear", timm_proj_bias=True
    ),
    "eva02_avg_linear": dict(timm_model_name="rl_test_tiny_eva02_clip", timm_pool="avg", timm_proj="linear"),
}
MAP_CONFIGS = {
    "vit_map_no_proj": dict(timm_model_name="rl_test_tiny_vit", timm_pool="map", timm_proj="none"),  # SigLIP
    "vit_map_classifier": dict(timm_model_name="rl_test_tiny_vit", timm_pool="map", timm_proj=None),
    "eva_map_classifier": dict(timm_model_name="rl_test_tiny_eva02_clip", timm_pool="map", timm_proj=None),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_(visual: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise every bias (Eva's ``q_bias``/``k_bias``/``v_bias`` too), norm affine, layer scale and
    class/position token of the vision tower, and sharpen Eva's q and k so that the rope shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*visual.named_parameters(), *visual.named_buffers()]:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("bias", "q_bias", "k_bias", "v_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif leaf == "weight" and p.ndim == 1:  # norm gammas
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif leaf in ("gamma", "gamma_1", "gamma_2"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif leaf in ("cls_token", "reg_token", "pos_embed", "latent"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return visual


def build(vision: dict, seed: int = 0, custom_text: bool = False) -> torch.nn.Module:
    """A tiny randomised open_clip CLIP (or CustomTextCLIP) with a TimmModel tower, in eval mode."""
    torch.manual_seed(seed)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(embed_dim=EMBED_DIM, vision_cfg=dict(image_size=32, **vision), text_cfg=TEXT)
    randomise_(model.visual, seed)
    return model.eval()


@functools.cache
def model_for(name: str) -> torch.nn.Module:
    return build({**CONFIGS, **MAP_CONFIGS}[name])


def check_exact(model: torch.nn.Module, x: torch.Tensor, output_dim: int) -> None:
    canonical = read_open_clip_timm(model)
    with torch.no_grad():
        ref = model.encode_image(x)
        assert ref.shape == (x.shape[0], output_dim)
        assert rel_err(canonical.forward(x), ref) <= 1e-5
        for convention in ("default", "equal_share"):
            compact = decompose_compact(canonical, x, convention)
            layout = canonical.layout(convention)
            assert layout.output_dim == output_dim and layout.width == 64
            assert list(compact.names) == layout.names
            assert layout.pooler_units == canonical.readout.pooler_units
            assert layout.pooler_units == (("pool.mlp",) if canonical.readout.pool == "map" else ())
            assert rel_err(compact.embedding(), ref) <= 1e-5, convention
            assert rel_err(decompose(canonical, x, convention).contributions.sum(1), ref) <= 1e-5, convention


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_contributions_sum_to_encode_image(cfg):
    model = model_for(cfg)
    assert type(model.visual) is TimmModel
    check_exact(model, images(), 64 if cfg.endswith("no_proj") else EMBED_DIM)


@pytest.mark.parametrize("cfg", list(MAP_CONFIGS))
def test_attention_pooled_trunks_pass_through(cfg):
    """The trunk reader's MAP readout is kept; the projection after it is composed in."""
    model = model_for(cfg)
    try:
        canonical = read_open_clip_timm(model)
    except UnsupportedModelError as err:  # a trunk reader without 'map' support
        pytest.skip(f"the trunk reader refuses it: {err}")
    assert canonical.readout.pool == "map"
    check_exact(model, images(), 64 if cfg.endswith("no_proj") else EMBED_DIM)


def test_projections_are_the_models_tensors():
    model = model_for("eva02_linear_bias")
    readout = read_open_clip_timm(model).readout
    proj = model.visual.head.proj
    assert readout.proj.data_ptr() == proj.weight.data_ptr() and readout.proj.shape == (64, EMBED_DIM)
    assert readout.proj_bias is proj.bias
    readout = read_open_clip_timm(model_for("vit_token_classifier")).readout
    assert readout.proj_bias is model_for("vit_token_classifier").visual.trunk.head.bias
    assert read_open_clip_timm(model_for("vit_token_linear")).readout.proj_bias is None
    assert read_open_clip_timm(model_for("eva02_clip")).library == "open_clip"


def test_a_classifier_and_a_projection_compose():
    """A trunk classifier followed by the head's proj (two linear maps) multiply out exactly."""
    model = build(CONFIGS["eva02_linear_bias"], seed=3)
    torch.manual_seed(3)
    model.visual.trunk.head = torch.nn.Linear(64, 40).eval()
    model.visual.head.proj = torch.nn.Linear(40, EMBED_DIM, bias=True).eval()
    check_exact(model, images(), EMBED_DIM)


def test_custom_text_clip_and_bare_tower():
    model = build(CONFIGS["eva02_clip"], custom_text=True)
    check_exact(model, images(), EMBED_DIM)
    visual = model_for("vit_avg_linear_bias").visual
    x = images()
    with torch.no_grad():
        assert rel_err(read_open_clip_timm(visual).forward(x), visual(x)) <= 1e-5


def test_unsupported_towers_are_refused_by_name():
    assert is_supported_open_clip_timm(model_for("eva02_clip"))
    own = open_clip.CLIP(
        embed_dim=EMBED_DIM, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1), text_cfg=TEXT
    )
    with pytest.raises(UnsupportedModelError, match="VisionTransformer.*only open_clip.timm_model.TimmModel"):
        read_open_clip_timm(own)
    assert not is_supported_open_clip_timm(own)

    mlp = build(dict(timm_model_name="rl_test_tiny_vit", timm_pool="token", timm_proj="mlp"))
    with pytest.raises(UnsupportedModelError, match="mlp"):
        read_open_clip_timm(mlp)

    cases = {
        "pool": (
            lambda v: setattr(v, "head", torch.nn.Sequential(OrderedDict(pool=RotAttentionPool2d(64, 48)))),
            "RotAttentionPool2d",
        ),
        "trunk": (
            lambda v: setattr(v, "trunk", VisionTransformerDistilled(**TINY)),
            "VisionTransformerDistilled",
        ),
        "classifier": (lambda v: setattr(v.trunk, "head", torch.nn.Sequential()), "trunk.head is Sequential"),
        "extra_head_layer": (
            lambda v: v.head.add_module("act", torch.nn.GELU()),
            r"unknown layers \['act'\]",
        ),
        "trunk_refusal": (
            lambda v: setattr(v.trunk.blocks[1].attn, "gate", torch.nn.Linear(64, 64)),
            "block 1.attn.gate",
        ),
    }
    for case, (edit, message) in cases.items():
        model = build(CONFIGS["eva02_linear_bias"])
        edit(model.visual)
        with pytest.raises(UnsupportedModelError, match=message):
            read_open_clip_timm(model)
        assert not is_supported_open_clip_timm(model), case

"""The timm Eva reader (residual_lightning.backbones.timm_eva) on tiny random-weight Evas, built offline."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.layers import RmsNorm  # noqa: E402
from timm.models.eva import Eva  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from residual_lightning.backbones import decompose, decompose_compact  # noqa: E402
from residual_lightning.backbones.canonical import UnsupportedModelError  # noqa: E402
from residual_lightning.backbones.timm_eva import is_supported_timm_eva, read_timm_eva  # noqa: E402
from tests.backbones.engine_helpers import images, pre_logits, rel_err  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10)
# eva02_*_patch14_224 in timm: rope, SwiGLU with a norm in the MLP (scale_mlp), unfused q/k/v.
EVA02 = dict(
    use_rot_pos_emb=True,
    swiglu_mlp=True,
    scale_mlp=True,
    qkv_fused=False,
    mlp_ratio=4 * 2 / 3,
    ref_feat_shape=(2, 2),
)

CONFIGS = {
    "eva02": EVA02,
    "eva02_qkv_fused": {**EVA02, "qkv_fused": True},
    "eva02_glu_mlp": {**EVA02, "qkv_fused": True, "scale_mlp": False},  # GluMlp, packed fc1
    "eva02_clip_token": {**EVA02, "scale_attn_inner": True, "global_pool": "token"},  # EVA02-CLIP towers
    "eva_clip_no_rope": dict(global_pool="token"),  # EVA01-CLIP: Mlp, fused qkv, abs. positions only
    "eva02_layerscale": {**EVA02, "init_values": 0.1},
    "attn_only_layer_scale": {**EVA02, "init_values": 0.1, "attn_only_layer_scale": True},
    "avg_norm_per_token": {**EVA02, "use_fc_norm": False},
    "qk_norm": {**EVA02, "qk_norm": True},
    "no_qkv_bias": {**EVA02, "qkv_bias": False},
    "no_qkv_bias_fused": {**EVA02, "qkv_bias": False, "qkv_fused": True},
    "qkv_bias_separate_add": {**EVA02, "qkv_fused": True},  # qkv_bias_separate set after building
    "rope_rotate_half": {**EVA02, "rope_rotate_half": True},
    "rope_mixed": dict(use_rot_pos_emb=True, rope_type="mixed", init_values=0.1),
    "rope_dinov3": dict(use_rot_pos_emb=True, rope_type="dinov3", rope_rotate_half=True, qk_norm=True),
    "registers_avg": {**EVA02, "num_reg_tokens": 4, "no_embed_class": True},
    "registers_token": {**EVA02, "num_reg_tokens": 4, "global_pool": "token", "init_values": 0.1},
    "registers_avg_norm_per_token": {**EVA02, "num_reg_tokens": 2, "use_fc_norm": False},
    "no_class_token_avg": {**EVA02, "class_token": False},
    "no_abs_pos_embed": {**EVA02, "use_abs_pos_emb": False, "global_pool": "token"},
    "pre_norm": {**EVA02, "use_pre_transformer_norm": True},
    "map": {**EVA02, "global_pool": "map"},
    "map_registers": {**EVA02, "global_pool": "map", "num_reg_tokens": 2, "attn_pool_num_heads": 2},
    # vit_pe_core_*: AttentionRope, pre-norm, rope on an offset 'xy' grid, attention pooling
    "pe_core": dict(
        global_pool="map",
        attn_type="rope",
        use_pre_transformer_norm=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(2, 2),
        rope_grid_offset=1.0,
        rope_grid_indexing="xy",
        attn_pool_num_heads=2,
        init_values=0.1,
    ),
    "attention_rope_unfused_gqa": dict(
        attn_type="rope", use_rot_pos_emb=True, qkv_fused=False, num_kv_heads=2, qk_norm=True
    ),
    "attention_rope_no_bias": dict(
        attn_type="rope", use_rot_pos_emb=True, qkv_bias=False, global_pool="token"
    ),
    "everything": {
        **EVA02,
        "num_reg_tokens": 4,
        "no_embed_class": True,
        "init_values": 0.1,
        "qk_norm": True,
        "scale_attn_inner": True,
        "use_pre_transformer_norm": True,
        "global_pool": "token",
    },
}

REFUSED = {
    "post_norm": (dict(use_post_norm=True), "EvaBlockPostNorm"),
    "map_fc_norm": (dict(global_pool="map", use_fc_norm=True), "fc_norm after it"),
    "max": (dict(global_pool="max"), "'max'"),
    "avgmax": (dict(global_pool="avgmax"), "'avgmax'"),
    "no_pool": (dict(global_pool=""), "global_pool=''"),
    "no_final_norm": (dict(use_fc_norm=False, use_post_transformer_norm=False), "no final norm"),
    "both_norms": (
        dict(use_fc_norm=True, use_post_transformer_norm=True),
        "both a final norm and an fc_norm",
    ),
    "rmsnorm": (dict(norm_layer=RmsNorm), "RmsNorm, not a LayerNorm"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_eva_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise every bias (``q_bias``/``v_bias`` and the zero ``k_bias`` buffer too), norm affine,
    layer scale and class/register/position token, which timm initialises to 0, 1, ``init_values`` or
    ~0.02, so that a misplaced constant shows; sharpen q and k so that the rotary embedding shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("bias", "q_bias", "k_bias", "v_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif leaf == "weight" and p.ndim == 1:  # norm gammas
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif leaf in ("gamma_1", "gamma_2"):  # layer scales
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif leaf in ("cls_token", "reg_token", "pos_embed"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for block in model.blocks:
            attn = block.attn
            if getattr(attn, "qkv", None) is not None:
                attn.qkv.weight[: 2 * attn.num_heads * attn.head_dim].mul_(8.0)
            elif getattr(attn, "q_proj", None) is not None:
                attn.q_proj.weight.mul_(8.0)
                attn.k_proj.weight.mul_(8.0)
    return model


def build_eva(seed: int = 0, **options) -> Eva:
    """A tiny randomised timm Eva in eval mode (no pretrained weights, no download)."""
    torch.manual_seed(seed)
    return randomise_eva_(Eva(**{**TINY, **options}), seed).eval()


@functools.cache
def model_for(name: str) -> Eva:
    model = build_eva(**CONFIGS[name])
    if name == "qkv_bias_separate_add":
        for block in model.blocks:
            block.attn.qkv_bias_separate = True
    return model


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_reference_forward_matches_pre_logits(cfg):
    model = model_for(cfg)
    x = images()
    with torch.no_grad():
        assert rel_err(read_timm_eva(model).forward(x), pre_logits(model, x)) <= 1e-5


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_contributions_sum_to_pre_logits(cfg):
    model = model_for(cfg)
    x = images()
    canonical = read_timm_eva(model)
    with torch.no_grad():
        ref = pre_logits(model, x)
        for convention in ("default", "equal_share"):
            compact = decompose_compact(canonical, x, convention)
            layout = canonical.layout(convention)
            full = compact.expand()
            assert list(compact.names) == layout.names
            assert layout.pooler_units == canonical.readout.pooler_units
            assert layout.library == "timm" and layout.width == 64 and layout.output_dim == 64
            assert full.shape == (4, len(compact.names), 64)
            assert rel_err(compact.embedding(), ref) <= 1e-5, convention
            assert rel_err(full.sum(1), ref) <= 1e-5, convention
            assert rel_err(decompose(canonical, x, convention).contributions.sum(1), ref) <= 1e-5, convention


def test_the_rotary_embedding_matters():
    """Without its rope hooks the description is off by far more than the 1e-5 the tests above allow:
    they do test the rope."""
    model = model_for("registers_avg")
    x = images()
    canonical = read_timm_eva(model)
    with torch.no_grad():
        ref = pre_logits(model, x)
        for block in canonical.blocks:
            block.attention.rope = None
        assert rel_err(canonical.forward(x), ref) > 1e-3


@pytest.mark.parametrize("cfg", ["registers_token", "rope_mixed", "rope_rotate_half"])
def test_rope_on_a_slice_of_rows_matches_all_rows(cfg):
    """Query rows given as a slice (straddling the prefix tokens, or after them) get the rotation of
    their own positions, as the engine's last block asks."""
    model = model_for(cfg)
    canonical = read_timm_eva(model)
    with torch.no_grad():
        x = canonical.embed(images())
        block = canonical.blocks[1]
        normed = block.norm1(x)
        full = block.attention.context(normed)  # (N, H, T, d)
        prefix = model.num_prefix_tokens
        for rows in (
            slice(0, 1),
            slice(max(prefix - 2, 0), prefix + 3),
            slice(prefix, None),
            slice(prefix + 4, 12),
        ):
            part = block.attention.context(normed, rows)
            assert rel_err(part, full[:, :, rows]) <= 1e-6, rows


def test_layouts_follow_the_readout():
    assert read_timm_eva(model_for("eva02_clip_token")).layout().pool == "tok"
    assert read_timm_eva(model_for("eva02")).layout().pool == "avg_ln"
    assert read_timm_eva(model_for("avg_norm_per_token")).layout().pool == "ln_avg"
    assert read_timm_eva(model_for("registers_avg")).readout.num_prefix_tokens == 5
    assert read_timm_eva(model_for("map")).layout().pool == "map"
    assert read_timm_eva(model_for("map_registers")).readout.rows == slice(0, None)  # prefix included
    assert read_timm_eva(model_for("pe_core")).blocks[0].attention.rope is not None
    assert read_timm_eva(model_for("no_class_token_avg")).readout.num_prefix_tokens == 0
    assert read_timm_eva(model_for("eva02_clip_token")).blocks[0].attention.inner_norm is not None
    assert read_timm_eva(model_for("eva_clip_no_rope")).blocks[0].attention.rope is None
    canonical = read_timm_eva(model_for("attn_only_layer_scale"))
    assert canonical.blocks[2].ls1 is not None and canonical.blocks[2].ls2 is None


def test_dynamic_img_size_at_another_resolution():
    model = build_eva(**{**EVA02, "dynamic_img_size": True, "num_reg_tokens": 1})
    canonical = read_timm_eva(model)
    for size in (48, 32):
        x = images(size=size)
        with torch.no_grad():
            ref = pre_logits(model, x)
            assert rel_err(canonical.forward(x), ref) <= 1e-5, size
            assert rel_err(decompose(canonical, x, "equal_share").contributions.sum(1), ref) <= 1e-5, size


def test_bf16_autocast_smoke():
    model = model_for("everything")
    x = images()
    canonical = read_timm_eva(model)
    with torch.no_grad():
        ref = pre_logits(model, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = canonical.forward(x)
            summed = decompose(canonical, x, "default").contributions.sum(1)
            compact = decompose_compact(canonical, x, "equal_share").embedding()
    for value in (ours, summed, compact):
        assert torch.isfinite(value).all()
        assert rel_err(value.float(), ref) <= 0.1


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_models_are_refused_by_name(case):
    options, message = REFUSED[case]
    model = Eva(**{**TINY, **options}).eval()
    with pytest.raises(UnsupportedModelError, match=message):
        read_timm_eva(model)
    assert not is_supported_timm_eva(model)


def test_other_model_classes_and_modules_are_refused_by_name():
    class MyEva(Eva):
        pass

    assert issubclass(UnsupportedModelError, TypeError)
    assert is_supported_timm_eva(model_for("everything"))
    with pytest.raises(UnsupportedModelError, match="MyEva"):
        read_timm_eva(MyEva(**TINY))
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        read_timm_eva(VisionTransformer(**TINY))
    with pytest.raises(UnsupportedModelError, match="Linear"):
        read_timm_eva(torch.nn.Linear(2, 2))
    model = build_eva()
    model.blocks[2].extra = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match="extra"):
        read_timm_eva(model)
    model = build_eva()
    model.blocks[1].attn.extra_scale = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(UnsupportedModelError, match="extra_scale"):
        read_timm_eva(model)
    model = build_eva()
    model.blocks[1].attn.gate = torch.nn.Linear(64, 64)  # EvaAttention(gated=True)
    with pytest.raises(UnsupportedModelError, match="gate"):
        read_timm_eva(model)
    model = build_eva()
    model.blocks[1].attn.norm = RmsNorm(64)
    with pytest.raises(UnsupportedModelError, match="block 1.attn.norm is RmsNorm"):
        read_timm_eva(model)
    model = build_eva(qkv_fused=True)
    model.blocks[0].attn.qkv.bias = torch.nn.Parameter(torch.zeros(3 * 64))
    with pytest.raises(UnsupportedModelError, match="qkv has a bias"):
        read_timm_eva(model)

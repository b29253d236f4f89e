"""Exact decomposition on the REAL architectures (real width, depth, heads, patch and image size).

Random weights, nothing downloaded: open_clip and timm models come from their own registries with
``pretrained=None``/``False``; transformers models from configs whose numbers are typed in below
from the public model cards (DINOv2 at 224 px instead of 518 for speed; BLIP at its 384 px). The
libraries' own initialisation is skipped (`skip_library_init`) and every parameter is randomised
with `hf_tiny.randomise_hf_` (non-zero biases and layer scales, norm affines away from 1, weights
with std ``fan_in ** -0.5``) so that no block hides behind a zero bias or a 1e-5 layer scale.
Batch 2, float32: the summed decomposition must equal the library's own embedding
(`dispatch.model_embedding`) to 1e-4 relative, and ``read_model(model).layout()`` must have
U = 1 + L + L*H units (+1 ``pool.mlp`` for a MAP readout). All tests are ``slow``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import randomise_hf_  # noqa: E402

from residual_lightning.backbones.dispatch import model_embedding, read_model  # noqa: E402
from residual_lightning.units import decompose_compact  # noqa: E402

pytestmark = pytest.mark.slow

BATCH = 2
TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def images(size: int, n: int = BATCH, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- builders: (model, image size) ----------------------------------------------------------------


def skip_library_init():
    """transformers' ``no_init_weights`` (torch.nn.init calls and HF ``init_weights`` become no-ops):
    every parameter is overwritten by `randomise_hf_` anyway, and a ViT-L's own init costs seconds.
    Buffers (position ids, RoPE tables, masks) are computed at construction and are unaffected."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers is the optional ``hf`` extra
        return contextlib.nullcontext()
    return no_init_weights()


def open_clip_model(name: str) -> tuple[nn.Module, int]:
    import open_clip

    model = open_clip.create_model(name, pretrained=None)
    size = model.visual.image_size
    return model, size[0] if isinstance(size, (tuple, list)) else size


def timm_model(name: str, **kwargs) -> tuple[nn.Module, int]:
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    return model, model.patch_embed.img_size[0]


_SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
_SMALL_VOCAB = dict(vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def hf_clip_vit_l14() -> tuple[nn.Module, int]:
    """openai/clip-vit-large-patch14: vision 1024 wide, 24 layers, 16 heads, 14x14 patches, 224 px,
    projection 768 (quick_gelu); a small text tower (only the image side is tested)."""
    import transformers as tf

    vision = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    config = tf.CLIPConfig(
        vision_config=vision,
        text_config=dict(_SMALL_TEXT, **_SMALL_VOCAB, max_position_embeddings=16),
        projection_dim=768,
    )
    return tf.CLIPModel._from_config(config), 224


def hf_blip_large_retrieval(image_size: int = 384) -> tuple[nn.Module, int]:
    """Salesforce/blip-itm-large-coco: vision 1024 wide, 24 layers, 16 heads, 16x16 patches, 384 px,
    image-text hidden 256; a small text tower with cross-attention width 1024."""
    import transformers as tf

    vision = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=16,
        image_size=image_size,
    )
    text = dict(
        _SMALL_TEXT, **_SMALL_VOCAB, max_position_embeddings=64, encoder_hidden_size=1024, sep_token_id=3
    )
    config = tf.BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=256)
    return tf.BlipForImageTextRetrieval._from_config(config, attn_implementation="eager"), image_size


def hf_dinov2_large() -> tuple[nn.Module, int]:
    """facebook/dinov2-large: 1024 wide, 24 layers, 16 heads, 14x14 patches, mlp_ratio 4, layer
    scale 1.0; 224 px instead of the card's 518 to keep the test quick."""
    import transformers as tf

    config = tf.Dinov2Config(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        mlp_ratio=4,
        patch_size=14,
        image_size=224,
        layerscale_value=1.0,
    )
    return tf.Dinov2Model._from_config(config), 224


def hf_vit_large() -> tuple[nn.Module, int]:
    """google/vit-large-patch16-224: 1024 wide, 24 layers, 16 heads, 16x16 patches, 224 px."""
    import transformers as tf

    config = tf.ViTConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=16,
        image_size=224,
    )
    return tf.ViTModel._from_config(config, add_pooling_layer=False), 224


def hf_siglip_base() -> tuple[nn.Module, int]:
    """google/siglip-base-patch16-224: vision 768 wide, 12 layers, 12 heads, 16x16 patches, 224 px,
    MAP head; a small text tower."""
    import transformers as tf

    vision = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=16,
        image_size=224,
    )
    text = dict(_SMALL_TEXT, **_SMALL_VOCAB, max_position_embeddings=16, projection_size=768)
    config = tf.SiglipConfig(vision_config=vision, text_config=text)
    return tf.SiglipModel._from_config(config), 224


# id -> (builder, layers, heads, MAP readout?, also check equal_share?)
CASES: dict[str, tuple[Callable[[], tuple[nn.Module, int]], int, int, bool, bool]] = {
    # open_clip
    "open_clip:ViT-B-16": (lambda: open_clip_model("ViT-B-16"), 12, 12, False, True),
    "open_clip:ViT-L-14-quickgelu": (lambda: open_clip_model("ViT-L-14-quickgelu"), 24, 16, False, False),
    "open_clip:ViT-B-16-SigLIP": (lambda: open_clip_model("ViT-B-16-SigLIP"), 12, 12, True, True),
    "open_clip:EVA02-B-16": (lambda: open_clip_model("EVA02-B-16"), 12, 12, False, False),
    # timm
    "timm:vit_base_patch16_224": (lambda: timm_model("vit_base_patch16_224"), 12, 12, False, False),
    "timm:vit_large_patch14_reg4_dinov2": (
        lambda: timm_model("vit_large_patch14_reg4_dinov2", img_size=224),
        24,
        16,
        False,
        False,
    ),
    "timm:eva02_base_patch14_224": (lambda: timm_model("eva02_base_patch14_224"), 12, 12, False, True),
    "timm:vit_base_patch16_siglip_224": (
        lambda: timm_model("vit_base_patch16_siglip_224"),
        12,
        12,
        True,
        False,
    ),
    # transformers
    "hf:clip-vit-large-patch14": (hf_clip_vit_l14, 24, 16, False, False),
    "hf:blip-itm-large-coco": (hf_blip_large_retrieval, 24, 16, False, False),
    "hf:dinov2-large": (hf_dinov2_large, 24, 16, False, True),
    "hf:vit-large-patch16-224": (hf_vit_large, 24, 16, False, False),
    "hf:siglip-base-patch16-224": (hf_siglip_base, 12, 12, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_architecture_decomposes_exactly(case: str) -> None:
    build, layers, heads, is_map, check_equal_share = CASES[case]
    torch.manual_seed(0)
    with skip_library_init():
        model, size = build()
    model = randomise_hf_(model, seed=0).eval()
    canonical = read_model(model)
    layout = canonical.layout()
    assert (layout.layers, layout.heads) == (layers, heads), case
    assert layout.num_units == 1 + layers + layers * heads + int(is_map), case
    assert ("pool.mlp" in layout.names) == is_map, case

    x = images(size)
    conventions = ("default", "equal_share") if check_equal_share else ("default",)
    with torch.inference_mode():
        ref = model_embedding(model, x)
        assert ref.shape[0] == BATCH and torch.isfinite(ref).all()
        for convention in conventions:
            compact = decompose_compact(model, x, convention)
            assert list(compact.names) == list(canonical.layout(convention).names), (case, convention)
            err = rel_err(compact.embedding(), ref)
            assert err <= TOL, (case, convention, err)


def test_bf16_autocast_smoke_on_real_architecture() -> None:
    """open_clip ViT-B-16 (library init) under bf16 CPU autocast: finite, within 5e-2 of float32."""
    torch.manual_seed(0)
    model, size = open_clip_model("ViT-B-16")
    model.eval()
    x = images(size)
    with torch.inference_mode():
        ref = model_embedding(model, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compact = decompose_compact(model, x, "default")
        emb = compact.embedding()
    assert emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert rel_err(emb, ref) <= 5e-2

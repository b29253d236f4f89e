"""The transformers reader (residual_lightning.backbones.hf, hf_text) on tiny random-weight models built offline."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import (  # noqa: E402
    FAMILIES,
    TEXT_FAMILIES,
    randomise_hf_,
    save_tiny,
    tiny_model,
    tiny_tokenizer,
)

from residual_lightning.backbones import decompose, decompose_compact  # noqa: E402
from residual_lightning.backbones.canonical import UnsupportedModelError  # noqa: E402
from residual_lightning.backbones.hf import hf_image_features, is_supported_hf, read_hf  # noqa: E402
from residual_lightning.backbones.hf_text import hf_logit_scale_bias, hf_text_features  # noqa: E402
from tests.backbones.engine_helpers import images  # noqa: E402

CLASS_TOKEN_FAMILIES = [f for f in FAMILIES if f != "siglip"]
TEXTS = ["a photo of a cat", "a blurry photo of the bird", "dog"]


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def tokenizer_for(family: str):
    return tiny_tokenizer(family)


@functools.cache
def model_for(family: str, attn_implementation: str | None = None):
    tokenizer = tokenizer_for(family) if family in TEXT_FAMILIES else None
    return tiny_model(family, attn_implementation=attn_implementation, tokenizer=tokenizer)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def implementations(family: str) -> list[str]:
    return ["eager"] if family == "blip" else ["sdpa", "eager"]  # BLIP's vision attention is eager only


def assert_decomposes(canonical, x: torch.Tensor, ref: torch.Tensor) -> None:
    for convention in ("default", "equal_share"):
        compact = decompose_compact(canonical, x, convention)
        layout = canonical.layout(convention)
        pooler = list(getattr(canonical.readout, "pooler_units", ()))  # MAP: ``pool.mlp`` after the heads
        assert list(compact.names) in (list(layout.names), list(layout.names) + pooler)
        assert layout.library == "hf"
        assert rel_err(compact.embedding(), ref) <= 1e-5, convention
        assert rel_err(compact.expand().sum(1), ref) <= 1e-5, convention
        assert rel_err(decompose(canonical, x, convention).contributions.sum(1), ref) <= 1e-5, convention


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_forward_matches_for_every_attention_implementation(family):
    x = images()
    with torch.no_grad():
        refs = []
        for impl in implementations(family):
            model = model_for(family, impl)
            assert model.config._attn_implementation == impl
            ref = hf_image_features(model, x)
            refs.append(ref)
            assert rel_err(read_hf(model).forward(x), ref) <= 1e-5, impl
        assert rel_err(refs[-1], refs[0]) <= 1e-5  # same weights: eager == sdpa


@pytest.mark.parametrize("family", CLASS_TOKEN_FAMILIES)
def test_contributions_sum_to_the_embedding(family):
    model = model_for(family, implementations(family)[0])
    x = images()
    canonical = read_hf(model)
    with torch.no_grad():
        assert_decomposes(canonical, x, hf_image_features(model, x))


def test_siglip_map_readout_decomposes():
    model = model_for("siglip", "sdpa")
    x = images()
    canonical = read_hf(model)
    assert canonical.readout.pool == "map" and canonical.readout.num_prefix_tokens == 0
    with torch.no_grad():
        assert_decomposes(canonical, x, hf_image_features(model, x))


def test_layouts_and_descriptions():
    assert read_hf(model_for("dinov2_registers", "sdpa")).readout.num_prefix_tokens == 5
    dino = read_hf(model_for("dinov2", "sdpa"))
    assert dino.blocks[1].ls1 is not None and dino.blocks[1].ls2 is not None
    clip = read_hf(model_for("clip", "sdpa"))
    assert clip.layout().output_dim == 32 and clip.layout().heads == 4 and clip.layout().layers == 2
    assert read_hf(model_for("blip", "eager")).readout.proj_bias is not None
    assert read_hf(model_for("vit", "sdpa")).layout().pool == "tok"


def test_vision_wrapper_classes():
    import transformers as tf

    clip = model_for("clip", "sdpa")
    x = images()
    with torch.no_grad():
        config = tf.CLIPVisionConfig(**{**clip.config.vision_config.to_dict(), "projection_dim": 32})
        with_proj = tf.CLIPVisionModelWithProjection(config).eval()
        with_proj.vision_model.load_state_dict(clip.vision_model.state_dict())
        with_proj.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        ref = hf_image_features(clip, x)
        assert rel_err(hf_image_features(with_proj, x), ref) <= 1e-6
        assert_decomposes(read_hf(with_proj), x, ref)
        plain = clip.vision_model  # a CLIPVisionModel: pooler_output, no projection
        ref = hf_image_features(plain, x)
        assert ref.shape == (4, 64)
        assert_decomposes(read_hf(plain), x, ref)
        siglip = model_for("siglip", "sdpa")
        tower = siglip.vision_model  # a SiglipVisionModel
        assert rel_err(read_hf(tower).forward(x), hf_image_features(siglip, x)) <= 1e-5


def test_bf16_autocast_smoke():
    model = model_for("dinov2", "sdpa")
    x = images()
    canonical = read_hf(model)
    with torch.no_grad():
        ref = hf_image_features(model, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = canonical.forward(x)
            compact = decompose_compact(canonical, x, "equal_share")
        emb = compact.embedding()
        assert torch.isfinite(emb).all()
        assert rel_err(out, ref) <= 5e-2
        assert rel_err(emb, ref) <= 5e-2


# --- text -----------------------------------------------------------------------------------------


def test_text_features_and_logits():
    x = images(2)
    with torch.no_grad():
        clip, tok = model_for("clip", "sdpa"), tokenizer_for("clip")
        text = hf_text_features(clip, tok, TEXTS)
        assert text.shape == (3, 32)
        enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
        assert rel_err(text, clip.get_text_features(**enc).pooler_output) <= 1e-6
        scale, bias = hf_logit_scale_bias(clip)
        assert bias is None and scale == pytest.approx(clip.logit_scale.exp().item())
        logits = scale * F.normalize(hf_image_features(clip, x), dim=-1) @ F.normalize(text, dim=-1).T
        assert rel_err(logits, clip(pixel_values=x, **enc).logits_per_image) <= 1e-5

        blip, tok = model_for("blip", "eager"), tokenizer_for("blip")
        text = hf_text_features(blip, tok, TEXTS)
        assert text.shape == (3, 32)
        enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
        cosine = blip(pixel_values=x, use_itm_head=False, **enc).itm_score  # (2, 3)
        mine = F.normalize(hf_image_features(blip, x), dim=-1) @ F.normalize(text, dim=-1).T
        assert rel_err(mine, cosine) <= 1e-5
        assert hf_logit_scale_bias(blip) == (pytest.approx(1 / 0.07, rel=1e-4), None)

        siglip, tok = model_for("siglip", "sdpa"), tokenizer_for("siglip")
        text = hf_text_features(siglip, tok, TEXTS)
        assert text.shape == (3, 64)
        enc = tok(TEXTS, padding="max_length", return_tensors="pt")
        assert enc["input_ids"].shape[1] == siglip.config.text_config.max_position_embeddings
        scale, bias = hf_logit_scale_bias(siglip)
        assert bias == pytest.approx(siglip.logit_bias.item())
        logits = (
            scale * F.normalize(hf_image_features(siglip, x), dim=-1) @ F.normalize(text, dim=-1).T + bias
        )
        ref = siglip(pixel_values=x, input_ids=enc["input_ids"]).logits_per_image
        assert rel_err(logits, ref) <= 1e-5


@pytest.mark.parametrize("family", ["dinov2", "vit"])
def test_text_of_vision_only_models_is_refused(family):
    with pytest.raises(UnsupportedModelError, match="no text tower"):
        hf_text_features(model_for(family, "sdpa"), None, TEXTS)
    with pytest.raises(UnsupportedModelError, match="no text tower"):
        hf_logit_scale_bias(model_for(family, "sdpa"))


# --- save_tiny ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "blip", "siglip", "dinov2_registers", "vit"])
def test_save_tiny_round_trip(family, tmp_path):
    import numpy as np
    import transformers as tf
    from PIL import Image

    directory = save_tiny(family, tmp_path / family)
    loader = tf.BlipForImageTextRetrieval if family == "blip" else tf.AutoModel
    model = loader.from_pretrained(directory).eval()
    original = model_for(family, implementations(family)[0])
    assert type(model) is type(original)
    x = images(2)
    with torch.no_grad():
        ref = hf_image_features(original, x)
        assert rel_err(hf_image_features(model, x), ref) <= 1e-6
        assert rel_err(read_hf(model).forward(x), ref) <= 1e-5
    processor = tf.AutoImageProcessor.from_pretrained(directory)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    assert processor(images=image, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    if family in TEXT_FAMILIES:
        tokenizer = tf.AutoTokenizer.from_pretrained(directory)
        padding = "max_length" if family == "siglip" else True
        assert (
            tokenizer(TEXTS, padding=padding)["input_ids"]
            == tokenizer_for(family)(TEXTS, padding=padding)["input_ids"]
        )
        with torch.no_grad():
            text = hf_text_features(model, tokenizer, TEXTS)
            assert rel_err(text, hf_text_features(original, tokenizer_for(family), TEXTS)) <= 1e-6


# --- refusals -------------------------------------------------------------------------------------


def test_other_model_classes_are_refused_by_name():
    import transformers as tf

    assert issubclass(UnsupportedModelError, TypeError)
    resnet = tf.ResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).eval()
    swin = tf.SwinModel(
        tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2
        )
    ).eval()
    for model, name in [(resnet, "ResNetModel"), (swin, "SwinModel"), (torch.nn.Linear(2, 2), "Linear")]:
        with pytest.raises(UnsupportedModelError, match=f"{name}.*supported transformers classes.*CLIPModel"):
            read_hf(model)
        assert not is_supported_hf(model)
        with pytest.raises(UnsupportedModelError, match=name):
            hf_image_features(model, images(1))
    blip = model_for("blip", "eager")
    blip_model = tf.BlipModel(blip.config).eval()
    with pytest.raises(UnsupportedModelError, match="BlipModel"):
        read_hf(blip_model)

    class MyViT(tf.ViTModel):
        pass

    with pytest.raises(UnsupportedModelError, match="MyViT"):
        read_hf(MyViT(model_for("vit", "sdpa").config).eval())
    for family in FAMILIES:
        assert is_supported_hf(model_for(family, implementations(family)[0]))


def test_unknown_modules_and_options_are_refused_by_name():
    import transformers as tf

    vit = tiny_model("vit")
    vit.layers[1].extra = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match=r"layers\[1\].*extra"):
        read_hf(vit)
    vit = tiny_model("vit")
    vit.layers[0].attention.q_norm = torch.nn.LayerNorm(16)
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        read_hf(vit)
    vit = tiny_model("vit")
    vit.layers[0].layernorm_after = torch.nn.RMSNorm(64)
    with pytest.raises(UnsupportedModelError, match="RMSNorm, not a LayerNorm"):
        read_hf(vit)
    dino = tiny_model("dinov2")
    dino.encoder.layer[0].layer_scale2 = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="layer_scale2"):
        read_hf(dino)
    clip = tiny_model("clip", tokenizer=tokenizer_for("clip"))
    clip.vision_model.encoder.layers[1].mlp = torch.nn.Linear(64, 64)
    with pytest.raises(UnsupportedModelError, match=r"layers\[1\]\.mlp.*Linear"):
        read_hf(clip)
    vision = model_for("siglip", "sdpa").config.vision_config
    headless = randomise_hf_(
        tf.SiglipVisionModel(tf.SiglipVisionConfig(**{**vision.to_dict(), "vision_use_head": False}))
    )
    with pytest.raises(UnsupportedModelError, match="vision_use_head=False"):
        read_hf(headless.eval())
    with pytest.raises(ValueError, match="training mode"):
        read_hf(tiny_model("vit").train())

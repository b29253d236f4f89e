"""Every library through the whole pipeline: the CLI extracts, trains and tests on the offline
digits through a tiny timm ViT and tiny Hugging Face models (a ``save_pretrained`` directory
loaded back by path), and `BackboneSpec` loads, lays out and keys each of them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from residual_lightning.backbones.dispatch import model_embedding  # noqa: E402
from residual_lightning.cli import main  # noqa: E402
from residual_lightning.units import BackboneSpec, decompose_compact  # noqa: E402
from tests.backbones.hf_tiny import save_tiny  # noqa: E402
from tests.cli_helpers import quick_args  # noqa: E402


def fit_args(tmp: Path, library: str, model_name: str, pretrained: str | None, *extra: str) -> list[str]:
    args = quick_args(
        tmp,
        tmp / "cache",
        "--data.backbone.library",
        library,
        "--data.backbone.model_name",
        model_name,
        "--data.dataset_options.image_size",
        "32",
        "--trainer.max_epochs",
        "2",
        *extra,
    )
    if pretrained is not None:
        args += ["--data.backbone.pretrained", pretrained]
    return args


def run_dir(tmp: Path) -> Path:
    return next((tmp / "runs").glob("quickstart/version_*"))


def trained_ckpt(tmp: Path) -> dict:
    return torch.load(run_dir(tmp) / "checkpoints" / "last.ckpt", weights_only=True)


def test_timm_tiny_vit_trains_on_digits_with_prototypes(tmp_path, capsys):
    main(["fit", *fit_args(tmp_path, "timm", "RL-Tiny-timm-ViT-reg", None)])
    out = capsys.readouterr().out
    assert "test accuracy" in out
    ckpt = trained_ckpt(tmp_path)
    assert ckpt["hyper_parameters"]["backbone"]["library"] == "timm"
    caches = [p.name for p in (tmp_path / "cache").iterdir()]
    assert any(c.startswith("digits-train-RL-Tiny-timm-ViT-reg-") for c in caches), caches
    assert not any(c.startswith("classifier-") for c in caches)  # vision-only: prototypes
    # The classifier is the class means of the train embeddings (normalised), 10 digits x D=64.
    weights = ckpt["state_dict"]["classifier"]
    assert weights.shape == (10, 64)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(10))


def test_hf_clip_directory_trains_on_digits_with_its_text_classifier(tmp_path, capsys):
    folder = save_tiny("clip", tmp_path / "tiny-clip")
    main(["fit", *fit_args(tmp_path, "hf", str(folder), str(folder))])
    assert "zero-shot test accuracy" in capsys.readouterr().out
    caches = [p.name for p in (tmp_path / "cache").iterdir()]
    assert any(c.startswith("classifier-") for c in caches), caches
    backbone = trained_ckpt(tmp_path)["hyper_parameters"]["backbone"]
    assert backbone["library"] == "hf" and backbone["pretrained"] == str(folder)


def test_hf_dinov2_directory_trains_with_prototypes(tmp_path, capsys):
    folder = save_tiny("dinov2", tmp_path / "tiny-dinov2")
    main(["fit", *fit_args(tmp_path, "hf", str(folder), str(folder))])
    assert "test accuracy" in capsys.readouterr().out
    caches = [p.name for p in (tmp_path / "cache").iterdir()]
    assert not any(c.startswith("classifier-") for c in caches)


@pytest.mark.parametrize(
    ("library", "model_name"),
    [("timm", "RL-Tiny-timm-ViT"), ("timm", "RL-Tiny-timm-ViT-avg"), ("open_clip", "RL-Tiny-ViT-64")],
)
def test_spec_layout_matches_the_loaded_model_and_decomposes_exactly(library, model_name):
    spec = BackboneSpec(model_name, library=library)
    layout = spec.layout()
    bb = spec.load()
    size = 32 if library == "timm" else 64
    x = torch.randn(3, 3, size, size)
    compact = decompose_compact(bb.model, x)
    assert compact.heads.shape[1:] == layout.shape[:3]
    ref = model_embedding(bb.model, x)
    torch.testing.assert_close(compact.embedding(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.encode_image(x), ref)


def test_hf_spec_weights_id_follows_the_directory_contents(tmp_path):
    a = save_tiny("vit", tmp_path / "a")
    b = save_tiny("vit", tmp_path / "b", seed=1)
    spec_a, spec_b = BackboneSpec(str(a), str(a), library="hf"), BackboneSpec(str(b), str(b), library="hf")
    assert spec_a.weights_id.startswith("dir-") and spec_a.weights_id != spec_b.weights_id
    assert not spec_a.has_text
    assert spec_a.preprocessing_id.startswith("hf-eval-5.")
    bb = spec_a.load()
    assert bb.tokenizer is None and not bb.has_text
    with pytest.raises(ValueError, match="no text tower"):
        bb.text_features(["a photo of a 0"])


def test_unknown_library_and_models_are_named():
    with pytest.raises(ValueError, match="unknown backbone library 'jax'.*open_clip, timm, hf"):
        BackboneSpec("x", library="jax")
    with pytest.raises(ValueError, match="unknown timm model 'vit_bse_patch16_224'.*vit_base_patch16_224"):
        BackboneSpec("vit_bse_patch16_224", library="timm").load()
    with pytest.raises(ValueError, match="unknown open_clip model.*library to timm or hf"):
        BackboneSpec("vit_base_patch16_224").load()


def test_offline_hub_errors_name_the_library_and_the_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="(?s)transformers could not load.*save_pretrained.*library: hf"):
        BackboneSpec("google/vit-large-patch16-224", "main", library="hf").load()
    with pytest.raises(RuntimeError, match="(?s)timm could not fetch.*library: timm"):
        BackboneSpec("vit_tiny_patch16_224", "augreg_in21k", library="timm").load()


def test_hf_siglip_trains_and_predicts_sigmoid_probabilities(tmp_path, capsys):
    """SigLIP through the whole pipeline: a MAP tower, its text classifier with a logit bias, and
    predictions as per-class sigmoid(scale * cos + bias), as SigLIP users expect."""
    from residual_lightning.model import ResidualCLIP

    folder = save_tiny("siglip", tmp_path / "tiny-siglip")
    main(["fit", *fit_args(tmp_path, "hf", str(folder), str(folder), "--trainer.max_epochs", "1")])
    assert "zero-shot test accuracy" in capsys.readouterr().out
    ckpt_path = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    backbone = BackboneSpec(str(folder), str(folder), library="hf").load()
    expected_bias = float(backbone.model.logit_bias)
    assert state["logit_bias"].item() == pytest.approx(expected_bias)
    assert state["logit_scale"].item() == pytest.approx(float(backbone.model.logit_scale.exp()))
    clip = ResidualCLIP.from_checkpoint(str(ckpt_path))
    images = torch.randn(3, 3, 32, 32)
    probs = clip.predict(images)
    logits = clip.model.logits_from_images(images)
    torch.testing.assert_close(probs, torch.sigmoid(logits + expected_bias))
    assert not torch.allclose(probs.sum(-1), torch.ones(3))  # not a softmax


def test_checkpoints_without_a_logit_bias_keep_softmax_probabilities(tmp_path):
    """A checkpoint written before the bias buffer existed loads, and predicts with softmax."""
    from residual_lightning.model import ResidualCLIP

    main(["fit", *fit_args(tmp_path, "timm", "RL-Tiny-timm-ViT", None, "--trainer.max_epochs", "1")])
    ckpt_path = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["state_dict"]["logit_bias"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    clip = ResidualCLIP.from_checkpoint(str(old))
    probs = clip.predict(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))

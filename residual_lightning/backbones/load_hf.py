"""Loading Hugging Face ``transformers`` backbones (the optional ``hf`` extra).

``library: hf`` takes as ``model_name`` a hub id (``openai/clip-vit-large-patch14``) or a local
directory written by ``save_pretrained``, and as ``pretrained``: None (random weights from the
model's config, seed 0), a hub revision (``main``), or a local ``save_pretrained`` directory
holding the weights. The model class follows the config (`MODEL_CLASSES`: BLIP loads as
``BlipForImageTextRetrieval``, whose contrastive heads the authors use). The image transform is
built with torchvision from the model's image processor config (resize, centre crop, rescale,
mean/std, resample), so data loading stays in the DataLoader's workers.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

__all__ = [
    "MODEL_CLASSES",
    "VISION_ONLY",
    "hf_config",
    "hf_meta_model",
    "hf_model",
    "hf_transform",
    "load_hf",
]

log = logging.getLogger(__name__)

# config.model_type -> the class this framework decomposes.
MODEL_CLASSES: dict[str, str] = {
    "clip": "CLIPModel",
    "clip_vision_model": "CLIPVisionModelWithProjection",
    "blip": "BlipForImageTextRetrieval",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "vit": "ViTModel",
    "siglip": "SiglipModel",
    "siglip_vision_model": "SiglipVisionModel",
}
VISION_ONLY = {"dinov2", "dinov2_with_registers", "vit", "clip_vision_model", "siglip_vision_model"}


def _require_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "library: hf needs the Hugging Face extra: pip install 'residual-lightning[hf]'"
        ) from err
    return transformers


def _offline_error(what: str, source: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"transformers could not load the {what} of {source!r}: {type(err).__name__}: {err}. If the "
        "machine is offline or the hub unreachable, download the model elsewhere "
        "(`model.save_pretrained(dir)` with its processor and tokenizer) and pass that directory "
        "as --data.backbone.model_name and --data.backbone.pretrained (library: hf)."
    )


def _model_class(config) -> type:
    transformers = _require_transformers()
    name = MODEL_CLASSES.get(config.model_type)
    if name is None:
        raise ValueError(
            f"Hugging Face model type {config.model_type!r} is not supported; supported types: "
            f"{', '.join(sorted(MODEL_CLASSES))}"
        )
    return getattr(transformers, name)


def hf_config(model_name: str, pretrained: str | None = None):
    """The model's config (from the weights' directory when `pretrained` is one)."""
    transformers = _require_transformers()
    from residual_lightning.backbones.hf_known import TINY_HF

    if model_name in TINY_HF:
        if pretrained is not None:
            raise ValueError(f"{model_name} is a tiny random-weight architecture: set pretrained: null")
        tiny = dict(TINY_HF[model_name])
        return transformers.AutoConfig.for_model(tiny.pop("model_type"), **tiny)
    source = pretrained if pretrained is not None and os.path.isdir(pretrained) else model_name
    revision = None if pretrained is None or os.path.isdir(pretrained) else pretrained
    try:
        return transformers.AutoConfig.from_pretrained(source, revision=revision)
    except OSError as err:
        from residual_lightning.backbones.hf_known import KNOWN_CONFIGS

        known = KNOWN_CONFIGS.get(source)
        if known is None:
            raise _offline_error("config", source, err) from err
        log.info("hub unreachable: planning %s with its published architecture (hf_known.py)", source)
        known = dict(known)
        return transformers.AutoConfig.for_model(known.pop("model_type"), **known)


def hf_model(model_name: str, pretrained: str | None) -> nn.Module:
    """Build the model (random weights from seed 0 when `pretrained` is None), eval, frozen."""
    config = hf_config(model_name, pretrained)
    cls = _model_class(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if pretrained is None:
            model = cls._from_config(config)
        else:
            source = pretrained if os.path.isdir(pretrained) else model_name
            revision = None if os.path.isdir(pretrained) else pretrained
            try:
                model = cls.from_pretrained(source, revision=revision)
            except OSError as err:
                raise _offline_error("weights", source, err) from err
    return model.eval().requires_grad_(False)


def hf_meta_model(model_name: str, pretrained: str | None) -> nn.Module:
    """The model built from its config on the ``meta`` device: shapes only, no weights read."""
    config = hf_config(model_name, pretrained)
    with torch.device("meta"):
        model = _model_class(config)._from_config(config)
    return model.eval()


def _size(value, *keys):
    """A field of an image processor's size dict (a dict or a SizeDict), or None."""
    if value is None:
        return None
    for key in keys:
        got = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        if got is not None:
            return got
    return None


def hf_transform(processor) -> tuple[object, dict]:
    """A torchvision eval transform equivalent to an image processor's config, and that config.

    Follows ``do_convert_rgb``, ``do_resize`` (``shortest_edge`` or ``height``/``width``),
    ``resample``, ``do_center_crop`` (``crop_size``), ``do_rescale`` (``rescale_factor``),
    ``do_normalize`` (``image_mean``, ``image_std``).
    """
    from torchvision import transforms as T

    interp = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
    resample = getattr(processor, "resample", 3)
    resample = int(getattr(resample, "value", resample) if resample is not None else 3)
    mode = getattr(T.InterpolationMode, interp.get(resample, "BICUBIC"))
    steps: list = []
    if getattr(processor, "do_convert_rgb", True) is not False:
        steps.append(T.Lambda(_to_rgb))
    size = getattr(processor, "size", None)
    if getattr(processor, "do_resize", True) and size is not None:
        short = _size(size, "shortest_edge")
        if short is not None:
            steps.append(T.Resize(int(short), interpolation=mode))
        else:
            steps.append(
                T.Resize((int(_size(size, "height")), int(_size(size, "width"))), interpolation=mode)
            )
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop is not None:
        steps.append(T.CenterCrop((int(_size(crop, "height")), int(_size(crop, "width")))))
    steps.append(T.PILToTensor())
    factor = (
        float(getattr(processor, "rescale_factor", 1 / 255))
        if getattr(processor, "do_rescale", True)
        else 1.0
    )
    steps.append(T.Lambda(_Rescale(factor)))
    if getattr(processor, "do_normalize", True):
        steps.append(T.Normalize(list(processor.image_mean), list(processor.image_std)))
    config = {
        "size": str(size),
        "crop": str(crop) if getattr(processor, "do_center_crop", False) else None,
        "resample": resample,
        "rescale": factor,
        "mean": list(getattr(processor, "image_mean", []) or []),
        "std": list(getattr(processor, "image_std", []) or []),
    }
    return T.Compose(steps), config


def _to_rgb(image):
    return image.convert("RGB") if hasattr(image, "convert") else image


class _Rescale:
    """uint8 (C, H, W) -> float32 times a factor (picklable, for DataLoader workers)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float() * self.factor


def load_hf(
    model_name: str, pretrained: str | None, precision: str, device: str | torch.device
) -> tuple[nn.Module, object, object]:
    """(model, eval transform, tokenizer or None) of a Hugging Face backbone, frozen, eval.

    Args:
        model_name: a hub id or a local ``save_pretrained`` directory.
        pretrained: None (random weights from the config), a hub revision, or a local directory.
        precision: ``fp32``, ``fp16`` or ``bf16`` (the weights' dtype).
        device: where to put the model.
    """
    transformers = _require_transformers()
    model = hf_model(model_name, pretrained)
    source = pretrained if pretrained is not None and os.path.isdir(pretrained) else model_name
    revision = None if pretrained is None or os.path.isdir(pretrained) else pretrained
    from residual_lightning.backbones.hf_known import TINY_HF

    if model_name in TINY_HF:
        size = model.config.image_size
        processor = transformers.BitImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    else:
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(source, revision=revision)
        except OSError as err:
            raise _offline_error("image processor", source, err) from err
    tokenizer = None
    if model.config.model_type not in VISION_ONLY:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision)
        except OSError as err:
            raise _offline_error("tokenizer", source, err) from err
    transform, _ = hf_transform(processor)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "pure_fp16": torch.float16}.get(precision)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model, transform, tokenizer

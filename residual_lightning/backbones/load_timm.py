"""Loading timm backbones: architectures by name, weights by tag or local file, and tiny configs.

``library: timm`` takes a timm architecture (``timm.list_models()``, e.g.
``vit_large_patch14_dinov2``) and, as ``pretrained``, a timm pretrained tag (``lvd142m``: the
model ``vit_large_patch14_dinov2.lvd142m``), a local checkpoint file, or None for random weights
(seed 0). The transform is timm's own eval transform from the model's data config. Vision-only:
there is no tokenizer (classifiers default to class-mean prototypes).

`TINY_TIMM` names small random-weight architectures for offline tests and demos.
"""

from __future__ import annotations

import difflib
import os

import torch
from torch import nn

__all__ = ["TINY_TIMM", "load_timm", "timm_model", "timm_preprocess"]

_TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=0)

TINY_TIMM: dict[str, dict] = {
    "RL-Tiny-timm-ViT": dict(_TINY),
    "RL-Tiny-timm-ViT-reg": dict(_TINY, reg_tokens=4, no_embed_class=True, init_values=1e-5),
    "RL-Tiny-timm-ViT-avg": dict(_TINY, global_pool="avg"),
    "RL-Tiny-timm-SigLIP": dict(_TINY, class_token=False, global_pool="map"),
}


def _check(model_name: str) -> None:
    import timm

    if model_name in TINY_TIMM:
        return
    base = model_name.split(".")[0]
    models = timm.list_models()
    if base not in models and not model_name.startswith("hf-hub:"):
        close = difflib.get_close_matches(base, models, n=5, cutoff=0.6)
        raise ValueError(
            f"unknown timm model {model_name!r}"
            + (f". Did you mean: {', '.join(close)}?" if close else "")
            + f" See timm.list_models() ({len(models)} names), or the tiny configs {', '.join(TINY_TIMM)}."
        )


def timm_model(model_name: str, pretrained: str | None) -> nn.Module:
    """Build a timm model (random weights from seed 0 when `pretrained` is None), eval, frozen.

    Raises:
        ValueError: unknown architecture.
        FileNotFoundError: a local checkpoint path that does not exist.
        RuntimeError: weights could not be fetched (offline), naming the local-file alternative.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    _check(model_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if model_name in TINY_TIMM:
            kwargs = TINY_TIMM[model_name]
            model = VisionTransformer(**kwargs)
            size = kwargs["img_size"]
            # No pretrained config of its own: the eval transform resizes straight to the input size.
            model.pretrained_cfg = dict(
                input_size=(3, size, size), crop_pct=1.0, interpolation="bicubic", crop_mode="center"
            )
            if pretrained is not None:
                model.load_state_dict(_read_state(pretrained))
        elif pretrained is None:
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
        elif _is_path(pretrained):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained checkpoint file {pretrained!r} does not exist")
            overlay = dict(file=os.path.abspath(pretrained))
            model = timm.create_model(
                model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay
            )
        else:
            name = (
                model_name if "." in model_name or pretrained == "default" else f"{model_name}.{pretrained}"
            )
            try:
                model = timm.create_model(name, pretrained=True, num_classes=0)
            except (OSError, RuntimeError, ConnectionError) as err:
                raise RuntimeError(
                    f"timm could not fetch the weights of {name!r}: {type(err).__name__}: {err}. The machine "
                    "appears to be offline or the hub unreachable. Download the weights elsewhere and pass "
                    "the file as --data.backbone.pretrained /path/to/model.safetensors (library: timm)."
                ) from err
    return model.eval().requires_grad_(False)


def _is_path(pretrained: str) -> bool:
    return (
        os.path.sep in pretrained
        or os.path.exists(pretrained)
        or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    )


def _read_state(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def timm_preprocess(model: nn.Module) -> tuple[object, dict]:
    """timm's eval transform of a model, and the data config it was made from."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return timm.data.create_transform(**cfg, is_training=False), cfg


def load_timm(
    model_name: str, pretrained: str | None, precision: str, device: str | torch.device
) -> tuple[nn.Module, object, None]:
    """(model, eval transform, None): a timm backbone has no text tower.

    Args:
        model_name: a timm architecture or one of `TINY_TIMM`.
        pretrained: None, a timm pretrained tag, ``default`` (the architecture's default tag) or a
            local checkpoint file.
        precision: ``fp32``, ``fp16`` or ``bf16`` (the weights' dtype); mixed precision is the
            trainer's business.
        device: where to put the model.
    """
    model = timm_model(model_name, pretrained)
    transform, _ = timm_preprocess(model)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "pure_fp16": torch.float16}.get(precision)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model, transform, None

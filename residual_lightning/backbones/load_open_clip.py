"""Loading open_clip backbones: the shipped tiny configs, weights by tag or local file, layouts.

`load_open_clip` builds the model, its eval transform and tokenizer; `open_clip_layout` gives a
model's `UnitLayout` from its config alone (a ViT config), or from the model built on the
``meta`` device (a ``TimmModel`` tower), so no weights are ever built for a layout.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources

import torch
from torch import nn

from residual_lightning.backbones.canonical import UnsupportedModelError
from residual_lightning.contributions import Convention, UnitLayout

__all__ = ["load_open_clip", "open_clip_layout", "register_model_configs"]

_TINY_REGISTERED = False


def register_model_configs() -> list[str]:
    """Register the tiny architectures shipped in `residual_lightning/model_configs` with open_clip.

    Returns the names added (e.g. ``"RL-Tiny-ViT-64"``). Safe to call more than once.
    """
    global _TINY_REGISTERED
    import open_clip

    folder = resources.files("residual_lightning") / "model_configs"
    names = sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))
    if not _TINY_REGISTERED:
        with resources.as_file(folder) as path:
            open_clip.add_model_config(path)
        _TINY_REGISTERED = True
    return names


def _check_name(model_name: str) -> None:
    import open_clip

    register_model_configs()
    models = open_clip.list_models()
    if model_name not in models and not model_name.startswith(("hf-hub:", "local-dir:")):
        close = difflib.get_close_matches(model_name, models, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown open_clip model {model_name!r}.{hint} See open_clip.list_models() for all "
            f"{len(models)} names (or set data.backbone.library to timm or hf)."
        )


def _check_tag(model_name: str, pretrained: str) -> None:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        close = difflib.get_close_matches(pretrained, tags, n=3, cutoff=0.4)
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for {model_name}; valid tags: "
            f"{', '.join(tags) or 'none (use a local checkpoint path)'}"
            + (f". Did you mean: {', '.join(close)}?" if close else "")
        )


def is_local_file(pretrained: str) -> bool:
    """Whether `pretrained` names a local checkpoint (a path) rather than a tag."""
    return (
        os.path.sep in pretrained
        or os.path.exists(pretrained)
        or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    )


def load_open_clip(
    model_name: str, pretrained: str | None, precision: str, device: str | torch.device
) -> tuple[nn.Module, object, object]:
    """(model, eval transform, tokenizer) of an open_clip architecture, frozen, in eval mode.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``) or a shipped tiny config.
        pretrained: None (random weights, seed 0), an open_clip tag, or a local checkpoint file.
        precision: open_clip's precision argument.
        device: where to put the model.

    Raises:
        ValueError: unknown model name or tag (with close matches).
        FileNotFoundError: a local checkpoint path that does not exist.
        RuntimeError: weights could not be fetched (the message says how to use a local file).
    """
    import open_clip

    _check_name(model_name)
    if pretrained is not None:
        if is_local_file(pretrained):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained checkpoint file {pretrained!r} does not exist")
        else:
            _check_tag(model_name, pretrained)
    try:
        # Random weights come from a fixed seed, so that "random" names one set of weights:
        # caches, classifiers and checkpoints made with it stay consistent across processes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, precision=precision, device=device
            )
    except (OSError, RuntimeError, ConnectionError) as err:
        if pretrained is None or os.path.isfile(pretrained):
            raise
        raise RuntimeError(
            f"open_clip could not fetch the weights {model_name}/{pretrained!r}: {type(err).__name__}: "
            f"{err}. The machine appears to be offline or the hub unreachable. Download the checkpoint "
            "elsewhere and pass its local path as `pretrained` (e.g. "
            "--data.backbone.pretrained /path/to/open_clip_model.safetensors)."
        ) from err
    model.eval().requires_grad_(False)
    return model, transform, open_clip.get_tokenizer(model_name)


def open_clip_layout(model_name: str, convention: Convention = "default") -> UnitLayout:
    """The `UnitLayout` of an open_clip model without building weights.

    A ViT tower is read from the config; a ``TimmModel`` tower (SigLIP, EVA02 CLIP) is built on
    the ``meta`` device and read.

    Raises:
        ValueError: unknown model name.
        UnsupportedModelError: a tower that is not a supported ViT.
    """
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5, cutoff=0.5)
        raise ValueError(
            f"unknown open_clip model {model_name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    vision = cfg.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        from residual_lightning.backbones.dispatch import read_model

        with torch.device("meta"):
            model = open_clip.create_model(model_name, pretrained=None, device="meta")
        return read_model(model.eval()).layout(convention)
    layers = vision.get("layers")
    if not isinstance(layers, int):
        raise UnsupportedModelError(f"{model_name} does not have an open_clip ViT vision tower")
    width = vision.get("width", 768)
    head_width = vision.get("head_width", 64)
    return UnitLayout(layers, width // head_width, head_width, cfg["embed_dim"], convention, width=width)

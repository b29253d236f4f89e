"""Loading open_clip backbones: shipped tiny configs, weights, and their identity.

`load_backbone` returns a `Backbone` (the frozen model, its eval transform and tokenizer, and a
stable `weights_id` for cache keys); `BackboneSpec` is what a config names and a checkpoint
records. `layout_from_config` gives a model's `UnitLayout` from its open_clip config alone,
without building weights. Nothing here reads a model's internals: that is `open_clip.py`'s job.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import torch
from torch import nn

from residual_lightning.backbones.canonical import UnsupportedModelError
from residual_lightning.contributions import Convention, UnitLayout

__all__ = [
    "Backbone",
    "BackboneSpec",
    "Precision",
    "file_digest",
    "layout_from_config",
    "load_backbone",
    "register_model_configs",
]

Precision = Literal["fp32", "fp16", "bf16", "amp", "amp_bf16", "pure_fp16", "pure_bf16"]

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


@dataclass
class BackboneSpec:
    """Which backbone to use: what a config names, and what a checkpoint records.

    Attributes:
        model_name: open_clip architecture (``open_clip.list_models()``) or a shipped tiny config.
        pretrained: open_clip tag, local checkpoint path, or None for random weights.
        precision: open_clip precision for loading (``fp32``, ``bf16``, ...).
    """

    model_name: str = "RL-Tiny-ViT-64"
    pretrained: str | None = None
    precision: str = "fp32"

    @property
    def weights_id(self) -> str:
        """Identity of the weights: the tag, ``file-<sha256>`` of a local file, or ``random``."""
        if self.pretrained is None:
            return "random-seed0"
        if os.path.isfile(self.pretrained):
            return f"file-{file_digest(self.pretrained)}"
        return self.pretrained

    def load(self, device: str | torch.device = "cpu") -> Backbone:
        """Load it with `load_backbone`."""
        return load_backbone(self.model_name, self.pretrained, self.precision, device)  # type: ignore[arg-type]


@dataclass
class Backbone:
    """A loaded open_clip model with what is needed to feed and describe it.

    Attributes:
        model: the open_clip model, in eval mode, frozen.
        transform: open_clip's eval preprocessing.
        tokenizer: open_clip's tokenizer for the text tower.
        model_name: the architecture name.
        pretrained: the tag, local path or None (random weights).
        weights_id: a stable identity of the weights (tag, or the checkpoint's sha256 prefix).
    """

    model: nn.Module
    transform: object
    tokenizer: object
    model_name: str
    pretrained: str | None
    weights_id: str


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """First 16 hex digits of a file's sha256 (identifies local checkpoints in cache keys).

    Memoised per (path, size, mtime): cache keys ask for it several times at start-up.
    """
    st = os.stat(path)
    return _file_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def load_backbone(
    model_name: str,
    pretrained: str | None = None,
    precision: Precision = "fp32",
    device: str | torch.device = "cpu",
) -> Backbone:
    """Load an open_clip model, its eval transform and tokenizer.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``), or one of the tiny
            configs this package ships (``RL-Tiny-ViT-64``).
        pretrained: ``None`` for random weights, an open_clip tag (e.g. ``"laion2b_s34b_b88k"``)
            or the path of a local checkpoint file.
        precision: open_clip's precision argument (``"fp32"``, ``"bf16"``, ...).
        device: where to put the model.

    Raises:
        ValueError: unknown model name (with close matches) or unknown pretrained tag.
        RuntimeError: weights could not be fetched (the message says how to use a local file).
    """
    import open_clip

    register_model_configs()
    models = open_clip.list_models()
    if model_name not in models and not model_name.startswith(("hf-hub:", "local-dir:")):
        close = difflib.get_close_matches(model_name, models, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown open_clip model {model_name!r}.{hint} See open_clip.list_models() for all "
            f"{len(models)} names."
        )
    weights_id = "random-seed0"
    if pretrained is not None:
        if (
            os.path.sep in pretrained
            or os.path.exists(pretrained)
            or pretrained.endswith((".pt", ".bin", ".safetensors"))
        ):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained checkpoint file {pretrained!r} does not exist")
            weights_id = f"file-{file_digest(pretrained)}"
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                close = difflib.get_close_matches(pretrained, tags, n=3, cutoff=0.4)
                raise ValueError(
                    f"unknown pretrained tag {pretrained!r} for {model_name}; valid tags: "
                    f"{', '.join(tags) or 'none (use a local checkpoint path)'}"
                    + (f". Did you mean: {', '.join(close)}?" if close else "")
                )
            weights_id = pretrained
    try:
        # Random weights are drawn from a fixed seed, so that "random" names one set of weights:
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
            f"could not fetch the weights {model_name}/{pretrained!r}: {type(err).__name__}: {err}. "
            "The machine appears to be offline or the hub unreachable. Download the checkpoint "
            "elsewhere and pass its local path as `pretrained` (e.g. "
            "--model.backbone.pretrained /path/to/open_clip_model.safetensors)."
        ) from err
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    return Backbone(model, transform, tokenizer, model_name, pretrained, weights_id)


def layout_from_config(model_name: str, convention: Convention = "default") -> UnitLayout:
    """The `UnitLayout` of an open_clip ViT from its config alone (no weights are built).

    Its ``shape`` is ``(L, H, k, D)``, k the compact head width: d, or d + 3 under ``equal_share``.

    Raises:
        ValueError: unknown model, or a config that is not a ViT.
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
    layers = vision.get("layers")
    if not isinstance(layers, int) or "timm_model_name" in vision and vision["timm_model_name"]:
        raise UnsupportedModelError(f"{model_name} does not have an open_clip ViT vision tower")
    width = vision.get("width", 768)
    head_width = vision.get("head_width", 64)
    return UnitLayout(layers, width // head_width, head_width, cfg["embed_dim"], convention, width=width)

"""Backbones of every library behind one type: what a config names, and what a loaded one offers.

`BackboneSpec` is what a config names and a checkpoint records (``library``, ``model_name``,
``pretrained``, ``precision``); `load_backbone` returns a `Backbone`: the frozen model, its eval
transform and tokenizer, a stable `weights_id` for cache keys, and the library-neutral calls the
rest of the framework makes (`Backbone.encode_image`, `Backbone.text_features`,
`Backbone.logit_scale_bias`). `layout_from_config` gives a model's `UnitLayout` without building
weights. The per-library work is in `load_open_clip.py`, `load_timm.py` and `load_hf.py`; nothing
here reads a model's internals (the readers do).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual_lightning.backbones.dispatch import LIBRARIES, model_embedding, read_model
from residual_lightning.backbones.load_open_clip import (
    load_open_clip,
    open_clip_layout,
    register_model_configs,
)
from residual_lightning.contributions import Convention, UnitLayout

__all__ = [
    "Backbone",
    "BackboneSpec",
    "Library",
    "Precision",
    "directory_digest",
    "file_digest",
    "layout_from_config",
    "load_backbone",
    "register_model_configs",
]

Precision = Literal["fp32", "fp16", "bf16", "amp", "amp_bf16", "pure_fp16", "pure_bf16"]
Library = Literal["open_clip", "timm", "hf"]


@dataclass
class BackboneSpec:
    """Which backbone to use: what a config names, and what a checkpoint records.

    Attributes:
        model_name: open_clip: an architecture (``open_clip.list_models()``) or a shipped tiny
            config; timm: an architecture (``timm.list_models()``) or a `TINY_TIMM` name; hf: a hub
            id or a local ``save_pretrained`` directory.
        pretrained: None for random weights (seed 0); open_clip: a tag or a local checkpoint file;
            timm: a pretrained tag (``lvd142m``), ``default`` or a local file; hf: a hub revision
            (``main``) or a local ``save_pretrained`` directory.
        precision: open_clip's precision for loading (``fp32``, ``bf16``, ...); timm and hf use
            ``fp32``/``fp16``/``bf16`` as the weights' dtype.
        library: ``open_clip`` (default), ``timm`` or ``hf`` (the optional extra).
    """

    model_name: str = "RL-Tiny-ViT-64"
    pretrained: str | None = None
    precision: str = "fp32"
    library: Library = "open_clip"

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise ValueError(f"unknown backbone library {self.library!r}; valid: {', '.join(LIBRARIES)}")

    @property
    def weights_id(self) -> str:
        """Identity of the weights: the tag, ``file-``/``dir-<sha256>`` of local files, or ``random``.

        Random weights of an hf model are drawn from its config, so a local config directory
        adds its digest.
        """
        if self.pretrained is None:
            if self.library == "hf" and os.path.isdir(self.model_name):
                return f"random-seed0-config-{directory_digest(self.model_name)}"
            return "random-seed0"
        if os.path.isfile(self.pretrained):
            return f"file-{file_digest(self.pretrained)}"
        if os.path.isdir(self.pretrained):
            return f"dir-{directory_digest(self.pretrained)}"
        return self.pretrained

    @property
    def has_text(self) -> bool:
        """Whether the backbone has a text tower (open_clip: always; timm: never; hf: by model type)."""
        if self.library == "open_clip":
            return True
        if self.library == "timm":
            return False
        from residual_lightning.backbones.load_hf import VISION_ONLY, hf_config

        return hf_config(self.model_name, self.pretrained).model_type not in VISION_ONLY

    @property
    def preprocessing_id(self) -> str:
        """The library and its version: with the model name and weights, they fix the eval transform."""
        return f"{self.library}-eval-{_library_version(self.library)}"

    def load(self, device: str | torch.device = "cpu") -> Backbone:
        """Load it with `load_backbone`."""
        return load_backbone(self.model_name, self.pretrained, self.precision, device, self.library)  # type: ignore[arg-type]

    def layout(self, convention: Convention = "default") -> UnitLayout:
        """`layout_from_config` of this backbone."""
        return layout_from_config(self.model_name, convention, self.library, self.pretrained)


def _library_version(library: str) -> str:
    from importlib.metadata import version

    return version({"open_clip": "open_clip_torch", "timm": "timm", "hf": "transformers"}[library])


@dataclass
class Backbone:
    """A loaded backbone with what is needed to feed and describe it.

    Attributes:
        model: the model, in eval mode, frozen.
        transform: the library's eval preprocessing (a callable on PIL images).
        tokenizer: the text tower's tokenizer, or None for a vision-only model.
        model_name: the architecture name, hub id or directory.
        pretrained: the tag, revision, local path or None (random weights).
        weights_id: a stable identity of the weights (tag, or the files' sha256 prefix).
        library: ``open_clip``, ``timm`` or ``hf``.
    """

    model: nn.Module
    transform: object
    tokenizer: object
    model_name: str
    pretrained: str | None
    weights_id: str
    library: str = "open_clip"

    @property
    def has_text(self) -> bool:
        """Whether the backbone has a text tower (zero-shot text classifiers)."""
        return self.tokenizer is not None

    def encode_image(self, images: Tensor) -> Tensor:
        """(N, D) image embeddings, the ones the decomposition sums to (not normalised)."""
        return model_embedding(self.model, images)

    def text_features(self, texts: list[str]) -> Tensor:
        """(N, D) L2-normalised text embeddings of `texts`.

        Raises:
            ValueError: a vision-only backbone (use class-mean prototypes).
        """
        if not self.has_text:
            raise ValueError(
                f"{self.library} backbone {self.model_name!r} has no text tower: use class-mean "
                "prototypes (--model.classifier prototypes, the default for vision-only backbones)"
            )
        device = next(self.model.parameters()).device
        if self.library == "hf":
            from residual_lightning.backbones.hf_text import hf_text_features

            feats = hf_text_features(self.model, self.tokenizer, texts)
        else:
            feats = self.model.encode_text(self.tokenizer(texts).to(device))
        return F.normalize(feats.float(), dim=-1)

    def logit_scale_bias(self) -> tuple[float, float | None]:
        """The model's logit scale and bias (SigLIP's sigmoid logits have a bias; CLIP's do not).

        Vision-only backbones: (100.0, None), the scale the prototype classifier uses.
        """
        if self.library == "hf" and self.has_text:
            from residual_lightning.backbones.hf_text import hf_logit_scale_bias

            return hf_logit_scale_bias(self.model)
        scale = getattr(self.model, "logit_scale", None)
        bias = getattr(self.model, "logit_bias", None)
        return (
            float(scale.exp()) if scale is not None else 100.0,
            float(bias) if bias is not None else None,
        )

    def canonical(self):
        """The model's `CanonicalViT` (`residual_lightning.backbones.dispatch.read_model`)."""
        return read_model(self.model)


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


def directory_digest(path: str) -> str:
    """First 16 hex digits of a sha256 over a directory's files (relative names and contents)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0" + file_digest(full).encode())
    return h.hexdigest()[:16]


def load_backbone(
    model_name: str,
    pretrained: str | None = None,
    precision: Precision = "fp32",
    device: str | torch.device = "cpu",
    library: Library = "open_clip",
) -> Backbone:
    """Load a backbone of any library with its eval transform and tokenizer.

    Args:
        model_name: see `BackboneSpec.model_name`.
        pretrained: see `BackboneSpec.pretrained`.
        precision: see `BackboneSpec.precision`.
        device: where to put the model.
        library: ``open_clip``, ``timm`` or ``hf``.

    Raises:
        ValueError: unknown library, model name (with close matches) or pretrained tag.
        FileNotFoundError: a local checkpoint that does not exist.
        RuntimeError: weights could not be fetched (the message names the library, the tag and the
            local-file alternative).
    """
    spec = BackboneSpec(model_name, pretrained, precision, library)  # validates the library
    if library == "open_clip":
        model, transform, tokenizer = load_open_clip(model_name, pretrained, precision, device)
    elif library == "timm":
        from residual_lightning.backbones.load_timm import load_timm

        model, transform, tokenizer = load_timm(model_name, pretrained, precision, device)
    else:
        from residual_lightning.backbones.load_hf import load_hf

        model, transform, tokenizer = load_hf(model_name, pretrained, precision, device)
    return Backbone(model, transform, tokenizer, model_name, pretrained, spec.weights_id, library)


def layout_from_config(
    model_name: str,
    convention: Convention = "default",
    library: Library = "open_clip",
    pretrained: str | None = None,
) -> UnitLayout:
    """The `UnitLayout` of a backbone without building its weights.

    open_clip ViTs are read from their config; every other model is built on the ``meta``
    device (shapes only, no memory, no weights read) and read by its reader. Memoised.

    Its ``shape`` is ``(L, H, k, D)``, k the compact head width: d, or d + 3 under ``equal_share``.

    Raises:
        ValueError: unknown model.
        UnsupportedModelError: a model that is not a supported ViT.
    """
    return _layout(model_name, convention, library, pretrained)


@functools.lru_cache(maxsize=64)
def _layout(model_name: str, convention: str, library: str, pretrained: str | None) -> UnitLayout:
    if library == "open_clip":
        return open_clip_layout(model_name, convention)
    if library == "timm":
        from residual_lightning.backbones.load_timm import timm_model

        with torch.device("meta"):
            model = timm_model(model_name, None)
    elif library == "hf":
        from residual_lightning.backbones.load_hf import hf_meta_model

        model = hf_meta_model(model_name, pretrained)
    else:
        raise ValueError(f"unknown backbone library {library!r}; valid: {', '.join(LIBRARIES)}")
    return read_model(model).layout(convention)

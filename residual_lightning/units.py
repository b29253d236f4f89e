"""Residual units of a ViT and the exact decomposition of its image embedding: the public facade.

`decompose` splits `encode_image(x)` into the direct contributions of its residual units, read
where the pooled embedding is read (the CLS token, or the mean of the patch tokens):

    emb        what enters block 0 (`ln_pre` of the token embeddings)
    l{l}.mlp   the MLP of block l
    l{l}.h{h}  head h of block l's attention (its slice of `out_proj` applied to its output)

Letters used across the package: N images, U units (1 + L + L*H), L layers (`resblocks`),
H heads per layer, T tokens, W transformer width, d head width (W / H), D output embedding
size, K principal components, C classes.

The work is done in `residual_lightning.backbones`: a reader per library (open_clip, timm, Hugging
Face; `backbones/dispatch.py` picks it) describes the tower as a `CanonicalViT`, and the engine
(`backbones/engine.py`) decomposes that description; loading lives in `backbones/loading.py`.
This module keeps the names callers import, and every function here accepts any supported model
object (an open_clip CLIP or its tower, a timm ViT or Eva, a Hugging Face CLIP/BLIP/DINOv2/ViT/SigLIP).

The final LayerNorm is linear once each image's statistics (mean and sigma of the pooled stream)
are frozen, so the unit contributions sum to `encode_image(x)` exactly. Two conventions place the
LayerNorm's constant terms (see docs/units.md):

- ``"default"``: each unit is centred by its own feature mean and every constant (LayerNorm beta,
  each layer's `out_proj` bias) is folded into `emb`. A head's contribution is then
  ``A[l, h] @ y[n, l, h]`` with a fixed D x d map A and ``y = a / sigma`` its d-dim attention
  output over the image's sigma, so K = d components hold all of it.
- ``"equal_share"``: the authors' split: the mean term and beta are shared equally, 1/(2L+1) per
  emb/MLP unit and 1/((2L+1)H) per head, and each layer's `out_proj` bias is split over its heads.
  A head then spans up to d + 2 directions; its compact coordinates gain three entries
  ``[1/sigma, mean/sigma, 1]`` so the same ``A @ y`` form stays exact.

The compact form (`residual_lightning.contributions.Contributions`, with the layout and the unit
names) is what the activation cache stores: heads as y (N, L, H, k), MLPs and emb already in D.
`Contributions.expand` turns it back into (N, U, D).
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from residual_lightning.backbones.canonical import UnsupportedModelError
from residual_lightning.backbones.dispatch import read_model
from residual_lightning.backbones.engine import decompose_compact as _decompose_canonical
from residual_lightning.backbones.loading import (
    Backbone,
    BackboneSpec,
    Precision,
    file_digest,
    layout_from_config,
    load_backbone,
    register_model_configs,
)
from residual_lightning.contributions import (
    CONVENTIONS,
    EQUAL_SHARE_EXTRA,
    Contributions,
    Convention,
    UnitContributions,
    UnitLayout,
    expand,
)

__all__ = [
    "CONVENTIONS",
    "EQUAL_SHARE_EXTRA",
    "Backbone",
    "BackboneSpec",
    "Contributions",
    "Convention",
    "Precision",
    "UnitContributions",
    "UnitLayout",
    "UnsupportedModelError",
    "decompose",
    "decompose_compact",
    "expand",
    "file_digest",
    "layout_from_config",
    "load_backbone",
    "register_model_configs",
    "unit_layout",
    "unit_names",
]


def unit_layout(model: nn.Module) -> UnitLayout:
    """Describe the residual units of an open_clip CLIP model or its `.visual`.

    Args:
        model: any supported model (`residual_lightning.backbones.dispatch.read_model`).

    Raises:
        UnsupportedModelError: naming the class or option that is not supported.
    """
    return read_model(model).layout()


def unit_names(model: nn.Module) -> list[str]:
    """The U = 1 + L + L*H unit names, in the authors' order.

    ``"emb"``, then ``"l{l}.mlp"`` for every layer, then ``"l{l}.h{h}"`` layer-major, so that
    weights learned by the authors' code map one to one.

    Args:
        model: any supported model (`residual_lightning.backbones.dispatch.read_model`).
    """
    return unit_layout(model).names


def decompose_compact(model: nn.Module, images: Tensor, convention: Convention = "default") -> Contributions:
    """Decompose `encode_image(images)` into the compact form the cache stores.

    One forward pass through the frozen tower; only the readout tokens of each unit are kept.
    Works under `torch.autocast` and `torch.inference_mode`; outputs are float32.

    Args:
        model: any supported model (`residual_lightning.backbones.dispatch.read_model`), in eval mode.
        images: (N, 3, S, S) preprocessed images.
        convention: ``"default"`` or ``"equal_share"`` (see the module docstring).

    Raises:
        UnsupportedModelError: for models that cannot be decomposed exactly.
        ValueError: for an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    return _decompose_canonical(read_model(model), images, convention)


def decompose(model: nn.Module, images: Tensor, convention: Convention = "default") -> UnitContributions:
    """Decompose `encode_image(images)` into the direct contributions of every residual unit.

    ``result.contributions.sum(1)`` equals the model's embedding (`backbones.dispatch.model_embedding`:
    ``encode_image`` for open_clip, not normalised) to float32 rounding.

    Args:
        model: any supported model (`residual_lightning.backbones.dispatch.read_model`), in eval mode.
        images: (N, 3, S, S) preprocessed images.
        convention: ``"default"`` (constants folded into emb, heads of rank <= d) or
            ``"equal_share"`` (the authors' split).
    """
    compact = decompose_compact(model, images, convention)
    return UnitContributions(contributions=compact.expand(), names=compact.names)


def CompactContributions(  # noqa: N802 (the old class name, kept for one release)
    heads: Tensor,
    mlps: Tensor,
    emb: Tensor,
    head_maps: Tensor,
    names: list[str],
    convention: str = "default",
    extra: dict | None = None,
) -> Contributions:
    """Deprecated: build a `Contributions` (this was its own class before 0.2)."""
    warnings.warn(
        "CompactContributions is deprecated and will be removed in the next release: use "
        "residual_lightning.contributions.Contributions (keyword head_maps=, names=)",
        DeprecationWarning,
        stacklevel=2,
    )
    return Contributions(
        heads, mlps, emb, head_maps=head_maps, names=names, convention=convention, extra=extra or {}
    )

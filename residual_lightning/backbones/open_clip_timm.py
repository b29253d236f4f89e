"""Reader: an open_clip model with a timm vision tower (``TimmModel``) as a `CanonicalViT`.

open_clip's ``TimmModel`` (vision config ``timm_model_name``: EVA-CLIP, EVA02-CLIP, PE-Core,
SigLIP, MobileCLIP-B, ...) is a timm ``trunk`` followed by open_clip's ``head``; its forward is
``head(trunk(x))``, with ``trunk(x)`` = ``trunk.head(trunk.forward_head(trunk.forward_features(x),
pre_logits=True))``. The embedding read is ``model.encode_image(x)`` (not normalised). Read:

- the trunk, by its own reader: timm's ``VisionTransformer`` by `read_timm`, timm's ``Eva`` by
  `read_timm_eva` (the readout they return, whatever its pooling, is passed through);
- the projections after the pre-logits features, composed into the readout's ``proj`` (W, D) and
  ``proj_bias``: the trunk's classifier ``trunk.head`` (an ``nn.Linear`` when open_clip builds the
  trunk with ``num_classes=embed_dim``, ``timm_proj`` None/''; else ``nn.Identity``) and the
  head's ``proj`` ``nn.Linear`` (``timm_proj='linear'``, with or without ``timm_proj_bias``), its
  ``drop`` dropout being inactive in eval mode. A single linear map is used as the model's own
  tensor (a view: ``weight.T``, ``bias``); two are multiplied out.

Refused with `UnsupportedModelError` naming the class or layer: a ``.visual`` that is not
open_clip's ``TimmModel`` (use `read_open_clip` for open_clip's own ``VisionTransformer``), any
trunk other than timm's ``VisionTransformer`` and ``Eva`` (``vitamin``, ``fastvit``, ...) and what
their readers refuse, the head's attention poolers ``pool`` (``timm_pool`` ``'abs_attn'``/
``'rot_attn'``), the ``'mlp'`` projection (``timm_proj='mlp'``), a trunk classifier that is not a
Linear, and any other head layer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from residual_lightning.backbones.canonical import CanonicalViT, Readout, UnsupportedModelError

__all__ = ["is_supported_open_clip_timm", "read_open_clip_timm"]

_HEAD_CHILDREN = {"drop", "proj"}


def _visual(model: nn.Module) -> nn.Module:
    return model.visual if hasattr(model, "visual") else model


def _read_trunk(trunk: nn.Module) -> CanonicalViT:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if type(trunk) is VisionTransformer:
        from residual_lightning.backbones.timm import read_timm

        return read_timm(trunk)
    if type(trunk) is Eva:
        from residual_lightning.backbones.timm_eva import read_timm_eva

        return read_timm_eva(trunk)
    raise UnsupportedModelError(
        f"TimmModel.trunk is {type(trunk).__module__}.{type(trunk).__name__}; "
        "only timm's VisionTransformer and Eva trunks are supported"
    )


def _linears(visual: nn.Module) -> list[nn.Linear]:
    """The linear maps after the trunk's pre-logits features, in order (none, one or two)."""
    out = []
    classifier = visual.trunk.head
    if isinstance(classifier, nn.Linear):
        out.append(classifier)
    elif not isinstance(classifier, nn.Identity):
        raise UnsupportedModelError(
            f"TimmModel.trunk.head is {type(classifier).__name__}, not a Linear classifier or Identity"
        )
    head = visual.head
    if type(head) is not nn.Sequential:
        raise UnsupportedModelError(
            f"TimmModel.head is {type(head).__name__}, not open_clip's nn.Sequential head"
        )
    names = [name for name, _ in head.named_children()]
    if "pool" in names:
        raise UnsupportedModelError(
            f"TimmModel.head.pool is {type(head.pool).__name__} (timm_pool 'abs_attn'/'rot_attn' attention "
            "pooling); not supported"
        )
    if "mlp" in names:
        raise UnsupportedModelError(
            "TimmModel.head.mlp (timm_proj='mlp', a nonlinear projection) is not supported"
        )
    unknown = set(names) - _HEAD_CHILDREN
    if unknown:
        raise UnsupportedModelError(f"TimmModel.head has unknown layers {sorted(unknown)}")
    if "drop" in names and type(head.drop) is not nn.Dropout:
        raise UnsupportedModelError(f"TimmModel.head.drop is {type(head.drop).__name__}, not nn.Dropout")
    if "proj" in names:
        if type(head.proj) is not nn.Linear:
            raise UnsupportedModelError(f"TimmModel.head.proj is {type(head.proj).__name__}, not nn.Linear")
        out.append(head.proj)
    if list(names) not in ([], ["drop", "proj"], ["proj"]):
        raise UnsupportedModelError(f"TimmModel.head has layers {names} in an unsupported order")
    return out


def _compose(readout: Readout, linears: list[nn.Linear]) -> Readout:
    """The readout followed by the linear maps: ``proj`` (W, D), ``proj_bias`` (D,) or None."""
    proj, bias = readout.proj, readout.proj_bias  # (W, D0), (D0,)
    for linear in linears:
        weight = linear.weight.T  # (D0, D1)
        identity = proj.shape[0] == proj.shape[1] and (
            proj.is_meta  # a layout-only read (meta device): shapes are all that matter
            or torch.equal(proj, torch.eye(proj.shape[0], dtype=proj.dtype, device=proj.device))
        )
        proj = weight if identity else proj @ weight.to(proj.dtype)  # (W, D1): the model's tensor when it can
        if bias is not None:
            bias = bias.to(weight.dtype) @ weight
        if linear.bias is not None:
            bias = linear.bias if bias is None else bias + linear.bias
    return dataclasses.replace(readout, proj=proj, proj_bias=bias)


def read_open_clip_timm(model: nn.Module) -> CanonicalViT:
    """Describe an open_clip model's ``TimmModel`` vision tower as a `CanonicalViT`.

    ``read_open_clip_timm(model).forward(x)`` is ``model.encode_image(x)`` (``model.visual(x)`` for
    a bare tower). The description shares the model's tensors and modules; the model must be in
    eval mode.

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP`` whose ``.visual`` is
            `open_clip.timm_model.TimmModel`, or that ``TimmModel`` itself.

    Raises:
        UnsupportedModelError: naming the class, option or layer that is not supported.
    """
    from open_clip.timm_model import TimmModel

    visual = _visual(model)
    if type(visual) is not TimmModel:
        raise UnsupportedModelError(
            f"cannot read a vision tower of class {type(visual).__module__}.{type(visual).__name__}; "
            "only open_clip.timm_model.TimmModel"
        )
    linears = _linears(visual)
    trunk = _read_trunk(visual.trunk)
    readout = _compose(trunk.readout, linears)
    return CanonicalViT(
        trunk.embed, trunk.blocks, readout, library="open_clip", name=f"TimmModel({trunk.name})"
    )


def is_supported_open_clip_timm(model: nn.Module) -> bool:
    """Whether `read_open_clip_timm` can read `model` (no exception raised)."""
    try:
        read_open_clip_timm(model)
    except UnsupportedModelError:
        return False
    return True

"""Which reader describes a model, and what "the embedding" of each family is.

`read_model` hands any supported model object to its library's reader (by the class's module,
then strictly by class inside the reader); `model_embedding` computes the embedding the
decomposition of that model sums to, with the library's own forward:

==============================  ======================================================
family                          the embedding
==============================  ======================================================
open_clip CLIP (ViT towers,     ``model.encode_image(x)`` (not normalised)
TimmModel towers)
timm VisionTransformer, Eva     ``model.forward_head(model.forward_features(x), pre_logits=True)``
Hugging Face (CLIP, BLIP,       `residual_lightning.backbones.hf.hf_image_features`
DINOv2, ViT, SigLIP)
==============================  ======================================================

Readers are imported lazily: a library that is not installed (``transformers`` is the optional
``hf`` extra) costs nothing until one of its models is met.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual_lightning.backbones.canonical import CanonicalViT, UnsupportedModelError

__all__ = ["LIBRARIES", "SUPPORTED", "library_of", "model_embedding", "read_model"]

LIBRARIES: tuple[str, ...] = ("open_clip", "timm", "hf")

SUPPORTED = (
    "open_clip CLIP/CustomTextCLIP with a VisionTransformer or a TimmModel (timm ViT/Eva) tower; "
    "timm VisionTransformer and Eva; Hugging Face CLIPModel, CLIPVisionModelWithProjection, "
    "BlipForImageTextRetrieval, Dinov2Model, Dinov2WithRegistersModel, ViTModel, SiglipModel, "
    "SiglipVisionModel"
)


def library_of(model: nn.Module) -> str:
    """``open_clip``, ``timm`` or ``hf``, from the module that defines the model's class.

    Raises:
        UnsupportedModelError: a class from any other library, naming it and the supported families.
    """
    module = type(model).__module__
    for prefix, library in (("open_clip", "open_clip"), ("timm", "timm"), ("transformers", "hf")):
        if module == prefix or module.startswith(prefix + "."):
            return library
    raise UnsupportedModelError(
        f"cannot decompose a model of class {module}.{type(model).__name__}; supported: {SUPPORTED}"
    )


def _is_open_clip_timm(model: nn.Module) -> bool:
    visual = getattr(model, "visual", model)
    return type(visual).__module__.startswith("open_clip") and type(visual).__name__ == "TimmModel"


def read_model(model: nn.Module) -> CanonicalViT:
    """The `CanonicalViT` of any supported model (open_clip, timm or Hugging Face), in eval mode.

    Raises:
        UnsupportedModelError: naming the class, option or attribute that is not supported.
    """
    library = library_of(model)
    if library == "open_clip":
        if _is_open_clip_timm(model):
            from residual_lightning.backbones.open_clip_timm import read_open_clip_timm

            return read_open_clip_timm(model)
        from residual_lightning.backbones.open_clip import read_open_clip

        return read_open_clip(model)
    if library == "timm":
        from timm.models.eva import Eva

        if isinstance(model, Eva):
            from residual_lightning.backbones.timm_eva import read_timm_eva

            return read_timm_eva(model)
        from residual_lightning.backbones.timm import read_timm

        return read_timm(model)
    from residual_lightning.backbones.hf import read_hf

    return read_hf(model)


def model_embedding(model: nn.Module, images: Tensor) -> Tensor:
    """The image embedding (N, D) the decomposition of `model` sums to, by the library's own forward.

    Args:
        model: a supported model (see `read_model`), in eval mode.
        images: (N, C, S, S) preprocessed images.
    """
    library = library_of(model)
    if library == "open_clip":
        if hasattr(model, "encode_image"):
            return model.encode_image(images)
        return model(images)  # a bare vision tower
    if library == "timm":
        dtype = next(model.parameters()).dtype
        x = images.to(dtype) if not torch.is_autocast_enabled() else images
        return model.forward_head(model.forward_features(x), pre_logits=True)
    from residual_lightning.backbones.hf import hf_image_features

    return hf_image_features(model, images)

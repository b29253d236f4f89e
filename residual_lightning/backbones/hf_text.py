"""Text embeddings and logit scales of transformers image-text models, for zero-shot classifiers.

The text side of the families `backbones/hf.py` reads (transformers 5.x):

- ``CLIPModel``: ``get_text_features(input_ids, attention_mask).pooler_output`` (5.x returns a
  ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the *projected* EOS-token state),
  tokenised with ``padding=True``; logit scale ``logit_scale.exp()``, no bias.
- ``BlipForImageTextRetrieval``: the contrastive (ITC) path of its own ``forward(...,
  use_itm_head=False)``: ``text_proj(text_encoder(input_ids, attention_mask).last_hidden_state[:,
  0])``, tokenised with ``padding=True``. transformers' retrieval model carries no temperature (the
  original BLIP's learnt ``temp`` is not converted; its ``use_itm_head=False`` output is the plain
  cosine): the scale is ``1 / model.temp`` when the model has one, else
  ``exp(config.logit_scale_init_value)`` = 1 / 0.07 (BLIP's initial ``temp``); no bias.
- ``SiglipModel``: ``get_text_features(input_ids).pooler_output``, tokenised with
  ``padding="max_length"`` (as SigLIP was trained) and *without* an attention mask: SigLIP's text
  tower attends over the padding and pools the last position (the model card's recipe; 5.x's
  ``SiglipTokenizer`` returns an ``attention_mask``, which is dropped); logit scale
  ``logit_scale.exp()`` and bias ``logit_bias``.

Vision-only models (``Dinov2Model``, ``Dinov2WithRegistersModel``, ``ViTModel``,
``CLIPVisionModel*``, ``SiglipVisionModel``) raise `UnsupportedModelError`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from residual_lightning.backbones.canonical import UnsupportedModelError

__all__ = ["TEXT_HF_CLASSES", "hf_logit_scale_bias", "hf_text_features"]

TEXT_HF_CLASSES = ("CLIPModel", "BlipForImageTextRetrieval", "SiglipModel")


def _family(model: nn.Module) -> str:
    import transformers

    for name in TEXT_HF_CLASSES:
        cls = getattr(transformers, name, None)
        if cls is not None and type(model) is cls:
            return name
    cls = type(model).__name__
    raise UnsupportedModelError(
        f"{type(model).__module__}.{cls} has no text tower this module reads "
        f"(vision-only or unsupported); text families: {', '.join(TEXT_HF_CLASSES)}"
    )


def hf_text_features(model: nn.Module, tokenizer, texts: list[str]) -> Tensor:
    """Unnormalised text embeddings (N, D) of `texts`, in the image embedding's space.

    Args:
        model: a ``CLIPModel``, ``BlipForImageTextRetrieval`` or ``SiglipModel`` in eval mode.
        tokenizer: the model's tokenizer.
        texts: N strings (e.g. class prompts).

    Raises:
        UnsupportedModelError: a vision-only or unsupported model.
    """
    family = _family(model)
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a str")
    device = next(model.parameters()).device
    if family == "SiglipModel":
        enc = tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
        out = model.get_text_features(input_ids=enc["input_ids"].to(device))
        return out if isinstance(out, Tensor) else out.pooler_output
    enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if family == "CLIPModel":
        out = model.get_text_features(input_ids=ids, attention_mask=mask)
        return out if isinstance(out, Tensor) else out.pooler_output
    hidden = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, W)
    return model.text_proj(hidden[:, 0])


def hf_logit_scale_bias(model: nn.Module) -> tuple[float, float | None]:
    """(scale, bias) of the model's image-text logits ``scale * cos + bias`` (bias None if absent).

    CLIP: ``logit_scale.exp()``; SigLIP: ``logit_scale.exp()``, ``logit_bias``; BLIP retrieval:
    ``1 / temp`` or, as transformers' checkpoints carry no ``temp``,
    ``exp(config.logit_scale_init_value)`` (1 / 0.07).

    Raises:
        UnsupportedModelError: a vision-only or unsupported model.
    """
    family = _family(model)
    with torch.no_grad():
        if family == "CLIPModel":
            return float(model.logit_scale.exp()), None
        if family == "SiglipModel":
            return float(model.logit_scale.exp()), float(model.logit_bias)
        temp = getattr(model, "temp", None)
        if temp is not None:
            return float(1.0 / temp), None
        return math.exp(float(model.config.logit_scale_init_value)), None

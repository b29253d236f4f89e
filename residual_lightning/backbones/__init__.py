"""Backbones of every library through one decomposition engine.

A reader per library turns a vision tower into a `CanonicalViT` (`canonical.py`), the
library-neutral description of a pre-norm ViT; `engine.py` decomposes that description exactly
into unit contributions. Readers: `open_clip.py` (``nn.MultiheadAttention`` and open_clip's own
``Attention`` blocks, 3.x and 4.x), `open_clip_timm.py` (open_clip ``TimmModel`` towers: SigLIP,
EVA02 CLIP), `timm.py` (timm ``VisionTransformer``: class-token, average and MAP readouts,
registers, LayerScale, qk-norm), `timm_eva.py` (timm ``Eva``: RoPE, SwiGLU), `hf.py` (Hugging
Face CLIP, BLIP, DINOv2, ViT, SigLIP; `hf_text.py` their text towers). `dispatch.py` picks the
reader of a model object. Loading: `loading.py` (`BackboneSpec`, `Backbone`), with
`load_open_clip.py`, `load_timm.py` and `load_hf.py`. See docs/backbones.md.
"""

from __future__ import annotations

from residual_lightning.backbones.canonical import (
    Attention,
    Block,
    CanonicalViT,
    Embed,
    MapPool,
    Readout,
    UnsupportedModelError,
)
from residual_lightning.backbones.dispatch import library_of, model_embedding, read_model
from residual_lightning.backbones.engine import decompose, decompose_compact
from residual_lightning.backbones.open_clip import is_supported, read_open_clip
from residual_lightning.backbones.timm import is_supported_timm, read_timm

__all__ = [
    "Attention",
    "Block",
    "CanonicalViT",
    "Embed",
    "MapPool",
    "Readout",
    "UnsupportedModelError",
    "decompose",
    "decompose_compact",
    "is_supported",
    "is_supported_timm",
    "library_of",
    "model_embedding",
    "read_model",
    "read_open_clip",
    "read_timm",
]

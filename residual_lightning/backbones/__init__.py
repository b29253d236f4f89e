"""Backbones through one decomposition engine.

A reader per library turns a vision tower into a `CanonicalViT` (`canonical.py`), the
library-neutral description of a pre-norm ViT; `engine.py` decomposes that description exactly
into unit contributions. Readers: `open_clip.py` (``nn.MultiheadAttention`` and open_clip's own
``Attention`` blocks), `timm.py` (timm's ``VisionTransformer``: class-token or average readouts,
register tokens, LayerScale, qk-norm). `loading.py` loads open_clip backbones (`BackboneSpec`).
"""

from __future__ import annotations

from residual_lightning.backbones.canonical import Attention, Block, CanonicalViT, Embed, Readout
from residual_lightning.backbones.engine import decompose, decompose_compact
from residual_lightning.backbones.open_clip import is_supported, read_open_clip
from residual_lightning.backbones.timm import is_supported_timm, read_timm

__all__ = [
    "Attention",
    "Block",
    "CanonicalViT",
    "Embed",
    "Readout",
    "decompose",
    "decompose_compact",
    "is_supported",
    "is_supported_timm",
    "read_open_clip",
    "read_timm",
]

"""Small helpers the backbone engine tests share (imported as `tests.backbones.engine_helpers`)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``|a - b| / |b|`` (Frobenius norms)."""
    return ((a - b).norm() / b.norm()).item()


def images(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    """n random (3, size, size) images from a fixed seed."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pre_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm model's pre-logits embedding, the one the timm readers decompose."""
    return model.forward_head(model.forward_features(x), pre_logits=True)

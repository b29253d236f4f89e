"""The batch the trainable model consumes: cached unit contributions in compact coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CachedBatch:
    """A batch of cached contributions (see `residual_lightning.units.CompactContributions`).

    The image embedding is ``emb + mlps.sum(1) + einsum("lhdk,nlhk->nd", head_maps, heads)``,
    where ``head_maps`` (L, H, D, k) is fixed per cache and lives in the model as a buffer.

    Attributes:
        heads: (N, L, H, k) head coordinates y.
        mlps: (N, L, D) MLP contributions.
        emb: (N, D) embedding contribution (with the folded constants).
        label: (N,) class indices.
    """

    heads: Tensor
    mlps: Tensor
    emb: Tensor
    label: Tensor

    def to(self, *args, **kwargs) -> CachedBatch:
        """Move/cast the float tensors (labels keep their dtype but follow the device)."""
        device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        return CachedBatch(
            heads=self.heads.to(*args, **kwargs),
            mlps=self.mlps.to(*args, **kwargs),
            emb=self.emb.to(*args, **kwargs),
            label=self.label.to(device) if device is not None else self.label,
        )

    def float(self) -> CachedBatch:
        """Float32 copy of the contributions (caches store float16 by default)."""
        return CachedBatch(self.heads.float(), self.mlps.float(), self.emb.float(), self.label)

    def __len__(self) -> int:
        return self.label.shape[0]

    def pin_memory(self) -> CachedBatch:
        """Pinned copy, so DataLoader(pin_memory=True) works with this type."""
        return CachedBatch(
            self.heads.pin_memory(), self.mlps.pin_memory(), self.emb.pin_memory(), self.label.pin_memory()
        )


def embedding(batch: CachedBatch, head_maps: Tensor) -> Tensor:
    """The backbone's image embedding (N, D) recomposed from a batch, exactly."""
    heads = torch.einsum("lhdk,nlhk->nd", head_maps.to(batch.heads.dtype), batch.heads)  # (N, D)
    return batch.emb + batch.mlps.sum(1) + heads

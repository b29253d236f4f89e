"""Units of a cache by name: which units a spec names, and their (n, D) contributions one at a time.

Unit names: ``emb``, ``l<l>.mlp`` and ``l<l>.h<h>`` (0-based layer and head).

Letters: N samples, L layers, H heads per layer, k compact head coordinates, D embedding size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["unit_contributions", "unit_names"]

from residual_lightning.contributions import UnitLayout


def unit_names(spec: str | None, layers: int, heads: int) -> list[str]:
    """Unit names from ``heads``, ``mlps``, ``all`` or a comma-separated list of names.

    Args:
        spec: ``heads`` (also for None or empty), ``mlps``, ``all`` (emb, the MLPs, then the
            heads) or names such as ``l3.h1,l0.mlp`` (kept in the given order).
        layers: L.
        heads: H.

    Raises:
        ValueError: a name that is not a unit of an (L, H) model.
    """
    layout = UnitLayout(layers, heads, 1, 1)  # only the names matter here
    if spec in (None, "", "heads"):
        return layout.head_names
    if spec in ("mlps", "all"):
        return layout.select(spec)
    names = [u.strip() for u in spec.split(",") if u.strip()]
    bad = []
    for u in names:
        try:
            layout.parse(u)
        except ValueError:
            bad.append(u)
    if bad:
        raise ValueError(
            f"unknown unit(s) {bad}; valid: emb, l<0..{layers - 1}>.mlp, l<l>.h<0..{heads - 1}>, heads, mlps, all"
        )
    return names


def unit_contributions(
    cache: Any, max_samples: int | None = None, seed: int = 0, units: Sequence[str] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """(name, (n, D) contributions) of every unit of a seeded subsample of a cache, one at a time.

    Only the subsample's compact coordinates are held; each head is expanded (``y @ A^T``) when
    its turn comes, so memory stays O(n * (L*k + L*D)).

    Args:
        cache: an `ActivationCache`.
        max_samples: subsample size (seeded, sorted indices); None uses every sample.
        seed: seed of the subsample.
        units: unit names to yield, in this order; None yields emb, the MLPs, then the heads.
    """
    n = len(cache)
    if max_samples is not None and max_samples < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
        batch = cache.batch(np.sort(idx.numpy()))
    else:
        batch = cache.batch(slice(0, n))
    maps = cache.head_maps.float()  # (L, H, D, k)
    layers, heads = maps.shape[:2]
    layout = UnitLayout(layers, heads, 1, 1)  # only the names matter here
    for name in layout.names if units is None else units:
        ref = layout.parse(name)
        if ref.kind == "emb":
            yield name, batch.emb.float()
        elif ref.kind == "mlp":
            yield name, batch.mlps[:, ref.layer].float()  # (n, D)
        else:
            yield name, batch.heads[:, ref.layer, ref.head].float() @ maps[ref.layer, ref.head].T  # (n, D)

"""SOMP: simultaneous orthogonal matching pursuit of a unit's samples over a text bank (method.md §4).

SOMP (Tropp et al. 2006), as the ResiDual authors use it: greedily add the bank atom whose
correlations with the current residuals of all samples have the largest l1 norm (summed
|<r_n, b>|), refit all samples on the selected atoms by least squares, update the residuals.
k = 10 to explain a unit, 64 to ablate it. `somp_descriptions` runs it on units of a cache and
returns table rows like TextSpan's `head_descriptions`.

Letters: N samples, D embedding size, M descriptions, k picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from residual_lightning.analysis.bank import prepare_bank as _prepare_bank
from residual_lightning.analysis.contributions import unit_contributions

__all__ = ["somp", "somp_descriptions"]


def somp(
    contributions: Tensor | np.ndarray,
    text_bank: Tensor | np.ndarray,
    k: int = 10,
    center: bool = True,
    criterion: Literal["l1", "l2"] = "l1",
) -> list[tuple[int, float]]:
    """Simultaneous orthogonal matching pursuit of a unit's samples over a text bank.

    Each step adds the atom b maximising ``sum_n |<r_n, b>|`` (``criterion="l1"``, the authors'
    default) or ``sum_n <r_n, b>^2`` (``"l2"``) over the residuals r_n, refits every sample on
    the selected atoms by least squares and recomputes the residuals. Only the (N, M) matrix of
    correlations is kept: the residual correlations are ``X B^T - (X B_S^T) G_S^+ (B_S B^T)``
    with ``G_S = B_S B_S^T``, so nothing (N, D) is updated.

    Args:
        contributions: (N, D) contributions of one unit.
        text_bank: (M, D) text embeddings (rows L2-normalised here; not centred).
        k: number of atoms (10 to explain a unit, 64 to ablate it).
        center: subtract the samples' mean first (the fractions are then of the unit's variance).
        criterion: ``"l1"`` or ``"l2"`` norm of an atom's correlations across samples.

    Returns:
        ``(bank index, fraction of variance explained after this step)`` per pick, in picking
        order; the fractions are cumulative and non-decreasing.
    """
    if criterion not in ("l1", "l2"):
        raise ValueError(f"unknown criterion {criterion!r}; valid: l1, l2")
    x = torch.as_tensor(contributions).detach().double().cpu()
    if x.ndim != 2:
        raise ValueError(f"contributions must be an (N, D) matrix, got {tuple(x.shape)}")
    bank = _prepare_bank(text_bank, center=False)  # (M, D)
    if bank.shape[1] != x.shape[1]:
        raise ValueError(f"bank has D={bank.shape[1]}, contributions D={x.shape[1]}")
    if center:
        x = x - x.mean(0)
    total = float((x * x).sum())
    if total <= 0:
        return []
    xb = x @ bank.T  # (N, M) correlations of the samples with every atom
    gram = bank @ bank.T  # (M, M)
    residual = xb
    chosen: list[int] = []
    picks: list[tuple[int, float]] = []
    for _ in range(min(int(k), bank.shape[0])):
        scores = residual.abs().sum(0) if criterion == "l1" else (residual * residual).sum(0)  # (M,)
        scores[chosen] = -torch.inf
        chosen.append(int(scores.argmax()))
        g_inv = torch.linalg.pinv(gram[chosen][:, chosen], hermitian=True)  # (s, s)
        xs = xb[:, chosen]  # (N, s)
        residual = xb - xs @ (g_inv @ gram[chosen])  # (N, M)
        explained = float(torch.trace(g_inv @ (xs.T @ xs))) / total
        picks.append((chosen[-1], min(explained, 1.0)))
    return picks


def somp_descriptions(
    cache: Any,
    bank: Tensor,
    descriptions: Sequence[str],
    k: int = 10,
    units: Sequence[str] | None = None,
    max_samples: int | None = 5000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """SOMP descriptions of units of a cache, as table rows like `head_descriptions`.

    SOMP works on the samples themselves, so it reads a seeded subsample of the cache
    (`unit_contributions`) instead of streamed moments.

    Args:
        cache: an `ActivationCache`.
        bank: (M, D) text embeddings of `descriptions` (`encode_bank`).
        descriptions: the M descriptions, in the bank's order.
        k: descriptions per unit.
        units: unit names; None means emb, the MLPs, then the heads.
        max_samples: samples of the subsample; None uses all.
        seed: seed of the subsample.

    Returns:
        One dict per pick with keys unit, rank (1-based), index, description, share (what this
        pick added) and cumulative (fraction of the unit's variance explained so far).
    """
    rows: list[dict[str, Any]] = []
    for unit, x in unit_contributions(cache, max_samples, seed, units=units):
        previous = 0.0
        for r, (index, explained) in enumerate(somp(x, bank, k=k)):
            rows.append(
                {
                    "unit": unit,
                    "rank": r + 1,
                    "index": index,
                    "description": descriptions[index],
                    "share": explained - previous,
                    "cumulative": explained,
                }
            )
            previous = explained
    return rows

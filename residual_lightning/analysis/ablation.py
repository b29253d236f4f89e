"""Head ablations on cached contributions: keep some heads, zero or mean-replace the others.

The image embedding is rebuilt from a cache as ``emb + sum of MLPs + kept heads`` (plus the means
of the removed heads with ``replace="mean"``) and classified with the text classifier, in logit
space: ``z . w_c`` is linear in the units, so per-head logits (N, L, H, C) are computed once per
cache batch and every keep mask is a weighted sum of them. With ``keep_rest=False`` (the ResiDual
authors' ablation) emb and the MLPs are removed too, so only the kept heads survive. The selection
curve built on it is `selection.py`.

Letters: N samples, L layers, H heads per layer, k compact head coordinates, D embedding size,
C classes, Q keep masks.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["Replace", "ablate", "ablation_accuracy", "head_means", "top_k_mask"]

Replace = Literal["zero", "mean"]
# Largest per-batch intermediate, in elements (2**25 float64 = 256 MiB): per-head logits are
# (n, L, H, C), which for ImageNet's 1000 classes bounds a batch to a few hundred samples.
_MAX_ELEMENTS = 2**25


def rows_per_read(batch_size: int, per_row: int) -> int:
    """Samples per cache read so that an (n, per_row) intermediate stays under `_MAX_ELEMENTS`."""
    return max(1, min(batch_size, _MAX_ELEMENTS // max(per_row, 1)))


def classifier_weights(classifier: Tensor | tuple[Tensor, float]) -> Tensor:
    """(C, D) classifier weights from a tensor or a ``(weights, logit_scale)`` pair."""
    w = classifier[0] if isinstance(classifier, tuple | list) else classifier
    w = torch.as_tensor(w)
    if w.ndim != 2:
        raise ValueError(f"classifier must be a (C, D) matrix, got shape {tuple(w.shape)}")
    return w


@torch.no_grad()
def head_means(cache: Any, batch_size: int = 4096, with_rest: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """(L, H, D) mean contribution of every head over a cache (the ``mean`` replacement).

    Args:
        cache: an `ActivationCache`.
        batch_size: samples per cache read.
        with_rest: also return the (D,) mean of emb + MLPs (replaces them under ``keep_rest=False``).
    """
    total, rest, n = None, None, 0
    for batch in cache.iter_batches(batch_size):
        s = batch.heads.double().sum(0)  # (L, H, k)
        r = (batch.emb.double() + batch.mlps.double().sum(1)).sum(0)  # (D,)
        total, rest = (s, r) if total is None else (total + s, rest + r)
        n += len(batch)
    if not n:
        raise ValueError("the cache is empty")
    heads = torch.einsum("lhdk,lhk->lhd", cache.head_maps.double(), total / n)  # (L, H, D)
    return (heads, rest / n) if with_rest else heads


@torch.no_grad()
def ablation_accuracy(
    cache: Any,
    classifier: Tensor | tuple[Tensor, float],
    keep: Tensor,
    replace: Replace = "zero",
    means: Tensor | None = None,
    batch_size: int = 2048,
    dtype: torch.dtype = torch.float64,
    keep_rest: bool = True,
    rest_mean: Tensor | None = None,
) -> Tensor:
    """Accuracies of many keep masks at once: ``emb + MLPs + kept heads (+ removed heads' means)``.

    Args:
        cache: an `ActivationCache` (the TEST part for a selection curve).
        classifier: (C, D) classifier, or a ``(weights, logit_scale)`` pair.
        keep: (Q, L, H) or (L, H) boolean masks of the heads to keep.
        replace: ``"zero"`` drops the other heads, ``"mean"`` replaces each by its mean.
        means: (L, H, D) head means for ``"mean"``; None computes them on `cache` itself.
        batch_size: samples per cache read.
        dtype: compute dtype (float64 keeps exact ties away).
        keep_rest: keep emb and the MLPs (the project); False removes them like the other heads
            (the authors: only the kept heads survive).
        rest_mean: (D,) mean of emb + MLPs replacing them with ``"mean"`` and ``keep_rest=False``;
            None computes it on `cache`.

    Returns:
        (Q,) accuracies (a 0-dim tensor for a single (L, H) mask).
    """
    if replace not in ("zero", "mean"):
        raise ValueError(f"unknown replace={replace!r}; valid: zero, mean")
    maps = cache.head_maps.to(dtype)  # (L, H, D, k)
    layers, heads = maps.shape[:2]
    single = keep.ndim == 2
    keep = torch.as_tensor(keep).bool().reshape(-1, layers, heads).to(dtype)  # (Q, L, H)
    w = classifier_weights(classifier).to(dtype)  # (C, D)
    head_logit_maps = torch.einsum("lhdk,cd->lhkc", maps, w)  # (L, H, k, C)
    offset = torch.zeros(keep.shape[0], w.shape[0], dtype=dtype)  # (Q, C)
    if replace == "mean":
        if means is None or (not keep_rest and rest_mean is None):
            computed, computed_rest = head_means(cache, with_rest=True)
            means = computed if means is None else means
            rest_mean = computed_rest if rest_mean is None else rest_mean
        mean_logits = means.to(dtype) @ w.T  # (L, H, C)
        offset = torch.einsum("qlh,lhc->qc", 1.0 - keep, mean_logits)
        if not keep_rest:
            offset = offset + rest_mean.to(dtype) @ w.T  # (Q, C): emb and MLPs at their means
    correct = torch.zeros(keep.shape[0], dtype=torch.float64)
    n = 0
    rows = rows_per_read(batch_size, max(layers * heads, keep.shape[0]) * w.shape[0])
    for batch in cache.iter_batches(rows):
        base = (batch.emb.to(dtype) + batch.mlps.to(dtype).sum(1)) @ w.T if keep_rest else 0.0  # (n, C)
        per_head = torch.einsum("nlhk,lhkc->nlhc", batch.heads.to(dtype), head_logit_maps)  # (n, L, H, C)
        logits = base + torch.einsum("qlh,nlhc->qnc", keep, per_head) + offset[:, None]  # (Q, n, C)
        correct += (logits.argmax(-1) == batch.label).double().sum(1)
        n += len(batch)
    acc = correct / max(n, 1)
    return acc[0] if single else acc


def ablate(
    cache: Any,
    classifier: Tensor | tuple[Tensor, float],
    keep: Tensor,
    replace: Replace = "zero",
    means: Tensor | None = None,
) -> float:
    """Accuracy with only the `keep` heads (the others zeroed or replaced by their means).

    Args:
        cache: an `ActivationCache`.
        classifier: (C, D) classifier, or a ``(weights, logit_scale)`` pair.
        keep: (L, H) boolean mask of the heads to keep.
        replace: ``"zero"`` or ``"mean"``.
        means: (L, H, D) head means for ``"mean"``; None computes them on `cache`.

    Returns:
        The accuracy, in [0, 1].
    """
    return float(ablation_accuracy(cache, classifier, torch.as_tensor(keep), replace, means))


def top_k_mask(score: Tensor, k: int) -> Tensor:
    """(L, H) mask of the k highest-scoring heads; ties go to the earlier head (layer-major).

    Args:
        score: (L, H) scores.
        k: heads to keep.
    """
    flat = score.reshape(-1)
    order = torch.sort(-flat, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(score.shape)

"""Spectral cosine similarity between the PCA bases of two residual units (method.md §4).

Given orthonormal bases X (k_x, D) and Y (k_y, D) (principal components in rows) with explained
variances w_x, w_y, the similarity is built from

    M = |X Y^T| * (w_x w_y^T / ||diag(w_x w_y^T)||_2)

where diag of the k_x x k_y outer product is its main diagonal (w_x[i] * w_y[i] for
i < min(k_x, k_y)), as in the authors' `normalized_spectral_cosine` (Flegyas/ResiDual). The
largest entry of M is taken min(k_x, k_y) times, each time removing its row and column (a greedy
matching of components), and the score is the L2 norm of the taken entries. Two equal bases score
1; since the weights are scale-free (only w_x w_y^T over its diagonal norm enters), explained
variances and explained-variance ratios give the same score.

`unit_similarity` applies it to the units of a model (or of two models on the same layout) from
their learned bases, `layer_similarity` averages it over pairs of heads per pair of layers.
`similarity_bases` picks the bases two data modules are compared with: each config's PCA
reference set, or (the authors, `--recipe paper`) each dataset's own train split.

Letters: K principal components, D embedding size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from residual_lightning.data.bases import load_or_fit_bases

__all__ = [
    "greedy_matching",
    "layer_similarity",
    "similarity_bases",
    "similarity_matrix",
    "spectral_cosine_similarity",
    "truncate_basis",
    "unit_basis",
    "unit_similarity",
]


def _vector(w: Tensor | np.ndarray, name: str) -> Tensor:
    w = torch.as_tensor(w, dtype=torch.float64)
    if w.ndim != 1:
        raise ValueError(f"{name} must be a vector, got shape {tuple(w.shape)}")
    return w


def greedy_matching(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy one-to-one matching: repeatedly take the largest entry and remove its row and column.

    Ties go to the first entry in row-major order. The result can differ from the optimal
    assignment; it is the matching the authors use.

    Args:
        scores: (k_x, k_y) matrix of non-negative scores.

    Returns:
        rows, cols and values of the min(k_x, k_y) taken entries, in the order they were taken.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be a matrix, got shape {tuple(scores.shape)}")
    work = scores.detach().clone().double()
    k_x, k_y = work.shape
    k = min(k_x, k_y)
    rows = torch.empty(k, dtype=torch.long)
    cols = torch.empty(k, dtype=torch.long)
    values = torch.empty(k, dtype=torch.float64)
    for i in range(k):
        flat = int(torch.argmax(work))  # first maximum in row-major order
        r, c = divmod(flat, k_y)
        rows[i], cols[i], values[i] = r, c, work[r, c]
        work[r, :] = -torch.inf
        work[:, c] = -torch.inf
    return rows, cols, values


def spectral_cosine_similarity(
    X: Tensor | np.ndarray,
    Y: Tensor | np.ndarray,
    wx: Tensor | np.ndarray,
    wy: Tensor | np.ndarray,
) -> float:
    """Spectral cosine similarity of two weighted orthonormal bases (method.md §4).

    The score is in [0, 1] when each weight vector is sorted in decreasing order, as PCA
    explained variances are: by the rearrangement inequality no matching of components has a
    larger weight norm than the diagonal used for the normalisation. It is invariant to the signs
    of the components and symmetric in (X, wx) <-> (Y, wy).

    Args:
        X: (k_x, D) orthonormal components in rows, e.g. a PCA basis cut by `truncate_basis`.
        Y: (k_y, D) orthonormal components in rows.
        wx: (k_x,) weights of X's components (explained variances or their ratios).
        wy: (k_y,) weights of Y's components.

    Returns:
        The L2 norm of the greedily matched entries of the weighted |X Y^T|.
    """
    X = torch.as_tensor(X, dtype=torch.float64)
    Y = torch.as_tensor(Y, dtype=torch.float64, device=X.device)
    wx = _vector(wx, "wx").to(X.device)
    wy = _vector(wy, "wy").to(X.device)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"X and Y must be (k, D) with the same D, got {tuple(X.shape)} and {tuple(Y.shape)}")
    if wx.numel() != X.shape[0] or wy.numel() != Y.shape[0]:
        raise ValueError(
            f"one weight per component expected: {wx.numel()} for {X.shape[0]}, {wy.numel()} for {Y.shape[0]}"
        )
    weights = torch.outer(wx, wy)  # (k_x, k_y)
    diag_norm = torch.linalg.vector_norm(torch.diagonal(weights))  # over min(k_x, k_y) entries
    if diag_norm <= 0:
        raise ValueError("the diagonal of wx wy^T is zero: the normalisation is undefined")
    m = (X @ Y.T).abs() * (weights / diag_norm)  # (k_x, k_y)
    _, _, taken = greedy_matching(m)
    # The authors divide once more by the diagonal norm of the already normalised weights, i.e. by 1.
    return float(torch.linalg.vector_norm(taken))


def truncate_basis(
    components: Tensor | np.ndarray,
    explained_variance: Tensor | np.ndarray,
    threshold: float = 0.9,
    *,
    total_variance: float | None = None,
    explained_variance_ratio: Tensor | np.ndarray | None = None,
) -> tuple[Tensor, Tensor]:
    """Cut a PCA basis at the smallest K whose cumulative explained-variance ratio exceeds threshold.

    The ratio is explained_variance_ratio when given, else explained_variance / total_variance,
    else explained_variance / explained_variance.sum() (right only when the basis is complete,
    e.g. all d components of a head). When no prefix exceeds threshold the whole basis is kept
    (the authors' `argmax` would return K = 1 there).

    Args:
        components: (K_all, D) components in rows, by decreasing variance.
        explained_variance: (K_all,) variances of the components.
        threshold: cumulative ratio to exceed, in (0, 1].
        total_variance: total variance of the data, when the basis is itself truncated.
        explained_variance_ratio: (K_all,) per-component ratios (not cumulative); overrides
            total_variance.

    Returns:
        components[:K] (K, D) and explained_variance[:K] (K,).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    components = torch.as_tensor(components)
    variance = torch.as_tensor(explained_variance, device=components.device)
    if components.ndim != 2 or variance.ndim != 1 or variance.numel() != components.shape[0]:
        raise ValueError(
            f"expected (K, D) components and (K,) variances, got {tuple(components.shape)} and {tuple(variance.shape)}"
        )
    if explained_variance_ratio is not None:
        ratio = _vector(explained_variance_ratio, "explained_variance_ratio").to(components.device)
        if ratio.numel() != variance.numel():
            raise ValueError("explained_variance_ratio must have one entry per component")
    else:
        total = float(variance.double().sum()) if total_variance is None else float(total_variance)
        if total <= 0:
            raise ValueError("the total variance must be positive")
        ratio = variance.double() / total
    cumulative = torch.cumsum(ratio, dim=0)
    k = min(int((cumulative <= threshold).sum()) + 1, variance.numel())
    return components[:k], variance[:k]


def similarity_matrix(
    bases: Sequence[tuple[Tensor | np.ndarray, Tensor | np.ndarray]],
    threshold: float | None = None,
) -> Tensor:
    """Spectral cosine similarity of every pair of bases.

    Args:
        bases: (components (K_i, D), explained variances (K_i,)) per unit.
        threshold: when given, each basis is first cut with `truncate_basis` at this threshold
            (its variances summing to the total); None uses the bases as they are.

    Returns:
        (n, n) float64 symmetric matrix; entry (i, j) compares bases i and j.
    """
    if threshold is not None:
        bases = [truncate_basis(c, w, threshold) for c, w in bases]
    n = len(bases)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = spectral_cosine_similarity(
                bases[i][0], bases[j][0], bases[i][1], bases[j][1]
            )
    return out


def unit_basis(bases: Any, unit: str, threshold: float = 0.9) -> tuple[Tensor, Tensor]:
    """A unit's learned PCA components, cut at `threshold` of its explained variance.

    Args:
        bases: `UnitBases` (e.g. ``ResidualDataModule.bases()``).
        unit: unit name (``l3.h1``, ``l3.mlp``, ``emb``).
        threshold: cumulative explained-variance ratio to exceed (see `truncate_basis`).

    Returns:
        (K, D) components and (K,) explained variances.
    """
    b = bases.unit(unit)
    m = b.mask  # components above the unit's numerical rank
    return truncate_basis(
        b.components[m],
        b.explained_variance[m],
        threshold,
        explained_variance_ratio=b.explained_variance_ratio[m],
    )


def unit_similarity(
    bases: Any, units: Sequence[str], threshold: float = 0.9, bases2: Any = None
) -> tuple[Tensor, list[int]]:
    """Spectral cosine similarity of units' cut PCA bases, within one model or across two.

    Args:
        bases: `UnitBases` of the first model/dataset.
        units: unit names, the rows (and columns) of the matrix.
        threshold: cumulative explained variance each basis is cut at (`unit_basis`).
        bases2: `UnitBases` of a second model/dataset with the same units, or None. With it,
            entry (i, j) compares unit i of `bases` with unit j of `bases2` (the diagonal: the
            same unit on both); without, the matrix is symmetric with ones on the diagonal.

    Returns:
        (n, n) float64 matrix and the number of components kept per unit of `bases`.
    """
    cut_a = [unit_basis(bases, u, threshold) for u in units]
    cut_b = cut_a if bases2 is None else [unit_basis(bases2, u, threshold) for u in units]
    n = len(units)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i if bases2 is None else 0, n):
            s = spectral_cosine_similarity(cut_a[i][0], cut_b[j][0], cut_a[i][1], cut_b[j][1])
            matrix[i, j] = s
            if bases2 is None:
                matrix[j, i] = s
    return matrix, [int(c[0].shape[0]) for c in cut_a]


def layer_similarity(
    matrix: Tensor, units: Sequence[str], cross: bool = False
) -> tuple[list[int], Tensor, list[dict[str, Any]]]:
    """Mean similarity over pairs of heads, per pair of layers.

    Args:
        matrix: (n, n) similarities of `unit_similarity`.
        units: its unit names (non-head units are skipped).
        cross: the matrix compares two models (`bases2`): every pair counts, the diagonal too;
            within one model a head is not paired with itself.

    Returns:
        The layers (sorted), their (n_layers, n_layers) float64 mean matrix (NaN where a pair of
        layers has no head pair) and its rows (layer_a, layer_b, pairs, mean_similarity).
    """
    head_idx = [(i, int(u[1:].split(".")[0])) for i, u in enumerate(units) if ".h" in u]
    layer_ids = sorted({layer for _, layer in head_idx})
    rows: list[dict[str, Any]] = []
    means = torch.full((len(layer_ids), len(layer_ids)), float("nan"), dtype=torch.float64)
    for a, la in enumerate(layer_ids):
        for b, lb in enumerate(layer_ids):
            vals = [
                float(matrix[i, j])
                for i, li in head_idx
                if li == la
                for j, lj in head_idx
                if lj == lb and (cross or i != j)
            ]
            if vals:
                means[a, b] = sum(vals) / len(vals)
                rows.append(
                    {"layer_a": la, "layer_b": lb, "pairs": len(vals), "mean_similarity": means[a, b].item()}
                )
    return layer_ids, means, rows


def _train_bases(dm):
    """PCA bases of every unit fitted on the data module's own train split (keyed file, reused)."""
    if dm.reference == "train":
        return dm.bases()
    key = dm.key("train", dm.preprocessing())
    return load_or_fit_bases(
        dm.cache_dir / f"bases-{key.digest()}.safetensors",
        asdict(key),
        lambda: dm.caches["train"],
        dm.convention,
        "train",
        dm.on_mismatch,
        0,
        1,
    )


def similarity_bases(dm, dm2=None, bases_from: Literal["reference", "train"] = "reference"):
    """The two sides' PCA bases for `similarity`.

    Args:
        dm: first data module (prepared).
        dm2: second data module, or None.
        bases_from: ``reference`` (each config's PCA reference set, as its fits use) or ``train``
            (each dataset's own train split, the authors' cross-dataset comparison).

    Returns:
        The bases of `dm` and of `dm2` (None without it).

    Raises:
        ValueError: two different datasets whose bases would both come from the same reference
            set (e.g. ImageNet): every unit would only be compared with itself.
    """
    if bases_from not in ("reference", "train"):
        raise ValueError(f"unknown bases_from {bases_from!r}; valid: reference, train")
    if bases_from == "train":
        return _train_bases(dm), (_train_bases(dm2) if dm2 is not None else None)
    if dm2 is not None and dm.dataset != dm2.dataset and dm.bases_path() == dm2.bases_path():
        raise ValueError(
            f"--config and --config2 ({dm.dataset} vs {dm2.dataset}) both fit their PCA bases on the "
            f"same {dm.reference!r} reference set, so every unit would be compared with itself (score 1); "
            "compare each dataset's own train split with --recipe paper, or set data.reference: train"
        )
    return dm.bases(), (dm2.bases() if dm2 is not None else None)

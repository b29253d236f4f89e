"""Intrinsic dimension of residual units: linear (PCA) ID and the TwoNN estimator.

Method.md §4: for every unit the linear ID is the smallest K whose cumulative explained variance
exceeds 0.99, and the nonlinear ID is TwoNN (Facco et al., Sci. Rep. 2017): with r1, r2 the
distances of a point to its first and second nearest neighbours, mu = r2 / r1 follows a Pareto law
with shape equal to the ID, so -log(1 - F(mu)) = ID * log(mu); the ID is the slope of a
least-squares line through the origin fitted on the smallest 90% of the ratios.

`twonn` follows scikit-dimension's `skdim.id.TwoNN` (method='linear') in the fitted quantities: the
N ratios are sorted, the n = int(N * fraction) smallest are kept, and the i-th kept ratio
(1-based) gets F_emp = i / N (N counts all ratios, kept or not). It differs in how the neighbours
are found: torch, matmul-based distances in row chunks (memory O(chunk * N), never N x N; each
pair computed once), on the data's device, after projecting numerically low-rank data onto its
span. A CLIP head contribution has rank <= d = 64 inside D = 512, so the neighbour search there
costs 8x fewer FLOPs.

Letters: N points, D ambient dimension, r numerical rank, K principal components.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from residual_lightning.contributions import parse_unit

__all__ = ["PAPER_ID", "id_profile", "layer_profile", "linear_id", "pca_spectrum", "twonn"]

# Elements of one chunk of the distance matrix (chunk rows x N): 2**24 float32 = 64 MiB. Big
# enough for efficient matmuls (838 rows at N = 20,000), small next to the data on any device.
_CHUNK_ELEMENTS = 2**24
# At most this many coordinates (after the low-rank projection), a CPU search uses a k-d tree
# (scipy's cKDTree, exact): O(N log N) instead of the O(N^2) blocks, e.g. a rank-6 head.
_KDTREE_MAX_RANK = 10
# Rows of x upcast to float64 at a time when accumulating the covariance: 2**20 elements = 8 MiB.
_COV_CHUNK_ELEMENTS = 2**20


def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, D) matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.double()
    return x


def _covariance(x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Float64 mean (D,) and scatter matrix (D, D) of x, accumulated in row chunks (no float64 copy of x)."""
    n, dim = x.shape
    mean = x.sum(dim=0, dtype=torch.float64) / n  # (D,)
    scatter = torch.zeros(dim, dim, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_size):
        xc = x[start : start + chunk_size].double() - mean  # (c, D)
        scatter.addmm_(xc.T, xc)
    return mean, scatter


def pca_spectrum(x: Tensor | np.ndarray) -> Tensor:
    """Variances along the principal axes of x, in float64, largest first.

    Uses the D x D covariance when N > D and the N x N Gram matrix otherwise; both have the same
    non-zero eigenvalues. Divides by N - 1 like sklearn's `explained_variance_`.

    Args:
        x: (N, D) samples in rows.

    Returns:
        (min(N, D),) float64 tensor of explained variances, non-negative, descending.
    """
    x = _as_tensor(x)
    n, dim = x.shape
    if n < 2:
        raise ValueError("need at least 2 samples for a PCA")
    if n > dim:
        _, scatter = _covariance(x, chunk_size=max(1, _COV_CHUNK_ELEMENTS // dim))
    else:
        xc = x.double() - x.double().mean(dim=0)  # (N, D)
        scatter = xc @ xc.T  # (N, N) Gram matrix
    evals = torch.linalg.eigvalsh(scatter).flip(0).clamp_min(0.0)
    return evals / (n - 1)


def linear_id(x: Tensor | np.ndarray, threshold: float = 0.99) -> int:
    """Linear intrinsic dimension: the smallest K whose cumulative explained variance ratio exceeds threshold.

    Args:
        x: (N, D) samples in rows.
        threshold: fraction of the total variance that K components must exceed, in (0, 1).

    Returns:
        K, between 1 and min(N, D); 0 for data with no variance at all.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    variances = pca_spectrum(x)
    total = variances.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(variances, dim=0) / total
    # Rounding can leave the last cumulative ratio a hair below a threshold close to 1.
    return min(int((cumulative <= threshold).sum()) + 1, variances.numel())


def _principal_basis(x: Tensor, rank_tol: float) -> Tensor | None:
    """(D, r) float64 orthonormal basis of the principal directions of x with variance above
    rank_tol * the largest; None when that is all of R^D (or x has no variance)."""
    _, scatter = _covariance(x, chunk_size=max(1, _COV_CHUNK_ELEMENTS // x.shape[1]))
    evals, evecs = torch.linalg.eigh(scatter)  # ascending
    keep = evals > rank_tol * evals[-1]
    rank = int(keep.sum())
    return evecs[:, keep] if 0 < rank < x.shape[1] else None


def _project(x: Tensor, mean: Tensor, basis: Tensor) -> tuple[Tensor, float]:
    """Float64 coordinates (N, r) of x - mean in an orthonormal basis (D, r), and the variance left outside it."""
    n, dim = x.shape
    coords = torch.empty(n, basis.shape[1], dtype=torch.float64, device=x.device)
    residual = 0.0
    chunk = max(1, _COV_CHUNK_ELEMENTS // dim)
    for start in range(0, n, chunk):
        xc = x[start : start + chunk].double() - mean  # (c, D)
        y = xc @ basis  # (c, r)
        res = xc - y @ basis.T  # (c, D)
        residual += float((res * res).sum())
        coords[start : start + chunk] = y
    return coords, residual / (n - 1)


def _span_coordinates(x: Tensor, dtype: torch.dtype, rank_tol: float, low_rank: bool) -> Tensor:
    """Centred coordinates of x in the compute dtype, projected onto the data's span when it is low-rank.

    The projection onto the principal directions with non-negligible variance is an isometry on
    the span, so pairwise distances are unchanged; only directions whose variance is below
    rank_tol * the largest (float rounding of an exactly low-rank input) are dropped. The float64
    covariance of all N rows is the costly step, so an evenly spread subset of 4D rows is tried
    first: a subset's scatter matrix is dominated by the full one's, so a full-rank subset proves x
    full-rank, and a low-rank subset's basis is kept only if all rows leave less than
    rank_tol * the top variance outside it.
    """
    n, dim = x.shape
    mean = x.sum(dim=0, dtype=torch.float64) / n  # (D,)
    if low_rank and n > dim:
        m = min(n, 4 * dim)
        sub = x if m == n else x[(torch.arange(m, device=x.device) * n) // m]  # (m, D)
        basis = _principal_basis(sub, rank_tol)
        if basis is not None and (m == n or 2 * basis.shape[1] <= dim):
            coords, residual = _project(x, mean, basis)
            if m == n or residual <= rank_tol * float(coords.var(dim=0).max()):
                return coords.to(dtype)  # (N, r)
        if basis is not None and m < n:
            basis = _principal_basis(x, rank_tol)
            if basis is not None:
                return _project(x, mean, basis)[0].to(dtype)  # (N, r)
    # Centring keeps the ||a||^2 + ||b||^2 - 2ab trick away from cancellation.
    return x.to(dtype) - mean.to(dtype)  # (N, D)


def _merge_two_smallest(
    best_v: Tensor, best_i: Tensor, new_v: Tensor, new_i: Tensor
) -> tuple[Tensor, Tensor]:
    """Two smallest of (best, new) per row; all inputs (m, 2)."""
    values = torch.cat([best_v, new_v], dim=1)  # (m, 4)
    index = torch.cat([best_i, new_i], dim=1)  # (m, 4)
    top_v, pos = values.topk(2, dim=1, largest=False)
    return top_v, index.gather(1, pos)


def _two_nearest_kdtree(y: Tensor) -> Tensor:
    """(N, 2) indices of the two nearest other rows of a CPU tensor y of few columns (exact, k-d tree).

    Each row is queried for 3 neighbours and itself is dropped (with duplicate rows it need not
    come first), keeping the first two others in distance order.
    """
    from scipy.spatial import cKDTree

    points = y.double().numpy()
    _, idx = cKDTree(points).query(points, k=3)  # (N, 3), nearest first
    others = idx != np.arange(len(points))[:, None]  # (N, 3)
    order = np.argsort(~others, axis=1, kind="stable")[:, :2]  # the first two that are not the row
    return torch.from_numpy(np.take_along_axis(idx, order, axis=1)).long()


def _two_nearest(y: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Distances (N,), (N,) from every row of y to its first and second nearest other rows, and
    the (N, 2) indices of those rows.

    Squared distances come from ||a||^2 + ||b||^2 - 2ab, one block of chunk_size rows at a time.
    Symmetry halves the matmuls: the block of rows [s, s + c) is compared with columns [s, N) only,
    its own lower triangle masked so each pair is seen once, and each pair updates the running two
    nearest of both its row and its column. The two distances returned are recomputed from
    coordinate differences, free of the trick's cancellation (exact duplicates give exactly 0).
    On a CPU with at most `_KDTREE_MAX_RANK` columns the neighbours come from a k-d tree instead.
    """
    n = y.shape[0]
    if y.device.type == "cpu" and y.shape[1] <= _KDTREE_MAX_RANK and n >= 3:
        return _distances(y, _two_nearest_kdtree(y), chunk_size)
    sq_norms = (y * y).sum(dim=1, keepdim=True)  # (N, 1)
    ones = torch.ones_like(sq_norms)
    # [a, ||a||^2, 1] . [-2b, 1, ||b||^2] = ||a - b||^2: one matmul writes the block, no extra
    # passes over it (a broadcast bias plus an in-place add were twice as slow on CPU).
    right = torch.cat([-2.0 * y, ones, sq_norms], dim=1)  # (N, r + 2)
    best_v = torch.full((n, 2), math.inf, dtype=y.dtype, device=y.device)
    best_i = torch.zeros((n, 2), dtype=torch.long, device=y.device)
    for start in range(0, n, chunk_size):
        c = min(chunk_size, n - start)
        stop = start + c
        left = torch.cat([y[start:stop], sq_norms[start:stop], ones[start:stop]], dim=1)  # (c, r + 2)
        block = left @ right[start:].T  # (c, N - start)
        lower = torch.ones(c, c, dtype=torch.bool, device=y.device).tril()  # self and pairs seen as (j, i)
        block[:, :c].masked_fill_(lower, math.inf)
        row_v, row_i = block.topk(2, dim=1, largest=False)  # (c, 2)
        best_v[start : start + c], best_i[start : start + c] = _merge_two_smallest(
            best_v[start : start + c], best_i[start : start + c], row_v, row_i + start
        )
        col_v, col_i = block.topk(2, dim=0, largest=False)  # (2, N - start)
        best_v[start:], best_i[start:] = _merge_two_smallest(
            best_v[start:], best_i[start:], col_v.T, col_i.T + start
        )
    return _distances(y, best_i, chunk_size)


def _distances(y: Tensor, best_i: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """r1, r2 (N,) from each row of y to its two neighbours ``best_i`` (N, 2), recomputed from
    coordinate differences and sorted per row, and ``best_i`` in that order (updated in place)."""
    n = y.shape[0]
    r1 = torch.empty(n, dtype=y.dtype, device=y.device)
    r2 = torch.empty(n, dtype=y.dtype, device=y.device)
    for start in range(0, n, chunk_size):
        idx = best_i[start : start + chunk_size]  # (c, 2)
        c = idx.shape[0]
        neighbours = y.index_select(0, idx.reshape(-1)).view(c, 2, -1)  # (c, 2, r)
        diff = y[start : start + c, None, :] - neighbours  # (c, 2, r)
        dist = (diff * diff).sum(dim=-1).sqrt()  # (c, 2); faster than .norm(dim=-1) on CPU
        dist, pos = dist.sort(dim=1)  # exact recomputation may swap near-ties
        r1[start : start + c] = dist[:, 0]
        r2[start : start + c] = dist[:, 1]
        best_i[start : start + c] = idx.gather(1, pos)
    return r1, r2, best_i


def _exact_distances(x: Tensor, neighbours: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Float64 distances (N,), (N,) of every row of x to its two given neighbours, from x itself."""
    n = x.shape[0]
    out = torch.empty(n, 2, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_size):
        idx = neighbours[start : start + chunk_size]  # (c, 2)
        c = idx.shape[0]
        diff = x[start : start + c, None, :].double() - x.index_select(0, idx.reshape(-1)).double().view(
            c, 2, -1
        )
        out[start : start + c] = (diff * diff).sum(-1).sqrt()  # (c, 2)
    out = out.sort(dim=1).values
    return out[:, 0], out[:, 1]


def _fit_twonn(mu: Tensor, fraction: float) -> float:
    """Slope through the origin of -log(1 - F_emp) against log(mu) on the kept ratios (skdim's convention)."""
    n = mu.numel()
    n_keep = int(n * fraction)
    if n_keep < 2:
        raise ValueError(f"fewer than 2 ratios left to fit ({n} valid points, fraction={fraction})")
    mu = mu.double().sort().values[:n_keep]
    f_emp = torch.arange(1, n_keep + 1, dtype=torch.float64, device=mu.device) / n
    log_mu = mu.log()
    target = -torch.log1p(-f_emp)
    denom = (log_mu * log_mu).sum()
    if denom <= 0:
        raise ValueError("all kept ratios r2/r1 equal 1: the TwoNN fit is undefined")
    return float((log_mu * target).sum() / denom)


def twonn(
    x: Tensor | np.ndarray,
    fraction: float = 0.9,
    *,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    low_rank: bool = True,
    rank_tol: float = 1e-10,
    device: torch.device | str | None = None,
    ties: Ties = "collapse",
) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017) with skdim's empirical CDF and discard rule.

    Duplicates: exact duplicate rows carry no information on the local geometry (their r1 is 0,
    so mu is undefined), so the estimate is that of the distinct rows: when any point has
    r1 == 0, duplicate rows of x are collapsed to one copy (with a warning) and the neighbours are
    searched again; a point that still has r1 == 0 (distinct rows that coincide once float
    rounding or the low-rank projection is applied) is dropped. skdim instead drops every copy but
    keeps the copies as neighbours of the other points, which biases their ratios toward 1.

    Args:
        x: (N, D) samples in rows, torch or numpy.
        fraction: fraction of the smallest ratios mu = r2 / r1 kept for the fit (skdim's
            1 - discard_fraction), in (0, 1).
        dtype: dtype of the neighbour search; float32 is fast, float64 is for parity checks.
        chunk_size: rows per chunk of the distance matrix; None picks about 2**24 / N rows.
            Peak extra memory is about chunk_size * N elements plus two (N, r) copies of the
            (centred or projected) data.
        low_rank: project onto the span of x first when its numerical rank r is below D
            (needs N > D); distances are preserved and the search costs r / D of the FLOPs.
        rank_tol: principal variances below rank_tol times the largest count as zero (a relative
            standard deviation of 1e-5, above float32 rounding of exactly low-rank data).
        device: where to compute; None keeps x's device.
        ties: ``"collapse"`` (the project, described above) or ``"drop"`` (the authors, after
            Ansuini et al.): every point whose first-neighbour distance is 0 or equals its second
            (recomputed in float64 from x, so exact ties of quantised data stay exact) is dropped
            from the fit, duplicates staying as neighbours. Empirical CDF and cut as above, over
            the points left.

    Returns:
        The estimated intrinsic dimension.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if ties not in ("collapse", "drop"):
        raise ValueError(f"unknown ties {ties!r}; valid: collapse, drop")
    x = _as_tensor(x)
    if device is not None:
        x = x.to(device)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"TwoNN needs at least 3 points, got {n}")
    with torch.no_grad():
        y = _span_coordinates(x, dtype, rank_tol, low_rank)  # (N, r)
        chunk = chunk_size or max(1, _CHUNK_ELEMENTS // n)
        r1, r2, neighbours = _two_nearest(y, chunk)
        if ties == "drop":
            r1, r2 = _exact_distances(x, neighbours, chunk)
            valid = (r1 > 0) & (r1 != r2)
            if int(valid.sum()) < 3:
                raise ValueError(
                    f"TwoNN: only {int(valid.sum())} of {n} points are neither duplicated nor tied"
                )
            return _fit_twonn(r2[valid] / r1[valid], fraction)
        if bool((r1 == 0).any()):
            _, inverse = torch.unique(x, dim=0, return_inverse=True)
            n_unique = int(inverse.max()) + 1
            if n_unique < n:
                # One representative (the first occurrence) per distinct row.
                first = torch.full((n_unique,), n, dtype=torch.long, device=x.device)
                first.scatter_reduce_(0, inverse, torch.arange(n, device=x.device), reduce="amin")
                if n_unique < 3:
                    raise ValueError(f"TwoNN needs at least 3 distinct points, got {n_unique} (of {n} rows)")
                warnings.warn(
                    f"twonn: {n - n_unique} duplicate rows removed; estimating on {n_unique} distinct points",
                    stacklevel=2,
                )
                y = y[first]  # (N_unique, r)
                r1, r2, _ = _two_nearest(y, chunk_size or max(1, _CHUNK_ELEMENTS // n_unique))
            valid = r1 > 0
            if not bool(valid.all()):
                warnings.warn(
                    f"twonn: dropping {int((~valid).sum())} points at zero distance from a distinct "
                    "neighbour after rounding",
                    stacklevel=2,
                )
                r1, r2 = r1[valid], r2[valid]
        return _fit_twonn(r2.double() / r1.double(), fraction)


Ties = Literal["collapse", "drop"]
Ratio = Literal["mean_of_ratios", "ratio_of_means"]
# The authors' choices: tied/duplicated points dropped, per-layer ratio of the layer means.
PAPER_ID: dict[str, Any] = {"ties": "drop", "ratio": "ratio_of_means"}

UnitSource = Mapping[str, Tensor] | Callable[[], Iterable[tuple[str, Tensor]]] | Iterable[tuple[str, Tensor]]


def id_profile(
    units: UnitSource,
    *,
    threshold: float = 0.99,
    fraction: float = 0.9,
    max_points: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    ties: Ties = "collapse",
) -> list[dict[str, Any]]:
    """Linear ID, TwoNN ID and their ratio for every unit.

    Args:
        units: {name: (N, D) contributions}, an iterable of (name, X) pairs, or a callable returning
            one (e.g. a generator function that loads one unit at a time from a cache).
        threshold: explained-variance threshold of the linear ID.
        fraction: fraction of ratios kept by TwoNN.
        max_points: subsample each unit to this many rows (same rows for all units, seeded) to
            bound the cost; None uses all of them.
        seed: seed of the subsample.
        dtype: dtype of TwoNN's neighbour search.
        device: where to compute; None picks CUDA when available, else CPU.
        chunk_size: rows per distance chunk, see `twonn`.

    Returns:
        One dict per unit, in input order: unit, n_points, linear_id, twonn_id, ratio (linear / TwoNN).
        twonn_id and ratio are NaN (with a warning) for a unit with fewer than 3 distinct rows.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    items = units.items() if isinstance(units, Mapping) else (units() if callable(units) else units)
    rows: list[dict[str, Any]] = []
    chosen: Tensor | None = None
    for name, x in items:
        x = _as_tensor(x)
        if max_points is not None and x.shape[0] > max_points:
            if chosen is None or int(chosen.max()) >= x.shape[0]:
                g = torch.Generator().manual_seed(seed)
                chosen = torch.randperm(x.shape[0], generator=g)[:max_points].sort().values
            x = x[chosen.to(x.device)]  # (max_points, D)
        x = x.to(device)
        lin = linear_id(x, threshold)
        try:
            nonlin = twonn(x, fraction, dtype=dtype, chunk_size=chunk_size, ties=ties)
        except ValueError as err:  # e.g. a unit that is constant over the images
            warnings.warn(
                f"id_profile: TwoNN undefined for unit {name!r} ({err}); recorded as NaN", stacklevel=2
            )
            nonlin = math.nan
        rows.append(
            {
                "unit": name,
                "n_points": int(x.shape[0]),
                "linear_id": lin,
                "twonn_id": nonlin,
                "ratio": lin / nonlin,
            }
        )
    return rows


def _parse_unit(name: str) -> tuple[int, str]:
    ref = parse_unit(name)
    if ref.kind == "emb":
        return -1, "emb"
    return ref.layer, "mlp" if ref.kind == "mlp" else "heads"


def layer_profile(rows: Iterable[Mapping[str, Any]], ratio: Ratio = "mean_of_ratios") -> list[dict[str, Any]]:
    """Aggregate per-unit IDs per layer: the heads of a layer are averaged, the MLP kept on its own.

    Args:
        rows: per-unit dicts with keys unit, linear_id, twonn_id and ratio (as from `id_profile`);
            unit names are "emb", "l{l}.mlp" or "l{l}.h{h}".
        ratio: a layer's ratio as the mean of its heads' ratios (``"mean_of_ratios"``, the
            project) or as its mean linear ID over its mean TwoNN ID (``"ratio_of_means"``, the
            authors).

    Returns:
        Rows sorted by layer with keys layer, kind ("emb", "heads" or "mlp"), n_units, linear_id,
        twonn_id and ratio. "emb" gets layer -1 (it enters block 0). For "heads" every column is
        the mean over the layer's heads, except ratio under ``"ratio_of_means"``. Ready for
        `csv.DictWriter`.
    """
    if ratio not in ("mean_of_ratios", "ratio_of_means"):
        raise ValueError(f"unknown ratio {ratio!r}; valid: mean_of_ratios, ratio_of_means")
    groups: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_parse_unit(str(row["unit"])), []).append(row)
    order = {"emb": 0, "heads": 1, "mlp": 2}
    out = []
    for (layer, kind), members in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        out.append(
            {
                "layer": layer,
                "kind": kind,
                "n_units": len(members),
                "linear_id": float(np.mean([m["linear_id"] for m in members])),
                "twonn_id": float(np.mean([m["twonn_id"] for m in members])),
                "ratio": float(np.mean([m["ratio"] for m in members]))
                if ratio == "mean_of_ratios"
                else float(
                    np.mean([m["linear_id"] for m in members]) / np.mean([m["twonn_id"] for m in members])
                ),
            }
        )
    return out

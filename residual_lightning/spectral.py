"""Streaming per-unit PCA of cached contributions (method.md §2), pure torch.

Batches of cached contributions (`Contributions`: heads as compact coordinates y, MLPs and emb in
D) are reduced to per-unit counts, means and centred second moments in float64, batched over units
with einsum, on the batches' device (`MomentAccumulator`, `fit_unit_bases`). Batches are merged
with Chan et al.'s pairwise update (the exact identity ``M2 = M2_a + M2_b + delta delta^T n_a n_b /
n``), which avoids the cancellation of the raw ``sum(x x^T) - n mean mean^T`` form. A head's
contribution is ``c = A y`` with a fixed D x k map A, so its covariance is ``A S A^T`` with S the
k x k covariance of y; with ``A = QR`` it equals ``Q (R S R^T) Q^T``, and the eigendecomposition of
the small k x k matrix gives the head's PCA exactly: components ``(Q V)^T``, variances the
eigenvalues, mean ``A ybar``. No head is ever expanded to D per sample. MLPs, emb (and, optionally,
the final embedding) get a D x D covariance each. `MomentAccumulator.all_reduce` sums the moments
over torch.distributed ranks so PCA on sharded data equals PCA on all of it.

The results are `UnitBases` (`unit_bases`: the types, saving and component selection, re-exported
here); the ResiDual transform that uses them is in `transform`.

Letters: N samples, L layers, H heads per layer, d head width, k compact head coordinates (d under
the default convention, d + 3 under equal_share), D embedding size, K components, U units.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .contributions import CONVENTIONS, UnitLayout, cast_maps, shared_maps, sum_heads
from .unit_bases import PCABasis, Selection, UnitBases, select_components

__all__ = [
    "DEFAULT_RANK_RTOL",
    "MomentAccumulator",
    "PCABasis",
    "Selection",
    "UnitBases",
    "fit_unit_bases",
    "select_components",
]

# Eigenvalues below this fraction of a unit's largest one are numerical noise (float32 data
# rounding noise measured at ~1e-14 to 2e-11 relative on tiny models); their components are masked out.
DEFAULT_RANK_RTOL = 1e-9


# --------------------------------------------------------------------------------------------
# Streaming moments
# --------------------------------------------------------------------------------------------


def _batch_parts(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(heads, mlps, emb) of a `Contributions`-like object or a sequence of at least three tensors."""
    if all(hasattr(batch, a) for a in ("heads", "mlps", "emb")):
        return batch.heads, batch.mlps, batch.emb
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        return batch[0], batch[1], batch[2]
    raise TypeError(
        f"expected Contributions (heads, mlps, emb attributes) or a tuple (heads, mlps, emb), "
        f"got {type(batch).__name__}"
    )


def _pooler_part(batch: Any, names: tuple[str, ...], like: Tensor) -> Tensor:
    """(N, P, D) pooler units' contributions of a batch (its ``extra`` by name), in `names` order."""
    extra = getattr(batch, "extra", None) or {}
    missing = [name for name in names if name not in extra]
    if missing:
        raise ValueError(f"the batch lacks the pooler units {missing} (Contributions.extra)")
    return (
        torch.stack([extra[name] for name in names], dim=1)
        if names
        else like.new_zeros(like.shape[0], 0, like.shape[-1])
    )


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (U, F) and centred second moments (U, F, F) of x (N, U, F), in x's dtype."""
    mean = x.mean(0)  # (U, F)
    xc = x - mean  # (N, U, F)
    return mean, torch.einsum("nuf,nug->ufg", xc, xc)  # (U, F, F)


@dataclass
class _Moments:
    """Running mean and centred second moments of a group of units (float64)."""

    mean: Tensor  # (U, F)
    m2: Tensor  # (U, F, F)

    def merge(self, n_a: int, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        """Chan et al.'s pairwise update with a batch of n_b samples."""
        n = n_a + n_b
        delta = mean_b - self.mean  # (U, F)
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + torch.einsum("uf,ug->ufg", delta, delta) * (n_a * n_b / n)


class MomentAccumulator:
    """Streaming per-unit first and second moments of cached contributions, in float64.

    Heads are accumulated in their compact coordinates (k x k per head), MLPs and emb in D (D x D
    per unit) and, with ``fit_output``, the final embedding (D x D). State lives on the device of
    the first batch.

    Args:
        head_maps: (L, H, D, k) fixed head maps of the cache (``c = head_maps[l, h] @ y``).
        convention: the cache's decomposition convention; under ``"equal_share"`` the default
            number of head components is k - 3 = d.
        head_components: K for heads (default: d, i.e. k under ``"default"``, k - 3 under
            ``"equal_share"``); at most min(k, D).
        fit_output: also accumulate the moments of the final embedding (for the `spectral`
            baseline).
        chunk_size: samples upcast to float64 at a time (bounds the extra memory).
        rank_rtol: eigenvalues at most this fraction of a unit's largest are masked out.
        layout: the cache's layout, needed for pooler units (each gets a D x D covariance, like an
            MLP) and full-form heads (shared identity head maps: k = D, K defaults to the layout's
            head width d); None: a compact layout without pooler units.
    """

    def __init__(
        self,
        head_maps: Tensor,
        *,
        convention: str = "default",
        head_components: int | None = None,
        fit_output: bool = True,
        chunk_size: int = 1024,
        rank_rtol: float = DEFAULT_RANK_RTOL,
        layout: UnitLayout | None = None,
    ) -> None:
        if head_maps.ndim != 4:
            raise ValueError(f"head_maps must be (L, H, D, k), got shape {tuple(head_maps.shape)}")
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
        self.layers, self.heads, self.output_dim, self.head_dim = head_maps.shape
        if layout is None:
            layout = UnitLayout.from_shape(
                (self.layers, self.heads, self.head_dim, self.output_dim), convention
            )
        elif layout.shape != (self.layers, self.heads, self.head_dim, self.output_dim):
            raise ValueError(f"layout shape {layout.shape} does not match head_maps {tuple(head_maps.shape)}")
        self.layout = layout
        self.pooler_units = tuple(layout.pooler_units)
        if head_components is None:
            head_components = layout.head_width
        rank_cap = min(self.head_dim, self.output_dim)
        if not 1 <= head_components <= rank_cap:
            raise ValueError(f"head_components must be in [1, min(k, D) = {rank_cap}], got {head_components}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.head_maps = head_maps
        self.convention = convention
        self.head_components = int(head_components)
        self.fit_output = fit_output
        self.chunk_size = chunk_size
        self.rank_rtol = rank_rtol
        self.count = 0
        self._reduced = False
        self._head: _Moments | None = None  # units (L*H), F = k
        self._dense: _Moments | None = None  # units (1 + L + P): emb, the MLPs, the pooler's; F = D
        self._out: _Moments | None = None  # one unit, F = D

    def _allocate(self, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        lh, k, d = self.layers * self.heads, self.head_dim, self.output_dim
        u = 1 + self.layers + len(self.pooler_units)
        self._head = _Moments(torch.zeros(lh, k, **f64), torch.zeros(lh, k, k, **f64))
        self._dense = _Moments(torch.zeros(u, d, **f64), torch.zeros(u, d, d, **f64))
        if self.fit_output:
            self._out = _Moments(torch.zeros(1, d, **f64), torch.zeros(1, d, d, **f64))
        self.head_maps = cast_maps(self.head_maps, device)

    def _check(self, heads: Tensor, mlps: Tensor, emb: Tensor) -> None:
        n = heads.shape[0]
        want = {
            "heads": ((n, self.layers, self.heads, self.head_dim), heads),
            "mlps": ((n, self.layers, self.output_dim), mlps),
            "emb": ((n, self.output_dim), emb),
        }
        for name, (shape, t) in want.items():
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"batch {name} has shape {tuple(t.shape)}, expected {shape} for head_maps of shape "
                    f"{tuple(self.head_maps.shape)} (L, H, D, k)"
                )

    @torch.no_grad()
    def update(self, batch: Any) -> None:
        """Add a batch of samples.

        Args:
            batch: `Contributions` (or anything with ``heads``, ``mlps``, ``emb``) or a tuple
                ``(heads (N, L, H, k), mlps (N, L, D), emb (N, D), ...)``.

        Raises:
            ValueError: on shapes that do not match the head maps.
            RuntimeError: after `all_reduce` (the state is then global; adding local data would be
                counted on one rank only).
        """
        if self._reduced:
            raise RuntimeError("MomentAccumulator.update after all_reduce: the state is already global")
        heads, mlps, emb = _batch_parts(batch)
        self._check(heads, mlps, emb)
        pooler = _pooler_part(batch, self.pooler_units, emb)  # (N, P, D)
        if self._head is None:
            self._allocate(heads.device)
        device = self._head.mean.device
        for start in range(0, heads.shape[0], self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            y = heads[sl].to(device)  # (n, L, H, k)
            m, e = mlps[sl].to(device), emb[sl].to(device)  # (n, L, D), (n, D)
            p = pooler[sl].to(device)  # (n, P, D)
            n_b = y.shape[0]
            y64 = y.double().reshape(n_b, self.layers * self.heads, self.head_dim)  # (n, L*H, k)
            self._head.merge(self.count, n_b, *_moments(y64))
            dense = torch.cat([e[:, None], m, p.to(m.dtype)], dim=1).double()  # (n, 1 + L + P, D)
            self._dense.merge(self.count, n_b, *_moments(dense))
            if self._out is not None:
                # The embedding in the data's precision (at least float32): the D x (L*H*k) product
                # is the most expensive step and float32 rounding is far below PCA's needs.
                dtype = torch.promote_types(y.dtype, torch.float32)
                maps = cast_maps(self.head_maps, dtype)
                out = e.to(dtype) + m.to(dtype).sum(1) + sum_heads(maps, y.to(dtype)) + p.to(dtype).sum(1)
                self._out.merge(self.count, n_b, *_moments(out.double()[:, None]))  # (n, 1, D)
            self.count += n_b

    @torch.no_grad()
    def all_reduce(self, group: Any = None) -> None:
        """Combine the moments of every rank so that each holds those of all the data.

        A no-op when torch.distributed is not initialised. Exact (the distributed form of Chan's
        update): counts and ``count * mean`` are summed to the global mean, then each rank's
        second moments are shifted to that mean and summed. Call it once, after the last `update`,
        on every rank; a second call does nothing.

        Args:
            group: the process group (default: the world).
        """
        import torch.distributed as dist

        if self._reduced or not (dist.is_available() and dist.is_initialized()):
            return
        if self._head is None:  # a rank without data still has to take part
            self._allocate(self.head_maps.device)
        device = self._head.mean.device
        n_local = float(self.count)
        total = torch.tensor([n_local], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=group)
        n_total = total.item()
        for mom in (self._head, self._dense, self._out):
            if mom is None:
                continue
            weighted = mom.mean * n_local  # (U, F)
            dist.all_reduce(weighted, group=group)
            mean = weighted / max(n_total, 1.0)
            delta = mom.mean - mean  # (U, F)
            m2 = mom.m2 + torch.einsum("uf,ug->ufg", delta, delta) * n_local  # (U, F, F)
            dist.all_reduce(m2, group=group)
            mom.mean, mom.m2 = mean, m2
        self.count = int(round(n_total))
        self._reduced = True

    @torch.no_grad()
    def finalize(self, dtype: torch.dtype = torch.float32) -> UnitBases:
        """Eigendecompose the accumulated covariances into `UnitBases`.

        Args:
            dtype: dtype of the returned float tensors (the computation is float64).

        Raises:
            ValueError: fewer than two samples were seen.
        """
        if self.count < 2 or self._head is None:
            raise ValueError(f"PCA needs at least 2 samples, got {self.count}")
        n, layers, heads = self.count, self.layers, self.heads
        k, dim = self.head_dim, self.output_dim

        # Heads: covariance of c = A y is Q (R S R^T) Q^T.
        cov_y = (self._head.m2 / (n - 1)).reshape(layers, heads, k, k)  # (L, H, k, k)
        ybar = self._head.mean.reshape(layers, heads, k)  # (L, H, k)
        if shared_maps(self.head_maps):  # one map for every head (the full form's identity)
            one = self.head_maps[0, 0].double()  # (D, k)
            q, r = torch.linalg.qr(one)  # (D, r), (r, k)
            small = r @ cov_y @ r.mT  # (L, H, r, r)
            var, vecs = torch.linalg.eigh((small + small.mT) / 2)  # ascending
            comps = torch.einsum("dr,lhrj->lhjd", q, vecs.flip(-1))  # (L, H, r, D)
            mean = ybar @ one.mT  # (L, H, D)
        else:
            maps = self.head_maps.double()  # (L, H, D, k)
            q, r = torch.linalg.qr(maps)  # (L, H, D, r), (L, H, r, k) with r = min(D, k)
            small = r @ cov_y @ r.mT  # (L, H, r, r)
            var, vecs = torch.linalg.eigh((small + small.mT) / 2)  # ascending
            comps = torch.einsum("lhdr,lhrj->lhjd", q, vecs.flip(-1))  # (L, H, r, D)
            mean = torch.einsum("lhdk,lhk->lhd", maps, ybar)  # (L, H, D)
        head_basis = _basis(mean, comps, var.flip(-1), self.head_components, self.rank_rtol)

        # MLPs and emb: D x D covariance each.
        dense = _dense_basis(self._dense, n, dim, self.rank_rtol)  # units (1 + L + P)
        output = None if self._out is None else _dense_basis(self._out, n, dim, self.rank_rtol)[0]
        pooler = dense[1 + layers :] if self.pooler_units else None
        bases = UnitBases(
            heads=head_basis,
            mlps=dense[1 : 1 + layers],
            emb=dense[0],
            head_coord_mean=ybar,
            n_samples=n,
            convention=self.convention,
            output=output,
            pooler=pooler,
            pooler_units=self.pooler_units,
            compact=self.layout.compact,
        )
        return bases.to(dtype)


def _dense_basis(mom: _Moments, n: int, dim: int, rtol: float) -> PCABasis:
    """PCA of units whose contributions were accumulated in D."""
    cov = mom.m2 / (n - 1)  # (U, D, D)
    var, vecs = torch.linalg.eigh((cov + cov.mT) / 2)  # ascending
    return _basis(mom.mean, vecs.flip(-1).mT, var.flip(-1), dim, rtol)


def _basis(mean: Tensor, comps: Tensor, var: Tensor, k_out: int, rtol: float) -> PCABasis:
    """Pad/cut to K components, mask by numerical rank, fix signs, compute ratios.

    Args:
        mean: (*U, D).
        comps: (*U, r, D) orthonormal rows sorted by decreasing variance.
        var: (*U, r) decreasing eigenvalues.
        k_out: K.
        rtol: relative rank tolerance.
    """
    var = var.clamp_min(0)
    total = var.sum(-1, keepdim=True)  # (*U, 1): every component, kept or not
    r = var.shape[-1]
    if r >= k_out:
        var, comps = var[..., :k_out], comps[..., :k_out, :]
    else:
        var = torch.nn.functional.pad(var, (0, k_out - r))
        comps = torch.nn.functional.pad(comps, (0, 0, 0, k_out - r))
    mask = (var > rtol * var[..., :1]) & (var > 0)  # (*U, K)
    # Deterministic signs: the entry of largest magnitude of each component is positive.
    idx = comps.abs().argmax(-1, keepdim=True)  # (*U, K, 1)
    sign = torch.sign(comps.gather(-1, idx))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    comps = comps * mask[..., None]
    var = var * mask
    ratio = torch.where(total > 0, var / total.clamp_min(torch.finfo(var.dtype).tiny), torch.zeros_like(var))
    return PCABasis(
        mean=mean.clone(), components=comps, explained_variance=var, explained_variance_ratio=ratio, mask=mask
    )


def fit_unit_bases(
    batches: Iterable[Any],
    head_maps: Tensor,
    *,
    convention: str = "default",
    head_components: int | None = None,
    fit_output: bool = True,
    all_reduce: bool = True,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 1024,
    rank_rtol: float = DEFAULT_RANK_RTOL,
    metadata: Mapping[str, Any] | None = None,
    layout: UnitLayout | None = None,
) -> UnitBases:
    """Fit the PCA of every residual unit on a stream of cached batches.

    Equal (to float64 rounding) to ``sklearn.decomposition.PCA`` fitted on each unit's expanded
    (N, D) contributions, for the top K components: see the module docstring.

    Args:
        batches: an iterable of `Contributions` (or of tuples ``(heads, mlps, emb, ...)``).
        head_maps: (L, H, D, k) head maps of the cache.
        convention: the cache's decomposition convention.
        head_components: K for heads; default d (k, or k - 3 under ``"equal_share"``).
        fit_output: also fit the PCA of the final embedding (``bases.output``).
        all_reduce: sum the moments over torch.distributed ranks before the eigendecomposition
            (no-op when not initialised); each rank must then pass its own shard.
        dtype: dtype of the returned tensors (computed in float64).
        chunk_size: samples upcast to float64 at a time.
        rank_rtol: eigenvalues at most this fraction of a unit's largest are masked out.
        metadata: JSON-serialisable information stored with the bases.
        layout: the cache's layout (pooler units, full-form heads; see `MomentAccumulator`).
    """
    acc = MomentAccumulator(
        head_maps,
        convention=convention,
        head_components=head_components,
        fit_output=fit_output,
        chunk_size=chunk_size,
        rank_rtol=rank_rtol,
        layout=layout,
    )
    for batch in batches:
        acc.update(batch)
    if all_reduce:
        acc.all_reduce()
    bases = acc.finalize(dtype)
    bases.metadata = dict(metadata or {})
    return bases

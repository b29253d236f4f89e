"""PCA bases of the residual units and the ResiDual spectral transform (method.md §2), pure torch.

Three parts:

1. **Streaming per-unit PCA** (`MomentAccumulator`, `fit_unit_bases`). Batches of cached
   contributions (`CachedBatch`: heads as compact coordinates y, MLPs and emb in D) are reduced to
   per-unit counts, means and centred second moments in float64, batched over units with einsum,
   on the batches' device. Batches are merged with Chan et al.'s pairwise update (the exact
   identity ``M2 = M2_a + M2_b + delta delta^T n_a n_b / n``), which avoids the cancellation of
   the raw ``sum(x x^T) - n mean mean^T`` form. A head's contribution is ``c = A y`` with a fixed
   D x k map A, so its covariance is ``A S A^T`` with S the k x k covariance of y; with ``A = QR``
   it equals ``Q (R S R^T) Q^T``, and the eigendecomposition of the small k x k matrix gives the
   head's PCA exactly: components ``(Q V)^T``, variances the eigenvalues, mean ``A ybar``. No head
   is ever expanded to D per sample. MLPs, emb (and, optionally, the final embedding) get a D x D
   covariance each. `MomentAccumulator.all_reduce` sums the moments over torch.distributed ranks so
   PCA on sharded data equals PCA on all of it.
2. **Component selection** (`select_components`): ``"all"``, a fixed K, or the smallest K whose
   cumulative explained-variance ratio exceeds a threshold, as a boolean mask.
3. **The ResiDual transform** ``RD_u(c) = Phi_u^T diag(lambda_u) Phi_u (c - mu_u)``
   (`transform_heads`, `transform_dense`). For heads it runs in the compact coordinates:
   ``Phi (c - mu) = (Phi A)(y - ybar)``, so with ``B = Phi A`` (K x k, `compact_projection`) one
   sample costs K*k + D*K per head instead of D*k + D*K after expanding.

Results are `UnitBases`: per unit kind a `PCABasis` (mean, components, explained variance and
ratio, mask), padded to a fixed K per kind (heads K = d, MLPs/emb K = D) so that shapes depend on
the layout only, never on the data. Components beyond a unit's numerical rank are masked out.
Saved with safetensors (no pickle) and a JSON header.

Letters: N samples, L layers, H heads per layer, d head width, k compact head coordinates (d under
the default convention, d + 3 under equal_share), D embedding size, K components, U units.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import Tensor

from .files import load_tensors, save_tensors
from .units import CONVENTIONS, EQUAL_SHARE_EXTRA

__all__ = [
    "MomentAccumulator",
    "PCABasis",
    "Selection",
    "UnitBases",
    "compact_projection",
    "fit_unit_bases",
    "select_components",
    "transform_dense",
    "transform_heads",
]

#: How many components of a unit to use: ``"all"`` (every component above the numerical rank),
#: an int K (the top K), or a float threshold t in (0, 1] (the smallest K whose cumulative
#: explained-variance ratio exceeds t).
Selection = Union[int, float, Literal["all"]]

# Eigenvalues below this fraction of a unit's largest one are numerical noise (float32 data
# rounding noise measured at ~1e-14 to 2e-11 relative on tiny models); their components are masked out.
DEFAULT_RANK_RTOL = 1e-9


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class PCABasis:
    """The PCA of one kind of unit, padded to a fixed number of components K.

    Leading dimensions ``*U`` index the units: (L, H) for heads, (L,) for MLPs, () for emb and the
    final embedding.

    Attributes:
        mean: (*U, D) mean contribution of each unit on the reference set.
        components: (*U, K, D) principal components in rows, orthonormal, sorted by decreasing
            variance, sign-fixed (the entry of largest magnitude is positive); zero rows where masked.
        explained_variance: (*U, K) variance along each component (ddof=1, like sklearn); 0 where
            masked.
        explained_variance_ratio: (*U, K) variance over the unit's total variance (all of its
            components, kept or not).
        mask: (*U, K) bool, True for components above the unit's numerical rank.
    """

    mean: Tensor
    components: Tensor
    explained_variance: Tensor
    explained_variance_ratio: Tensor
    mask: Tensor

    @property
    def num_components(self) -> int:
        """K, the padded number of components."""
        return self.components.shape[-2]

    def rank(self) -> Tensor:
        """(*U,) number of unmasked components per unit."""
        return self.mask.sum(-1)

    def select(self, components: Selection) -> Tensor:
        """Boolean (*U, K) mask of the components to use; see `select_components`.

        Args:
            components: ``"all"``, an int K or a float threshold.
        """
        return select_components(self.explained_variance_ratio, self.mask, components)

    def to(self, *args: Any, **kwargs: Any) -> PCABasis:
        """Move/cast the float tensors (the mask keeps its dtype, follows the device)."""
        return PCABasis(**{f.name: _to(getattr(self, f.name), *args, **kwargs) for f in fields(self)})

    def __getitem__(self, index: Any) -> PCABasis:
        """The basis of a subset of units, indexing the leading unit dimensions."""
        return PCABasis(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _to(t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    if t.dtype == torch.bool:
        device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        return t if device is None else t.to(device)
    return t.to(*args, **kwargs)


@dataclass
class UnitBases:
    """PCA bases of every residual unit of one backbone on one reference set.

    Attributes:
        heads: bases of the L*H heads, units (L, H), K = d (the top d components, as the authors).
        mlps: bases of the L MLPs, units (L,), K = D.
        emb: basis of the embedding unit, units (), K = D.
        head_coord_mean: (L, H, k) mean of the compact head coordinates y; ``heads.mean`` equals
            ``head_maps @ head_coord_mean``. The compact transform needs it.
        n_samples: number of reference samples the bases were fitted on.
        convention: the decomposition convention of the cache (``"default"`` or ``"equal_share"``).
        output: PCA of the final image embedding (the sum of all units), units (), K = D; used by
            the `spectral` baseline. None if not fitted.
        metadata: free-form JSON-serialisable information (model, dataset, split...), saved too.
    """

    heads: PCABasis
    mlps: PCABasis
    emb: PCABasis
    head_coord_mean: Tensor
    n_samples: int
    convention: str = "default"
    output: PCABasis | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """L."""
        return self.heads.mean.shape[0]

    @property
    def num_heads(self) -> int:
        """H, heads per layer."""
        return self.heads.mean.shape[1]

    @property
    def head_dim(self) -> int:
        """k, the number of compact coordinates per head."""
        return self.head_coord_mean.shape[-1]

    @property
    def output_dim(self) -> int:
        """D."""
        return self.heads.mean.shape[-1]

    @property
    def names(self) -> list[str]:
        """Unit names in the authors' order: emb, the L MLPs, the L*H heads layer-major."""
        mlps = [f"l{layer}.mlp" for layer in range(self.num_layers)]
        heads = [f"l{layer}.h{h}" for layer in range(self.num_layers) for h in range(self.num_heads)]
        return ["emb", *mlps, *heads]

    def unit(self, name: str) -> PCABasis:
        """The basis of one unit by name (``"emb"``, ``"l3.mlp"``, ``"l3.h5"``).

        Args:
            name: the unit name.
        """
        if name == "emb":
            return self.emb
        layer, _, rest = name.partition(".")
        if name not in self.names:
            raise KeyError(f"unknown unit {name!r}; units are emb, l<l>.mlp and l<l>.h<h>")
        layer = int(layer[1:])
        return self.mlps[layer] if rest == "mlp" else self.heads[layer, int(rest[1:])]

    def to(self, *args: Any, **kwargs: Any) -> UnitBases:
        """Move/cast every float tensor (masks keep their dtype)."""
        return UnitBases(
            heads=self.heads.to(*args, **kwargs),
            mlps=self.mlps.to(*args, **kwargs),
            emb=self.emb.to(*args, **kwargs),
            head_coord_mean=self.head_coord_mean.to(*args, **kwargs),
            n_samples=self.n_samples,
            convention=self.convention,
            output=None if self.output is None else self.output.to(*args, **kwargs),
            metadata=dict(self.metadata),
        )

    def _kinds(self) -> dict[str, PCABasis]:
        kinds = {"heads": self.heads, "mlps": self.mlps, "emb": self.emb}
        if self.output is not None:
            kinds["output"] = self.output
        return kinds

    def save(self, path: str | Path, key: Any = None) -> None:
        """Write the bases to a safetensors file, atomically, with a checksum (see `files.save_tensors`).

        Args:
            path: the file to write (conventionally ``*.safetensors``).
            key: what the bases were fitted on (checked again by `load`); default: none recorded.
        """
        tensors = {"head_coord_mean": self.head_coord_mean}
        for kind, basis in self._kinds().items():
            for f in fields(basis):
                tensors[f"{kind}.{f.name}"] = getattr(basis, f.name)
        header = {
            "n_samples": self.n_samples,
            "convention": self.convention,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "head_dim": self.head_dim,
            "output_dim": self.output_dim,
            "metadata": self.metadata,
        }
        save_tensors(path, tensors, "bases", key, metadata={"header": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", key: Any = None) -> UnitBases:
        """Read bases written by `save`, verifying format, key and checksum.

        Args:
            path: the safetensors file.
            device: where to put the tensors.
            key: the key the bases must have been saved with (None: not checked).

        Raises:
            CacheError: not a bases file, written by another version, another key, truncated or
                corrupt (the message names the file).
        """
        tensors, meta = load_tensors(path, "bases", key, device)
        header = json.loads(meta["header"])

        def basis(kind: str) -> PCABasis | None:
            if f"{kind}.mean" not in tensors:
                return None
            return PCABasis(**{fl.name: tensors[f"{kind}.{fl.name}"] for fl in fields(PCABasis)})

        return cls(
            heads=basis("heads"),
            mlps=basis("mlps"),
            emb=basis("emb"),
            head_coord_mean=tensors["head_coord_mean"],
            n_samples=int(header["n_samples"]),
            convention=header["convention"],
            output=basis("output"),
            metadata=header.get("metadata", {}),
        )


# --------------------------------------------------------------------------------------------
# Streaming moments
# --------------------------------------------------------------------------------------------


def _batch_parts(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(heads, mlps, emb) of a CachedBatch-like object or a sequence of at least three tensors."""
    if all(hasattr(batch, a) for a in ("heads", "mlps", "emb")):
        return batch.heads, batch.mlps, batch.emb
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        return batch[0], batch[1], batch[2]
    raise TypeError(
        f"expected a CachedBatch (heads, mlps, emb attributes) or a tuple (heads, mlps, emb), "
        f"got {type(batch).__name__}"
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
    ) -> None:
        if head_maps.ndim != 4:
            raise ValueError(f"head_maps must be (L, H, D, k), got shape {tuple(head_maps.shape)}")
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
        self.layers, self.heads, self.output_dim, self.head_dim = head_maps.shape
        if head_components is None:
            extra = EQUAL_SHARE_EXTRA if convention == "equal_share" else 0
            head_components = self.head_dim - extra
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
        self._dense: _Moments | None = None  # units (1 + L): emb, then the MLPs; F = D
        self._out: _Moments | None = None  # one unit, F = D

    def _allocate(self, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        lh, k, d, u = self.layers * self.heads, self.head_dim, self.output_dim, 1 + self.layers
        self._head = _Moments(torch.zeros(lh, k, **f64), torch.zeros(lh, k, k, **f64))
        self._dense = _Moments(torch.zeros(u, d, **f64), torch.zeros(u, d, d, **f64))
        if self.fit_output:
            self._out = _Moments(torch.zeros(1, d, **f64), torch.zeros(1, d, d, **f64))
        self.head_maps = self.head_maps.to(device)

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
            batch: a `CachedBatch` (or anything with ``heads``, ``mlps``, ``emb``) or a tuple
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
        if self._head is None:
            self._allocate(heads.device)
        device = self._head.mean.device
        for start in range(0, heads.shape[0], self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            y = heads[sl].to(device)  # (n, L, H, k)
            m, e = mlps[sl].to(device), emb[sl].to(device)  # (n, L, D), (n, D)
            n_b = y.shape[0]
            y64 = y.double().reshape(n_b, self.layers * self.heads, self.head_dim)  # (n, L*H, k)
            self._head.merge(self.count, n_b, *_moments(y64))
            dense = torch.cat([e[:, None], m], dim=1).double()  # (n, 1 + L, D)
            self._dense.merge(self.count, n_b, *_moments(dense))
            if self._out is not None:
                # The embedding in the data's precision (at least float32): the D x (L*H*k) product
                # is the most expensive step and float32 rounding is far below PCA's needs.
                dtype = torch.promote_types(y.dtype, torch.float32)
                maps = self.head_maps.to(dtype)
                out = e.to(dtype) + m.to(dtype).sum(1) + torch.einsum("lhdk,nlhk->nd", maps, y.to(dtype))
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
        maps = self.head_maps.double()  # (L, H, D, k)
        q, r = torch.linalg.qr(maps)  # (L, H, D, r), (L, H, r, k) with r = min(D, k)
        small = r @ cov_y @ r.mT  # (L, H, r, r)
        var, vecs = torch.linalg.eigh((small + small.mT) / 2)  # ascending
        comps = torch.einsum("lhdr,lhrj->lhjd", q, vecs.flip(-1))  # (L, H, r, D)
        ybar = self._head.mean.reshape(layers, heads, k)  # (L, H, k)
        mean = torch.einsum("lhdk,lhk->lhd", maps, ybar)  # (L, H, D)
        head_basis = _basis(mean, comps, var.flip(-1), self.head_components, self.rank_rtol)

        # MLPs and emb: D x D covariance each.
        dense = _dense_basis(self._dense, n, dim, self.rank_rtol)  # units (1 + L)
        output = None if self._out is None else _dense_basis(self._out, n, dim, self.rank_rtol)[0]
        bases = UnitBases(
            heads=head_basis,
            mlps=dense[1:],
            emb=dense[0],
            head_coord_mean=ybar,
            n_samples=n,
            convention=self.convention,
            output=output,
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
) -> UnitBases:
    """Fit the PCA of every residual unit on a stream of cached batches.

    Equal (to float64 rounding) to ``sklearn.decomposition.PCA`` fitted on each unit's expanded
    (N, D) contributions, for the top K components: see the module docstring.

    Args:
        batches: an iterable of `CachedBatch` (or of tuples ``(heads, mlps, emb, ...)``).
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
    """
    acc = MomentAccumulator(
        head_maps,
        convention=convention,
        head_components=head_components,
        fit_output=fit_output,
        chunk_size=chunk_size,
        rank_rtol=rank_rtol,
    )
    for batch in batches:
        acc.update(batch)
    if all_reduce:
        acc.all_reduce()
    bases = acc.finalize(dtype)
    bases.metadata = dict(metadata or {})
    return bases


# --------------------------------------------------------------------------------------------
# Component selection
# --------------------------------------------------------------------------------------------


def select_components(explained_variance_ratio: Tensor, mask: Tensor, components: Selection) -> Tensor:
    """Which components of each unit to use, as a boolean mask of the same (*U, K) shape.

    Only unmasked components (above the numerical rank) are ever selected.

    Args:
        explained_variance_ratio: (*U, K) ratios, decreasing along K.
        mask: (*U, K) bool, the valid components.
        components: ``"all"``; an int K >= 0 (the top K valid ones); or a float threshold t in
            (0, 1]: the smallest K whose cumulative explained-variance ratio exceeds t (all valid
            components when it never does, e.g. t = 1).

    Raises:
        ValueError: for an unknown string, a negative K or a threshold outside (0, 1].
        TypeError: for another type (bools are rejected: ``True`` is not a K).
    """
    k = mask.shape[-1]
    pos = torch.arange(k, device=mask.device)  # (K,)
    if isinstance(components, str):
        if components != "all":
            raise ValueError(f"unknown component selection {components!r}; use 'all', an int K or a float")
        return mask.clone()
    if isinstance(components, bool) or not isinstance(components, (numbers.Integral, numbers.Real)):
        raise TypeError(
            f"component selection must be 'all', an int or a float, got {type(components).__name__}"
        )
    if isinstance(components, numbers.Integral):
        if components < 0:
            raise ValueError(f"number of components must be >= 0, got {components}")
        return mask & (pos < int(components))
    threshold = float(components)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"explained-variance threshold must be in (0, 1], got {threshold}")
    cumulative = torch.cumsum(explained_variance_ratio.double() * mask, dim=-1)  # (*U, K)
    k_sel = (cumulative <= threshold).sum(-1, keepdim=True) + 1  # (*U, 1): first index exceeding, + 1
    return mask & (pos < k_sel)


# --------------------------------------------------------------------------------------------
# The ResiDual transform
# --------------------------------------------------------------------------------------------


def compact_projection(components: Tensor, head_maps: Tensor, coord_mean: Tensor) -> tuple[Tensor, Tensor]:
    """Heads' components in the compact coordinates: ``B = Phi A`` and the offset ``B ybar``.

    ``Phi (c - mu) = B y - B ybar`` for a head contribution ``c = A y`` with mean ``mu = A ybar``.

    Args:
        components: (L, H, K, D) head components Phi.
        head_maps: (L, H, D, k) head maps A.
        coord_mean: (L, H, k) mean compact coordinates ybar.

    Returns:
        B (L, H, K, k) and the offset (L, H, K).
    """
    b = torch.einsum("lhjd,lhdk->lhjk", components, head_maps.to(components.dtype))  # (L, H, K, k)
    offset = torch.einsum("lhjk,lhk->lhj", b, coord_mean.to(components.dtype))  # (L, H, K)
    return b, offset


def transform_heads(y: Tensor, b: Tensor, offset: Tensor, lambdas: Tensor, components: Tensor) -> Tensor:
    """Sum over heads of ``Phi^T diag(lambda) Phi (c - mu)``, computed from the compact y.

    Cost per sample and head K*k + D*K; heads or components with lambda = 0 drop out.

    Args:
        y: (N, L, H, k) compact head coordinates.
        b: (L, H, K, k) from `compact_projection`.
        offset: (L, H, K) from `compact_projection`.
        lambdas: (L, H, K) scales (0 for components not used).
        components: (L, H, K, D) head components Phi.

    Returns:
        (N, D), the sum of the transformed head contributions (without their means).
    """
    coords = torch.einsum("lhjk,nlhk->nlhj", b, y) - offset  # (N, L, H, K)
    return torch.einsum("nlhj,lhjd->nd", coords * lambdas, components)  # (N, D)


def transform_dense(x: Tensor, components: Tensor, mean: Tensor, lambdas: Tensor) -> Tensor:
    """Sum over units of ``Phi^T diag(lambda) Phi (x - mu)`` for units stored in D (MLPs, emb).

    Args:
        x: (N, U, D) contributions.
        components: (U, K, D).
        mean: (U, D).
        lambdas: (U, K) scales (0 for components not used).

    Returns:
        (N, D), the sum of the transformed contributions (without their means).
    """
    offset = torch.einsum("ujd,ud->uj", components, mean)  # (U, K)
    coords = torch.einsum("ujd,nud->nuj", components, x) - offset  # (N, U, K)
    return torch.einsum("nuj,ujd->nd", coords * lambdas, components)  # (N, D)

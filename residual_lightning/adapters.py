"""Trainable adapters on cached contributions: ResiDual and its baselines (method.md §2, table).

Every adapter maps a `CachedBatch` to an adapted image embedding (N, D), not normalised; the
classifier (text or prototypes) is applied on top by the caller. Frozen tensors are persistent
buffers (a checkpoint restores them), learned ones are Parameters.

| method | class | learned |
|---|---|---|
| ``residual`` | `ResidualAdapter`: heads + MLPs, all components, emb kept | L*H*d + L*D |
| ``residual_star`` | `ResidualAdapter`: heads, 0.9 explained variance, others zeroed | selected K's |
| ``coarse`` | `CoarseAdapter`: one scalar per head, other units dropped | L*H |
| ``linear`` | `LinearAdapter`: ``nn.Linear(D, D)`` on the embedding | D*D + D |
| ``spectral`` | `SpectralAdapter`: one scalar per PC of the embedding | D |
| ``zeroshot`` | `ZeroShotAdapter`: the embedding itself | 0 |

`build_adapter(method, bases, head_maps, **overrides)` builds any of them from the presets in
`PRESETS`. Pure torch, no Lightning.

Letters: N samples, L layers, H heads per layer, k compact head coordinates, D embedding size,
K components.
"""

from __future__ import annotations

import abc
import difflib
import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from .data.batch import CachedBatch, embedding
from .spectral import (
    PCABasis,
    Selection,
    UnitBases,
    compact_projection,
    transform_dense,
    transform_heads,
)

__all__ = [
    "METHODS",
    "PRESETS",
    "Adapter",
    "CoarseAdapter",
    "LinearAdapter",
    "ResidualAdapter",
    "SpectralAdapter",
    "ZeroShotAdapter",
    "build_adapter",
    "init_lambdas",
    "method_options",
    "resolve_transform",
]

Init = Literal["ones", "normal", "eigen", "singular"]
Others = Literal["keep", "zero", "mean"]
#: Units to transform: ``"all"`` (heads and MLPs), ``"heads"``, ``"mlps"``, ``"emb"``, a list of
#: unit names and/or those kind names, or a layer range ``(start, stop)`` (heads and MLPs of
#: layers start..stop-1, Python slice semantics).
TransformSpec = Union[str, Sequence[str], tuple[int, int]]
#: Component selection for every kind, or per kind: ``{"heads": 0.9, "mlps": "all"}``.
ComponentsSpec = Union[Selection, Mapping[str, Selection]]

KINDS = ("heads", "mlps", "emb")
_UNIT = re.compile(r"^l(\d+)\.(?:(mlp)|h(\d+))$")


class Adapter(nn.Module, abc.ABC):
    """Common interface of the adapters.

    Subclasses implement `forward` and `num_learned` (abstract), and may override `unit_weights`.
    """

    @abc.abstractmethod
    def forward(self, batch: CachedBatch) -> Tensor:
        """The adapted image embedding (N, D), not normalised.

        Args:
            batch: cached contributions.
        """

    @abc.abstractmethod
    def num_learned(self) -> int:
        """Number of learned scalars (entries of Parameters that reach the output)."""

    def unit_weights(self) -> dict[str, Tensor]:
        """Learned weights for plotting, detached, NaN where an entry is not learned."""
        return {}


def _dtype(head_maps: Tensor) -> torch.dtype:
    return head_maps.dtype if head_maps.is_floating_point() else torch.float32


def init_lambdas(
    init: Init, basis: PCABasis, n_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Initial scales for the components of a basis (float64, shape (*U, K)).

    Args:
        init: ``"ones"``; ``"normal"``: 1 + N(0, 1), the authors' ``randn`` init; ``"eigen"``: the
            explained variances (eigenvalues of the ddof=1 covariance); ``"singular"``: the
            singular values of the centred reference data, ``sqrt(variance * (n - 1))``, what the
            authors' ``pca_fn`` returns as ``weights`` (they scale with the reference-set size).
        basis: the PCA basis.
        n_samples: reference-set size (for ``"singular"``).
        generator: random generator for ``"normal"``.

    Raises:
        ValueError: unknown init.
    """
    shape = basis.mask.shape
    if init == "ones":
        return torch.ones(shape, dtype=torch.float64)
    if init == "normal":
        return 1.0 + torch.randn(shape, generator=generator, dtype=torch.float64)
    if init == "eigen":
        return basis.explained_variance.detach().double().cpu()
    if init == "singular":
        return (basis.explained_variance.detach().double().cpu() * (n_samples - 1)).sqrt()
    raise ValueError(f"unknown init {init!r}; valid: ones, normal, eigen, singular")


def _nan_where(values: Tensor, mask: Tensor) -> Tensor:
    out = values.detach().clone().float()
    out[~mask] = float("nan")
    return out


# --------------------------------------------------------------------------------------------
# ResiDual
# --------------------------------------------------------------------------------------------


def resolve_transform(transform: TransformSpec, layers: int, heads: int) -> tuple[Tensor, Tensor, bool]:
    """Which units a transform spec selects: heads (L, H) bool, MLPs (L,) bool, emb bool.

    Args:
        transform: see `TransformSpec`.
        layers: L.
        heads: H.

    Raises:
        ValueError: unknown kind or unit name (with close matches), or a bad layer range.
    """
    th = torch.zeros(layers, heads, dtype=torch.bool)
    tm = torch.zeros(layers, dtype=torch.bool)
    te = False
    if isinstance(transform, str):
        transform = ["heads", "mlps"] if transform == "all" else [transform]
    transform = list(transform)
    if len(transform) == 2 and all(isinstance(t, int) and not isinstance(t, bool) for t in transform):
        chosen = list(range(layers)[slice(*transform)])
        if not chosen:
            raise ValueError(f"layer range {tuple(transform)} selects no layer of {layers}")
        th[chosen] = True
        tm[chosen] = True
        return th, tm, te
    names = (
        ["all", *KINDS, "emb"]
        + [f"l{layer}.mlp" for layer in range(layers)]
        + [f"l{layer}.h{h}" for layer in range(layers) for h in range(heads)]
    )
    for item in transform:
        if not isinstance(item, str):
            raise ValueError(
                f"transform items must be unit or kind names, or the spec a (start, stop) layer range; "
                f"got {item!r} in {transform!r}"
            )
        match = _UNIT.match(item)
        if item == "all":
            th[:], tm[:] = True, True
        elif item == "heads":
            th[:] = True
        elif item == "mlps":
            tm[:] = True
        elif item == "emb":
            te = True
        elif match and int(match.group(1)) < layers and (match.group(2) or int(match.group(3)) < heads):
            layer = int(match.group(1))
            if match.group(2):
                tm[layer] = True
            else:
                th[layer, int(match.group(3))] = True
        else:
            close = difflib.get_close_matches(item, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown unit {item!r} in transform (kinds: all, heads, mlps, emb; units: emb, "
                f"l<0..{layers - 1}>.mlp, l<l>.h<0..{heads - 1}>){hint}"
            )
    return th, tm, te


def _per_kind(components: ComponentsSpec) -> dict[str, Selection]:
    if isinstance(components, Mapping):
        unknown = set(components) - set(KINDS)
        if unknown:
            raise ValueError(f"components: unknown kind(s) {sorted(unknown)}; valid: {', '.join(KINDS)}")
        return {kind: components.get(kind, "all") for kind in KINDS}
    return dict.fromkeys(KINDS, components)


class ResidualAdapter(Adapter):
    """ResiDual: rescale the principal components of selected residual units (method.md §2).

    ``z = sum_{u transformed} Phi_u^T diag(lambda_u) Phi_u (c_u - mu_u) (+ mu_u if add_mean)
    + sum_{u not transformed} others(c_u)``, with heads computed in the compact coordinates.

    Learned: one lambda per selected component of each transformed unit. Components not selected
    within a transformed unit have lambda fixed at 0. The lambdas are stored padded, ``(L, H, K)``
    for heads, ``(L, D)`` for MLPs, ``(D,)`` for emb, as Parameters ``head_lambdas``,
    ``mlp_lambdas``, ``emb_lambdas`` (each only if some unit of that kind is transformed); the
    forward multiplies them by the boolean buffers ``*_select``, so masked entries get zero
    gradient and never matter. `num_learned` counts the selected entries only.

    Args:
        bases: PCA bases of the units (`fit_unit_bases`).
        head_maps: (L, H, D, k) head maps of the cache the bases were fitted on.
        transform: units to transform: ``"all"`` (heads and MLPs), ``"heads"``, ``"mlps"``,
            ``"emb"``, a list of unit names (``"l3.h5"``, ``"l3.mlp"``, ``"emb"``) and/or kinds,
            or a ``(start, stop)`` layer range (heads and MLPs of those layers).
        components: per unit, which components to learn: ``"all"``, an int K, or a float
            explained-variance threshold; one value for every kind or a mapping by kind
            (``{"heads": 0.9, "mlps": "all"}``).
        others: what the units that are not transformed (emb included) contribute: ``"keep"``
            their contribution c_u, ``"zero"`` nothing, ``"mean"`` their reference-set mean mu_u.
        init: lambda init: ``"ones"``, ``"normal"`` (1 + N(0, 1), the authors'), ``"eigen"``
            (explained variances) or ``"singular"`` (singular values, see `init_lambdas`).
        add_mean: add mu_u back to each transformed unit (the authors do not).
        seed: seed of the ``"normal"`` init.

    Raises:
        ValueError: unknown options, or head_maps that do not match the bases.
    """

    def __init__(
        self,
        bases: UnitBases,
        head_maps: Tensor,
        transform: TransformSpec = "all",
        components: ComponentsSpec = "all",
        others: Others = "keep",
        init: Init = "normal",
        add_mean: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if others not in ("keep", "zero", "mean"):
            raise ValueError(f"unknown others={others!r}; valid: keep, zero, mean")
        if init not in ("ones", "normal", "eigen", "singular"):
            raise ValueError(f"unknown init {init!r}; valid: ones, normal, eigen, singular")
        layers, heads, dim, k = head_maps.shape
        want = (bases.num_layers, bases.num_heads, bases.output_dim, bases.head_dim)
        if (layers, heads, dim, k) != want:
            raise ValueError(
                f"head_maps shape {tuple(head_maps.shape)} does not match the bases' (L, H, D, k) {want}"
            )
        dtype = _dtype(head_maps)
        bases = bases.to(device=head_maps.device, dtype=dtype)
        maps = head_maps.to(dtype)
        # Guard against bases fitted on another cache: their head means must be A @ ybar.
        mean = torch.einsum("lhdk,lhk->lhd", maps, bases.head_coord_mean)  # (L, H, D)
        err = (mean - bases.heads.mean).norm() / bases.heads.mean.norm().clamp_min(1e-12)
        if err > 1e-3:
            raise ValueError(
                f"the bases' head means differ from head_maps @ head_coord_mean (relative error {err:.2e}): "
                "the bases were fitted on a cache with other head maps"
            )
        self.transform, self.others, self.init, self.add_mean = transform, others, init, add_mean
        th, tm, te = resolve_transform(transform, layers, heads)
        th, tm = th.to(maps.device), tm.to(maps.device)
        sel = _per_kind(components)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("head_transformed", th)  # (L, H)
        self.register_buffer("mlp_transformed", tm)  # (L,)
        self.register_buffer("emb_transformed", torch.tensor(te, device=maps.device))

        const = torch.zeros(dim, dtype=dtype, device=maps.device)  # (D,)
        kinds = {
            "head": (bases.heads, th, sel["heads"]),
            "mlp": (bases.mlps, tm, sel["mlps"]),
            "emb": (bases.emb, torch.tensor(te, device=maps.device), sel["emb"]),
        }
        for prefix, (basis, chosen, selection) in kinds.items():
            lam = init_lambdas(init, basis, bases.n_samples, gen)  # drawn for every kind: seed-stable
            if not chosen.any():
                continue
            select = basis.select(selection) & chosen[..., None]  # (*U, K)
            self.register_buffer(f"{prefix}_select", select)
            self.register_buffer(f"{prefix}_components", basis.components)  # (*U, K, D)
            self.register_parameter(
                f"{prefix}_lambdas", nn.Parameter((lam.to(select.device) * select).to(dtype))
            )
            if prefix == "head":
                b, offset = compact_projection(basis.components, maps, bases.head_coord_mean)
                self.register_buffer("head_coords", b)  # (L, H, K, k)
                self.register_buffer("head_offset", offset)  # (L, H, K)
            else:
                self.register_buffer(f"{prefix}_mean", basis.mean)  # (*U, D)
            if add_mean:
                const += (basis.mean * chosen[..., None]).reshape(-1, dim).sum(0)

        # Units that are not transformed.
        keep = others == "keep"
        self.register_buffer("head_keep", (~th).to(dtype) if keep else torch.zeros_like(th, dtype=dtype))
        self.register_buffer("mlp_keep", (~tm).to(dtype) if keep else torch.zeros_like(tm, dtype=dtype))
        self.register_buffer(
            "emb_keep", torch.tensor(float(keep and not te), dtype=dtype, device=maps.device)
        )
        if bool(self.head_keep.any()):
            self.register_buffer("head_maps", maps)  # (L, H, D, k)
        if others == "mean":
            const += (bases.heads.mean * (~th)[..., None]).sum((0, 1))
            const += (bases.mlps.mean * (~tm)[..., None]).sum(0)
            const += bases.emb.mean * float(not te)
        self.register_buffer("const", const)  # (D,)

    def _lambdas(self, prefix: str) -> Tensor | None:
        lam = getattr(self, f"{prefix}_lambdas", None)
        return None if lam is None else lam * getattr(self, f"{prefix}_select")

    def forward(self, batch: CachedBatch) -> Tensor:
        """The adapted embedding (N, D).

        Args:
            batch: cached contributions (cast to the adapter's dtype).
        """
        dtype = self.const.dtype
        y = batch.heads.to(dtype)  # (N, L, H, k)
        mlps, emb = batch.mlps.to(dtype), batch.emb.to(dtype)  # (N, L, D), (N, D)
        out = self.const.expand(y.shape[0], -1)  # (N, D)
        lam = self._lambdas("head")
        if lam is not None:
            out = out + transform_heads(y, self.head_coords, self.head_offset, lam, self.head_components)
        lam = self._lambdas("mlp")
        if lam is not None:
            out = out + transform_dense(mlps, self.mlp_components, self.mlp_mean, lam)
        lam = self._lambdas("emb")
        if lam is not None:
            out = out + transform_dense(
                emb[:, None], self.emb_components[None], self.emb_mean[None], lam[None]
            )
        if hasattr(self, "head_maps"):
            out = out + torch.einsum("lhdk,nlhk->nd", self.head_maps, y * self.head_keep[..., None])
        out = out + torch.einsum("nld,l->nd", mlps, self.mlp_keep) + emb * self.emb_keep
        return out

    def num_learned(self) -> int:
        """Number of learned lambdas: the selected components of the transformed units."""
        return sum(
            int(getattr(self, f"{p}_select").sum())
            for p in ("head", "mlp", "emb")
            if hasattr(self, f"{p}_lambdas")
        )

    def unit_weights(self) -> dict[str, Tensor]:
        """Lambdas by kind: ``heads`` (L, H, K), ``mlps`` (L, D), ``emb`` (D,); NaN where not learned.

        Kinds without any transformed unit are absent.
        """
        out = {}
        for prefix, kind in (("head", "heads"), ("mlp", "mlps"), ("emb", "emb")):
            if hasattr(self, f"{prefix}_lambdas"):
                out[kind] = _nan_where(getattr(self, f"{prefix}_lambdas"), getattr(self, f"{prefix}_select"))
        return out

    def transformed_units(self) -> list[str]:
        """Names of the transformed units, in the authors' order (emb, MLPs, heads)."""
        names = ["emb"] if bool(self.emb_transformed) else []
        names += [f"l{layer}.mlp" for layer in self.mlp_transformed.nonzero().flatten().tolist()]
        names += [f"l{layer}.h{h}" for layer, h in self.head_transformed.nonzero().tolist()]
        return names


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


class CoarseAdapter(Adapter):
    """One learned scalar per head; heads' contributions are scaled, every other unit dropped.

    ``z = sum_{l,h} w_{l,h} c_{l,h}`` (the authors' "Optimized" coarse variant, ablation 'zero').

    Args:
        head_maps: (L, H, D, k) head maps of the cache.
        init: ``"ones"`` or ``"normal"`` (1 + N(0, 1), the authors').
        seed: seed of the ``"normal"`` init.
    """

    def __init__(self, head_maps: Tensor, init: Literal["ones", "normal"] = "normal", seed: int = 0) -> None:
        super().__init__()
        layers, heads = head_maps.shape[:2]
        dtype = _dtype(head_maps)
        if init == "ones":
            w = torch.ones(layers, heads, dtype=torch.float64)
        elif init == "normal":
            w = 1.0 + torch.randn(
                layers, heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
            )
        else:
            raise ValueError(f"unknown init {init!r} for coarse; valid: ones, normal")
        self.register_buffer("head_maps", head_maps.to(dtype))  # (L, H, D, k)
        self.head_weights = nn.Parameter(w.to(dtype=dtype, device=head_maps.device))  # (L, H)

    def forward(self, batch: CachedBatch) -> Tensor:
        """Sum of the scaled head contributions (N, D).

        Args:
            batch: cached contributions.
        """
        y = batch.heads.to(self.head_maps.dtype)  # (N, L, H, k)
        return torch.einsum("lhdk,nlhk->nd", self.head_maps, y * self.head_weights[..., None])

    def num_learned(self) -> int:
        """L*H."""
        return self.head_weights.numel()

    def unit_weights(self) -> dict[str, Tensor]:
        """``heads``: (L, H) per-head scales."""
        return {"heads": self.head_weights.detach().clone().float()}


class LinearAdapter(Adapter):
    """``nn.Linear(D, D)`` on the full image embedding.

    Args:
        head_maps: (L, H, D, k) head maps of the cache (to recompose the embedding).
        identity_init: start from the identity map and zero bias (the zero-shot embedding);
            False keeps `nn.Linear`'s default init, as the authors' code.
        seed: seed of the default init.
    """

    def __init__(self, head_maps: Tensor, identity_init: bool = False, seed: int = 0) -> None:
        super().__init__()
        dim = head_maps.shape[2]
        dtype = _dtype(head_maps)
        self.register_buffer("head_maps", head_maps.to(dtype))  # (L, H, D, k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = nn.Linear(dim, dim, dtype=dtype, device=head_maps.device)
        if identity_init:
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(dim, dtype=dtype))
                self.linear.bias.zero_()

    def forward(self, batch: CachedBatch) -> Tensor:
        """``linear(embedding)`` (N, D).

        Args:
            batch: cached contributions.
        """
        dtype = self.head_maps.dtype
        batch = CachedBatch(batch.heads.to(dtype), batch.mlps.to(dtype), batch.emb.to(dtype), batch.label)
        return self.linear(embedding(batch, self.head_maps))

    def num_learned(self) -> int:
        """D*D + D."""
        return sum(p.numel() for p in self.linear.parameters())


class SpectralAdapter(Adapter):
    """One learned scale per principal component of the final image embedding.

    ``z = Phi^T diag(lambda) Phi (e - mu) (+ mu)`` with the PCA (mu, Phi) of the embedding on a
    reference set (``bases.output``; the authors: ImageNet train).

    Args:
        basis: PCA of the final embedding (units (), K components).
        head_maps: (L, H, D, k) head maps of the cache.
        init: ``"ones"``, ``"normal"``, ``"eigen"`` or ``"singular"`` (see `init_lambdas`).
        add_mean: add mu back (the authors do not).
        n_samples: reference-set size, for ``"singular"``.
        seed: seed of the ``"normal"`` init.
    """

    def __init__(
        self,
        basis: PCABasis,
        head_maps: Tensor,
        init: Init = "normal",
        add_mean: bool = False,
        n_samples: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        dtype = _dtype(head_maps)
        basis = basis.to(device=head_maps.device, dtype=dtype)
        if basis.components.ndim != 2:
            raise ValueError(
                f"spectral needs one (K, D) basis, got components {tuple(basis.components.shape)}"
            )
        lam = init_lambdas(init, basis, n_samples, torch.Generator().manual_seed(seed))
        self.add_mean = add_mean
        self.register_buffer("head_maps", head_maps.to(dtype))  # (L, H, D, k)
        self.register_buffer("components", basis.components)  # (K, D)
        self.register_buffer("mean", basis.mean)  # (D,)
        self.register_buffer("select", basis.mask)  # (K,)
        self.lambdas = nn.Parameter((lam.to(basis.mask.device) * basis.mask).to(dtype))  # (K,)

    @classmethod
    def from_bases(cls, bases: UnitBases, head_maps: Tensor, **kwargs: Any) -> SpectralAdapter:
        """Build from `UnitBases` fitted with ``fit_output=True``.

        Args:
            bases: the bases (their ``output`` PCA is used).
            head_maps: (L, H, D, k) head maps.
            **kwargs: `SpectralAdapter` options (init, add_mean, seed).

        Raises:
            ValueError: the bases have no output PCA.
        """
        if bases.output is None:
            raise ValueError(
                "spectral needs bases.output (the PCA of the embedding): fit with fit_output=True"
            )
        kwargs.setdefault("n_samples", bases.n_samples)
        return cls(bases.output, head_maps, **kwargs)

    def forward(self, batch: CachedBatch) -> Tensor:
        """The rescaled embedding (N, D).

        Args:
            batch: cached contributions.
        """
        dtype = self.head_maps.dtype
        batch = CachedBatch(batch.heads.to(dtype), batch.mlps.to(dtype), batch.emb.to(dtype), batch.label)
        e = embedding(batch, self.head_maps)  # (N, D)
        out = transform_dense(
            e[:, None], self.components[None], self.mean[None], (self.lambdas * self.select)[None]
        )
        return out + self.mean if self.add_mean else out

    def num_learned(self) -> int:
        """Number of components (D for a full-rank embedding)."""
        return int(self.select.sum())

    def unit_weights(self) -> dict[str, Tensor]:
        """``output``: (K,) lambdas, NaN where masked."""
        return {"output": _nan_where(self.lambdas, self.select)}


class ZeroShotAdapter(Adapter):
    """Nothing learned: the backbone's embedding, recomposed from the cache.

    Args:
        head_maps: (L, H, D, k) head maps of the cache.
    """

    def __init__(self, head_maps: Tensor) -> None:
        super().__init__()
        self.register_buffer("head_maps", head_maps.to(_dtype(head_maps)))  # (L, H, D, k)

    def forward(self, batch: CachedBatch) -> Tensor:
        """The embedding (N, D).

        Args:
            batch: cached contributions.
        """
        dtype = self.head_maps.dtype
        batch = CachedBatch(batch.heads.to(dtype), batch.mlps.to(dtype), batch.emb.to(dtype), batch.label)
        return embedding(batch, self.head_maps)

    def num_learned(self) -> int:
        """0."""
        return 0


# --------------------------------------------------------------------------------------------
# Presets and factory
# --------------------------------------------------------------------------------------------

#: Default options of each method (method.md §2 table; the authors' gin configs).
PRESETS: dict[str, dict[str, Any]] = {
    "residual": dict(transform="all", components="all", others="keep", init="normal", add_mean=False),
    "residual_star": dict(
        transform="heads", components={"heads": 0.9}, others="zero", init="normal", add_mean=False
    ),
    "coarse": dict(init="normal"),
    "linear": dict(identity_init=False),
    "spectral": dict(init="normal", add_mean=False),
    "zeroshot": {},
}
METHODS: tuple[str, ...] = tuple(PRESETS)

_CLASSES: dict[str, type[Adapter]] = {
    "residual": ResidualAdapter,
    "residual_star": ResidualAdapter,
    "coarse": CoarseAdapter,
    "linear": LinearAdapter,
    "spectral": SpectralAdapter,
    "zeroshot": ZeroShotAdapter,
}
_DATA_ARGS = {"self", "bases", "basis", "head_maps", "n_samples"}


def method_options(method: str) -> list[str]:
    """The options `build_adapter` accepts as overrides for a method.

    Args:
        method: one of `METHODS`.
    """
    if method not in _CLASSES:
        raise ValueError(f"unknown adapter method {method!r}; valid: {', '.join(METHODS)}")
    params = inspect.signature(_CLASSES[method].__init__).parameters
    return [name for name in params if name not in _DATA_ARGS]


def build_adapter(method: str, bases: UnitBases | None, head_maps: Tensor, **overrides: Any) -> Adapter:
    """Build an adapter from its preset, with options overridden.

    Presets fix the method's defaults (`PRESETS`); every option of the method's class may be
    overridden (e.g. ``residual_star`` with ``others="keep"``). Options that the method does not
    have are errors (e.g. ``others`` for ``coarse``).

    Args:
        method: ``residual``, ``residual_star``, ``coarse``, ``linear``, ``spectral`` or ``zeroshot``.
        bases: PCA bases (needed by residual, residual_star and spectral; may be None otherwise).
        head_maps: (L, H, D, k) head maps of the cache.
        **overrides: options of the method's class.

    Raises:
        ValueError: unknown method (listing the valid ones), an option that does not apply to the
            method (naming it and the valid ones), or missing bases.
    """
    if method not in PRESETS:
        close = difflib.get_close_matches(method, METHODS, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown adapter method {method!r}{hint}; valid methods: {', '.join(METHODS)}")
    valid = method_options(method)
    for name in overrides:
        if name not in valid:
            raise ValueError(
                f"option {name!r} does not apply to method {method!r}; its options: {', '.join(valid) or 'none'}"
            )
    kwargs = {**PRESETS[method], **overrides}
    cls = _CLASSES[method]
    if cls in (ResidualAdapter, SpectralAdapter) and bases is None:
        raise ValueError(f"method {method!r} needs PCA bases (fit_unit_bases or UnitBases.load), got None")
    if cls is ResidualAdapter:
        return ResidualAdapter(bases, head_maps, **kwargs)
    if cls is SpectralAdapter:
        return SpectralAdapter.from_bases(bases, head_maps, **kwargs)
    return cls(head_maps, **kwargs)

"""ResiDual: the adapter that rescales the principal components of residual units (method.md §2),
and its typed options: `ResidualOptions` (``residual``) and `ResidualStarOptions` (``residual_star``).

``residual`` transforms every head and MLP with all their components and keeps emb as is;
``residual_star`` (ResiDual*) transforms the heads only, each with the smallest K components
explaining more than 90% of its variance, and drops the other units. The transform itself is in
`transform`. Pure torch, no Lightning.

Letters: N samples, L layers, H heads per layer, k compact head coordinates, D embedding size,
K components.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .contributions import (
    EMB,
    Contributions,
    apply_maps,
    cast_maps,
    head_name,
    mlp_name,
    shared_maps,
    sum_heads,
)
from .transform import (
    INITS,
    Adapter,
    AdapterOptions,
    ComponentsSpec,
    Init,
    Others,
    TransformSpec,
    compact_projection,
    float_dtype,
    init_lambdas,
    nan_where,
    per_kind,
    released_square_back,
    resolve_units,
    transform_dense,
    transform_heads,
)
from .unit_bases import UnitBases

__all__ = ["ResidualAdapter", "ResidualOptions", "ResidualStarOptions"]


@dataclass
class ResidualOptions(AdapterOptions):
    """``residual``: rescale the principal components of every head and MLP; emb added as is.

    Attributes:
        transform: units to transform: ``all`` (heads and MLPs), ``heads``, ``mlps``, ``emb``, a
            unit name (``l3.h5``, ``l3.mlp``, ``emb``), a list of names and/or kinds, or a
            ``[start, stop]`` layer range (heads and MLPs of those layers).
        components: per unit, which components to learn: ``all``, an int K (the top K) or a float
            explained-variance threshold in (0, 1]; one value for every kind or a mapping by kind
            (``{heads: 0.9, mlps: all}``).
        others: what the units that are not transformed (emb included) contribute: ``keep`` their
            contribution, ``zero`` nothing, ``mean`` their reference-set mean.
        init: initial λs: ``normal`` (1 + N(0, 1), the authors'), ``ones``,
            ``explained_variance`` (the explained variances), ``singular`` or ``eigen`` (the
            authors' name; both the singular values of the centred reference data). ``eigen`` meant
            the explained variances before this release: it warns once that it changed.
        add_mean: add each transformed unit's reference mean back (the authors do not).
        seed: seed of the ``normal`` init.
        threshold_fallback: what a threshold in `components` keeps in a unit whose components never
            exceed it: ``all`` its components (this framework), ``one`` its first (the authors' code,
            K = 1). None: ``model.threshold_fallback`` (``all`` unless a recipe sets it).
        released_full: reproduce the authors' released ``residual_full`` (their "ResiDual" row),
            which maps back through ``Phi`` instead of ``Phi^T`` (``Phi diag(lambda) Phi (x - mu)``,
            heads written into the first K outputs; docs/reproducing.md). A bug, for comparison
            only: off by default and in configs/recipes/paper.yaml.
    """

    method: ClassVar[str] = "residual"
    needs_bases: ClassVar[bool] = True

    transform: TransformSpec = "all"
    components: ComponentsSpec = "all"
    others: Others = "keep"
    init: Init = "normal"
    add_mean: bool = False
    seed: int = 0
    threshold_fallback: Literal["all", "one"] | None = None
    released_full: bool = False

    def build(self, bases: UnitBases | None, head_maps: Tensor) -> ResidualAdapter:
        """A `ResidualAdapter` on the units' PCA bases."""
        return ResidualAdapter(bases, head_maps, **asdict(self))


@dataclass
class ResidualStarOptions(ResidualOptions):
    """``residual_star`` (ResiDual*): heads only, at 0.9 explained variance, other units dropped.

    Each head learns its smallest K components explaining more than 90% of its variance; emb and
    the MLPs contribute nothing. The same options as `ResidualOptions`, other defaults.

    Attributes:
        transform: units to transform (default: the heads).
        components: which components to learn per unit (default: 0.9 explained variance of each head).
        others: what the other units contribute (default: ``zero``, nothing).
    """

    method: ClassVar[str] = "residual_star"

    transform: TransformSpec = "heads"
    components: ComponentsSpec = field(default_factory=lambda: {"heads": 0.9})
    others: Others = "zero"


class ResidualAdapter(Adapter):
    """ResiDual: rescale the principal components of selected residual units (method.md §2).

    ``z = sum_{u transformed} Phi_u^T diag(lambda_u) Phi_u (c_u - mu_u) (+ mu_u if add_mean)
    + sum_{u not transformed} others(c_u)``, with heads computed in the compact coordinates.

    Learned: one lambda per selected component of each transformed unit. Components not selected
    within a transformed unit have lambda fixed at 0. The lambdas are stored padded, ``(L, H, K)``
    for heads, ``(L, D)`` for MLPs, ``(D,)`` for emb, as Parameters ``head_lambdas``,
    ``mlp_lambdas``, ``emb_lambdas`` (each only if some unit of that kind is transformed), their
    starting values as buffers ``*_lambdas_init``; the forward multiplies them by the boolean
    buffers ``*_select``, so masked entries get zero gradient and never matter. `num_learned`
    counts the selected entries only.

    Args:
        bases: PCA bases of the units (`fit_unit_bases`).
        head_maps: (L, H, D, k) head maps of the cache the bases were fitted on.
        transform: units to transform (see `ResidualOptions`).
        components: per unit, which components to learn (see `ResidualOptions`).
        others: what the units that are not transformed (emb included) contribute: ``"keep"``
            their contribution c_u, ``"zero"`` nothing, ``"mean"`` their reference-set mean mu_u.
        init: lambda init: ``"ones"``, ``"normal"`` (1 + N(0, 1), the authors'), ``"eigen"``
            or ``"singular"`` (singular values), ``"explained_variance"`` (see `init_lambdas`).
        add_mean: add mu_u back to each transformed unit (the authors do not).
        seed: seed of the ``"normal"`` init.
        threshold_fallback: ``"all"`` (None: the same) or ``"one"``: what a threshold keeps in a
            unit that never exceeds it (`select_components`).
        released_full: map back through Phi instead of Phi^T, as the authors' released
            ``residual_full`` (`released_square_back`).

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
        threshold_fallback: Literal["all", "one"] | None = None,
        released_full: bool = False,
    ) -> None:
        super().__init__()
        if others not in ("keep", "zero", "mean"):
            raise ValueError(f"unknown others={others!r}; valid: keep, zero, mean")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        layers, heads, dim, k = head_maps.shape
        want = (bases.num_layers, bases.num_heads, bases.output_dim, bases.head_dim)
        if (layers, heads, dim, k) != want:
            raise ValueError(
                f"head_maps shape {tuple(head_maps.shape)} does not match the bases' (L, H, D, k) {want}"
            )
        dtype = float_dtype(head_maps)
        bases = bases.to(device=head_maps.device, dtype=dtype)
        maps = cast_maps(head_maps, dtype)  # the full form's identity stays a view
        # Guard against bases fitted on another cache: their head means must be A @ ybar.
        mean = apply_maps(maps, bases.head_coord_mean)  # (L, H, D)
        err = (mean - bases.heads.mean).norm() / bases.heads.mean.norm().clamp_min(1e-12)
        if err > 1e-3:
            raise ValueError(
                f"the bases' head means differ from head_maps @ head_coord_mean (relative error {err:.2e}): "
                "the bases were fitted on a cache with other head maps"
            )
        self.transform, self.others, self.init, self.add_mean = transform, others, init, add_mean
        self.released_full = released_full  # the back maps are derived in `forward`: not stored
        self.pooler_units = tuple(bases.pooler_units) if bases.pooler is not None else ()
        th, tm, te, tp = resolve_units(transform, layers, heads, self.pooler_units)
        th, tm, tp = th.to(maps.device), tm.to(maps.device), tp.to(maps.device)
        sel = per_kind(components)
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
        if self.pooler_units:  # a MAP readout's pooler units: (N, D) each, like an MLP
            self.register_buffer("pooler_transformed", tp)  # (P,)
            kinds["pooler"] = (bases.pooler, tp, sel["pooler"])
        for prefix, (basis, chosen, selection) in kinds.items():
            lam = init_lambdas(init, basis, bases.n_samples, gen)  # drawn for every kind: seed-stable
            if not chosen.any():
                continue
            select = basis.select(selection, threshold_fallback or "all") & chosen[..., None]  # (*U, K)
            self.register_buffer(f"{prefix}_select", select)
            self.register_buffer(f"{prefix}_components", basis.components)  # (*U, K, D)
            start = (lam.to(select.device) * select).to(dtype)  # (*U, K)
            self.register_parameter(f"{prefix}_lambdas", nn.Parameter(start.clone()))
            drawn = lam if init in ("ones", "normal") else None  # eigen/singular: from the bases
            self._record_initial(f"{prefix}_lambdas_init", start, drawn, f"{prefix}_select")
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
        if self.pooler_units:
            self.register_buffer(
                "pooler_keep", (~tp).to(dtype) if keep else torch.zeros_like(tp, dtype=dtype)
            )
        if bool(self.head_keep.any()):  # (L, H, D, k); the full form's identity: a view, not stored
            self.register_buffer("head_maps", maps, persistent=not shared_maps(maps))
        if others == "mean":
            const += (bases.heads.mean * (~th)[..., None]).sum((0, 1))
            const += (bases.mlps.mean * (~tm)[..., None]).sum(0)
            const += bases.emb.mean * float(not te)
            if self.pooler_units:
                const += (bases.pooler.mean * (~tp)[..., None]).sum(0)
        self.register_buffer("const", const)  # (D,)

    def _lambdas(self, prefix: str) -> Tensor | None:
        lam = getattr(self, f"{prefix}_lambdas", None)
        return None if lam is None else lam * getattr(self, f"{prefix}_select")

    def _back(self, prefix: str) -> Tensor | None:
        """The map back of a kind: None (Phi^T), or the released ``residual_full``'s."""
        return released_square_back(getattr(self, f"{prefix}_components")) if self.released_full else None

    def forward(self, batch: Contributions) -> Tensor:
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
            out = out + transform_heads(
                y, self.head_coords, self.head_offset, lam, self.head_components, self._back("head")
            )
        lam = self._lambdas("mlp")
        if lam is not None:
            out = out + transform_dense(mlps, self.mlp_components, self.mlp_mean, lam, self._back("mlp"))
        lam = self._lambdas("emb")
        if lam is not None:
            back = self._back("emb")
            out = out + transform_dense(
                emb[:, None], self.emb_components[None], self.emb_mean[None], lam[None],
                None if back is None else back[None],
            )  # fmt: skip
        if hasattr(self, "head_maps"):
            out = out + sum_heads(self.head_maps, y * self.head_keep[..., None])
        out = out + torch.einsum("nld,l->nd", mlps, self.mlp_keep) + emb * self.emb_keep
        if batch.pooler_names() != list(self.pooler_units):
            raise ValueError(
                f"the batch has the pooler units {batch.pooler_names()} and the adapter {list(self.pooler_units)}"
            )
        if self.pooler_units:
            pooled = torch.stack([batch.extra[n] for n in self.pooler_units], dim=1).to(dtype)  # (N, P, D)
            lam = self._lambdas("pooler")
            if lam is not None:
                back = self._back("pooler")
                out = out + transform_dense(pooled, self.pooler_components, self.pooler_mean, lam, back)
            out = out + torch.einsum("npd,p->nd", pooled, self.pooler_keep)
        return out

    def num_learned(self) -> int:
        """Number of learned lambdas: the selected components of the transformed units."""
        return sum(int(getattr(self, f"{p}_select").sum()) for p in _PREFIX if hasattr(self, f"{p}_lambdas"))

    def _by_kind(self, suffix: str) -> dict[str, Tensor]:
        return {
            kind: nan_where(getattr(self, f"{prefix}{suffix}"), getattr(self, f"{prefix}_select"))
            for prefix, kind in _PREFIX.items()
            if hasattr(self, f"{prefix}_lambdas")
        }

    def unit_weights(self) -> dict[str, Tensor]:
        """Lambdas by kind: ``heads`` (L, H, K), ``mlps`` (L, D), ``emb`` (D,), ``pooler`` (P, D);
        NaN where not learned.

        Kinds without any transformed unit are absent.
        """
        return self._by_kind("_lambdas")

    def initial_unit_weights(self) -> dict[str, Tensor]:
        """The lambdas at construction, like `unit_weights` (NaN also where not known)."""
        return self._by_kind("_lambdas_init")

    def transformed_units(self) -> list[str]:
        """Names of the transformed units, in the authors' order (emb, MLPs, heads, pooler units)."""
        names = [EMB] if bool(self.emb_transformed) else []
        names += [mlp_name(layer) for layer in self.mlp_transformed.nonzero().flatten().tolist()]
        names += [head_name(layer, h) for layer, h in self.head_transformed.nonzero().tolist()]
        if self.pooler_units:
            names += [self.pooler_units[i] for i in self.pooler_transformed.nonzero().flatten().tolist()]
        return names


# parameter prefix -> unit_weights key
_PREFIX = {"head": "heads", "mlp": "mlps", "emb": "emb", "pooler": "pooler"}

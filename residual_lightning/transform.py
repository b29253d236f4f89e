"""The ResiDual transform (method.md §2) and the two interfaces every adapter shares, pure torch.

``RD_u(c) = Phi_u^T diag(lambda_u) Phi_u (c - mu_u)`` rescales the principal components of unit u
(`transform_heads`, `transform_dense`). Heads run in the compact coordinates: ``Phi (c - mu) =
(Phi A)(y - ybar)``, so with ``B = Phi A`` (K x k, `compact_projection`) one sample costs
K*k + D*K per head instead of D*k + D*K after expanding. `resolve_transform` turns a transform spec
into the units it selects, `init_lambdas` gives the λs training starts from.

`Adapter` (the module interface) and `AdapterOptions` (a typed dataclass of options per method, the
config schema) live here, below both `adapters` (ResiDual) and `baselines`, so that neither of those
imports the other's classes in a circle.

Letters: N samples, L layers, H heads per layer, k compact head coordinates, D embedding size,
K components, U units.
"""

from __future__ import annotations

import abc
import difflib
import typing
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Literal, TypedDict, Union

import torch
from torch import Tensor, nn

from .contributions import Contributions, head_name, keep_shared_maps, mlp_name, parse_unit, shared_maps
from .unit_bases import PCABasis, Selection, UnitBases

__all__ = [
    "KINDS",
    "Adapter",
    "AdapterOptions",
    "ComponentsSpec",
    "Init",
    "Others",
    "PerKind",
    "TransformSpec",
    "compact_projection",
    "init_lambdas",
    "per_kind",
    "resolve_transform",
    "resolve_units",
    "transform_dense",
    "transform_heads",
]

Init = Literal["ones", "normal", "eigen", "singular", "explained_variance"]
#: Every init, for messages and checks.
INITS: tuple[str, ...] = ("ones", "normal", "eigen", "singular", "explained_variance")
EIGEN_CHANGED = (
    "init: eigen now means the singular values of the centred reference data (the authors' meaning, "
    "the same as init: singular); until this release it meant the explained variances, which are now "
    "init: explained_variance. Set init: explained_variance to keep the previous behaviour"
)
_eigen_warned = False


def warn_eigen_changed() -> None:
    """Warn once per process that ``init: eigen`` changed meaning (`EIGEN_CHANGED`)."""
    global _eigen_warned
    if not _eigen_warned:
        _eigen_warned = True
        warnings.warn(EIGEN_CHANGED, UserWarning, stacklevel=3)


Others = Literal["keep", "zero", "mean"]
#: Units to transform: ``"all"`` (heads, MLPs and pooler units), ``"heads"``, ``"mlps"``, ``"emb"``,
#: ``"pooler"`` (a MAP readout's pooler units) or one unit name; a ``[start, stop]`` layer range (heads and MLPs of layers start..stop-1, Python slice
#: semantics); or a list of unit names and/or kind names. The tuple comes first so that a config's
#: ``[5, 7]`` is read as a range.
TransformSpec = Union[tuple[int, int], list[str], str]
KINDS = ("heads", "mlps", "emb", "pooler")


class PerKind(TypedDict, total=False):
    """Component selection per kind of unit (kinds left out: ``"all"``).

    Attributes:
        heads: the heads' selection.
        mlps: the MLPs' selection.
        emb: the embedding unit's selection.
        pooler: the pooler units' selection (MAP readouts).
    """

    heads: Selection
    mlps: Selection
    emb: Selection
    pooler: Selection


#: Component selection for every kind, or per kind: ``{"heads": 0.9, "mlps": "all"}``.
ComponentsSpec = Union[Selection, PerKind]


# --------------------------------------------------------------------------------------------
# Interfaces
# --------------------------------------------------------------------------------------------


class Adapter(nn.Module, abc.ABC):
    """Common interface of the adapters.

    Subclasses implement `forward` and `num_learned` (abstract), and may override `unit_weights`.
    Learned weights record where they started as buffers (`_record_initial`): checkpoints keep
    them, and a checkpoint written before they existed gets them rebuilt when it loads.
    """

    # Shared head maps (the full form's identity over (L, H)) stay views through .to()/.cuda().
    _apply = keep_shared_maps(nn.Module._apply)

    def __init__(self) -> None:
        super().__init__()
        # initial-λ buffer -> (what was drawn, or None when it depends on data a checkpoint lacks;
        # the buffer holding the mask the draw was multiplied by, if any)
        self._rebuild: dict[str, tuple[Tensor | None, str | None]] = {}

    @abc.abstractmethod
    def forward(self, batch: Contributions) -> Tensor:
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

    def initial_unit_weights(self) -> dict[str, Tensor]:
        """The weights at construction, keyed and shaped like `unit_weights`; NaN where not learned
        (or not known: an ``eigen``/``singular`` init restored from a checkpoint written before the
        initial weights were recorded)."""
        return {}

    def _record_initial(
        self, name: str, value: Tensor, drawn: Tensor | None, select: str | None = None
    ) -> None:
        """Keep `value`, a learned tensor's start, as buffer `name`.

        Args:
            name: the buffer.
            value: the Parameter's initial value.
            drawn: what the init drew before masking (depends on the options only, so an adapter
                built with the same options draws it again); None when it depends on the bases.
            select: the mask buffer `value` is ``drawn * select`` of, if any.
        """
        self.register_buffer(name, value.detach().clone())
        self._rebuild[name] = (None if drawn is None else drawn.detach().cpu(), select)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint written before the initial weights were recorded lacks their buffers: the
        # same options draw the same values (the mask comes from the checkpoint); NaN if unknown.
        for name, (drawn, select) in self._rebuild.items():
            if prefix + name in state_dict:
                continue
            current = getattr(self, name)
            if drawn is None:
                value = torch.full_like(current, float("nan"))
            else:
                value = drawn.to(current)
                if select is not None and prefix + select in state_dict:
                    value = value * state_dict[prefix + select].to(current.device)
            state_dict[prefix + name] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass
class AdapterOptions(abc.ABC):
    """Options of one method's adapter: a dataclass per method whose defaults are its preset.

    A config picks one with ``class_path`` under ``model.adapter``; the fields are its
    ``init_args``, typed and documented, so ``--model.adapter.help <class>`` lists them and a typo or
    a wrong type fails when the config is parsed.
    """

    #: The ``model.method`` these options belong to.
    method: ClassVar[str] = ""
    #: Whether the adapter is built on the PCA bases of the units.
    needs_bases: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # The parser checks Literal fields; this catches the same mistakes from Python.
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            hint, value = hints[f.name], getattr(self, f.name)
            args = typing.get_args(hint)
            if typing.get_origin(hint) is not Literal:  # `Literal[...] | None`: None or one of them
                literal = [a for a in args if typing.get_origin(a) is Literal]
                if not (literal and type(None) in args) or value is None:
                    continue
                args = typing.get_args(literal[0])
            if value not in args:
                valid = ", ".join(map(str, args))
                raise ValueError(f"unknown {f.name}={value!r} for method {self.method!r}; valid: {valid}")

    def with_model_defaults(self, **defaults: Any) -> AdapterOptions:
        """These options with each field that is None and named in `defaults` set from it.

        The model-level switches (``model.threshold_fallback``, ``model.spectral_basis``: what
        configs/recipes/paper.yaml sets for every method at once) reach an adapter this way; an
        option set on the adapter itself wins. Names the options class lacks are ignored.
        """
        names = {f.name for f in fields(self)}
        unset = {k: v for k, v in defaults.items() if k in names and getattr(self, k) is None}
        return replace(self, **unset) if unset else self

    @abc.abstractmethod
    def build(self, bases: UnitBases | None, head_maps: Tensor) -> Adapter:
        """The adapter these options describe.

        Args:
            bases: PCA bases of the units (None for methods that do not need them).
            head_maps: (L, H, D, k) head maps of the cache.
        """

    def to_hparams(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}`` of plain values: the config spelling, and what
        a checkpoint stores (it loads with ``torch.load(weights_only=True)``)."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": asdict(self)}


def float_dtype(head_maps: Tensor) -> torch.dtype:
    """The adapter's dtype: that of the head maps when floating, else float32."""
    return head_maps.dtype if head_maps.is_floating_point() else torch.float32


def nan_where(values: Tensor, mask: Tensor) -> Tensor:
    """A float copy of `values` with NaN where `mask` is False."""
    out = values.detach().clone().float()
    out[~mask] = float("nan")
    return out


# --------------------------------------------------------------------------------------------
# Initial λs and unit selection
# --------------------------------------------------------------------------------------------


def init_lambdas(
    init: Init, basis: PCABasis, n_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Initial scales for the components of a basis (float64, shape (*U, K)).

    Args:
        init: ``"ones"``; ``"normal"``: 1 + N(0, 1), the authors' ``randn`` init;
            ``"explained_variance"``: the explained variances (eigenvalues of the ddof=1
            covariance); ``"singular"`` and ``"eigen"`` (the authors' name): the singular values of
            the centred reference data, ``sqrt(variance * (n - 1))``, what the authors' ``pca_fn``
            returns as ``weights`` (they scale with the reference-set size). ``"eigen"`` meant the
            explained variances before this release and warns once that it changed.
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
    if init == "explained_variance":
        return basis.explained_variance.detach().double().cpu()
    if init in ("singular", "eigen"):
        if init == "eigen":
            warn_eigen_changed()
        return (basis.explained_variance.detach().double().cpu() * (n_samples - 1)).sqrt()
    raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")


def resolve_transform(transform: TransformSpec, layers: int, heads: int) -> tuple[Tensor, Tensor, bool]:
    """Which units a transform spec selects: heads (L, H) bool, MLPs (L,) bool, emb bool.

    Args:
        transform: see `TransformSpec` (any sequence stands for a list).
        layers: L.
        heads: H.

    Raises:
        ValueError: unknown kind or unit name (with close matches), or a bad layer range.
    """
    return resolve_units(transform, layers, heads)[:3]


def resolve_units(
    transform: TransformSpec, layers: int, heads: int, pooler_units: tuple[str, ...] | list[str] = ()
) -> tuple[Tensor, Tensor, bool, Tensor]:
    """`resolve_transform` plus the pooler units it selects, (P,) bool: ``all`` and ``pooler``
    select every one, a unit name its own; a layer range none.

    Args:
        transform: see `TransformSpec`.
        layers: L.
        heads: H.
        pooler_units: the layout's pooler units (`UnitLayout.pooler_units`).
    """
    th = torch.zeros(layers, heads, dtype=torch.bool)
    tm = torch.zeros(layers, dtype=torch.bool)
    te = False
    pooler_units = list(pooler_units)
    tp = torch.zeros(len(pooler_units), dtype=torch.bool)
    if isinstance(transform, str):
        transform = [transform]
    transform = list(transform)
    if len(transform) == 2 and all(isinstance(t, int) and not isinstance(t, bool) for t in transform):
        chosen = list(range(layers)[slice(*transform)])
        if not chosen:
            raise ValueError(f"layer range {tuple(transform)} selects no layer of {layers}")
        th[chosen] = True
        tm[chosen] = True
        return th, tm, te, tp
    names = (
        ["all", *KINDS]
        + [mlp_name(layer) for layer in range(layers)]
        + [head_name(layer, h) for layer in range(layers) for h in range(heads)]
        + pooler_units
    )
    for item in transform:
        if not isinstance(item, str):
            raise ValueError(
                f"transform items must be unit or kind names, or the spec a (start, stop) layer range; "
                f"got {item!r} in {transform!r}"
            )
        try:
            ref = parse_unit(item)
        except ValueError:
            ref = None
        if item == "all":
            th[:], tm[:], tp[:] = True, True, True
        elif item == "pooler":
            tp[:] = True
        elif item in pooler_units:
            tp[pooler_units.index(item)] = True
        elif item == "heads":
            th[:] = True
        elif item == "mlps":
            tm[:] = True
        elif item == "emb":
            te = True
        elif ref is not None and ref.layer < layers and (ref.kind == "mlp" or ref.head < heads):
            if ref.kind == "mlp":
                tm[ref.layer] = True
            else:
                th[ref.layer, ref.head] = True
        else:
            close = difflib.get_close_matches(item, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown unit {item!r} in transform (kinds: all, heads, mlps, emb, pooler; units: emb, "
                f"l<0..{layers - 1}>.mlp, l<l>.h<0..{heads - 1}>{''.join(', ' + n for n in pooler_units)}){hint}"
            )
    return th, tm, te, tp


def per_kind(components: ComponentsSpec) -> dict[str, Selection]:
    """The selection of each kind (``heads``, ``mlps``, ``emb``) from a `ComponentsSpec`.

    Raises:
        ValueError: a mapping with an unknown kind.
    """
    if isinstance(components, Mapping):
        unknown = set(components) - set(KINDS)
        if unknown:
            raise ValueError(f"components: unknown kind(s) {sorted(unknown)}; valid: {', '.join(KINDS)}")
        return {kind: components.get(kind, "all") for kind in KINDS}
    return dict.fromkeys(KINDS, components)


# --------------------------------------------------------------------------------------------
# The transform
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
    if shared_maps(head_maps):  # one (D, k) map for every head: never materialised
        b = components @ head_maps[0, 0].to(components.dtype)  # (L, H, K, k)
    else:
        b = torch.einsum("lhjd,lhdk->lhjk", components, head_maps.to(components.dtype))  # (L, H, K, k)
    offset = torch.einsum("lhjk,lhk->lhj", b, coord_mean.to(components.dtype))  # (L, H, K)
    return b, offset


def transform_heads(
    y: Tensor, b: Tensor, offset: Tensor, lambdas: Tensor, components: Tensor, back: Tensor | None = None
) -> Tensor:
    """Sum over heads of ``Phi^T diag(lambda) Phi (c - mu)``, computed from the compact y.

    Cost per sample and head K*k + D*K; heads or components with lambda = 0 drop out.

    Args:
        y: (N, L, H, k) compact head coordinates.
        b: (L, H, K, k) from `compact_projection`.
        offset: (L, H, K) from `compact_projection`.
        lambdas: (L, H, K) scales (0 for components not used).
        components: (L, H, K, D) head components Phi.
        back: (L, H, K, D) the map back to the output in place of `components` (None: Phi^T, the
            method; `released_square_back` reproduces the authors' released ``residual_full``).

    Returns:
        (N, D), the sum of the transformed head contributions (without their means).
    """
    coords = torch.einsum("lhjk,nlhk->nlhj", b, y) - offset  # (N, L, H, K)
    back = components if back is None else back
    return torch.einsum("nlhj,lhjd->nd", coords * lambdas, back)  # (N, D)


def transform_dense(
    x: Tensor, components: Tensor, mean: Tensor, lambdas: Tensor, back: Tensor | None = None
) -> Tensor:
    """Sum over units of ``Phi^T diag(lambda) Phi (x - mu)`` for units stored in D (MLPs, emb).

    Args:
        x: (N, U, D) contributions.
        components: (U, K, D).
        mean: (U, D).
        lambdas: (U, K) scales (0 for components not used).
        back: (U, K, D) the map back in place of `components` (see `transform_heads`).

    Returns:
        (N, D), the sum of the transformed contributions (without their means).
    """
    offset = torch.einsum("ujd,ud->uj", components, mean)  # (U, K)
    coords = torch.einsum("ujd,nud->nuj", components, x) - offset  # (N, U, K)
    back = components if back is None else back
    return torch.einsum("nuj,ujd->nd", coords * lambdas, back)  # (N, D)


def released_square_back(components: Tensor) -> Tensor:
    """The map back of the authors' released ``residual_full`` (a bug, kept for comparison).

    Their adapter pads every unit's (K, D) basis with zero rows to one square (D, D) tensor and, when
    the stack is square, takes ``bases.mT`` as the inverse of the basis: coordinates then go back
    through ``Phi_pad`` instead of ``Phi_pad^T``, i.e. ``Phi diag(lambda) Phi (x - mu)``. Output
    coordinate i < K receives ``sum_j Phi[i, j] coord_j``; coordinates K.. receive nothing (a head
    with K = d components writes only into the first d outputs). As a (K, D) map like `components`:
    ``back[j, i] = Phi[i, j]`` for i < K, 0 beyond.

    Args:
        components: (*U, K, D) components Phi, K <= D.

    Raises:
        ValueError: K > D (no square padding exists).
    """
    k, dim = components.shape[-2:]
    if k > dim:
        raise ValueError(f"released_full needs K <= D components per unit, got K={k} > D={dim}")
    back = torch.zeros_like(components)  # (*U, K, D)
    back[..., :k] = components[..., :k].transpose(-1, -2)  # (*U, K, K): back[j, i] = Phi[i, j]
    return back

"""PCA bases of the residual units: the result types and component selection, pure torch.

`UnitBases` holds, per unit kind, a `PCABasis` (mean, components, explained variance and ratio,
mask), padded to a fixed K per kind (heads K = d, MLPs/emb K = D) so that shapes depend on the
layout only, never on the data. Components beyond a unit's numerical rank are masked out. Saved
with safetensors (no pickle) and a JSON header. `select_components` picks the components to learn:
``"all"``, a fixed K, or the smallest K whose cumulative explained-variance ratio exceeds a
threshold, as a boolean mask. The bases are fitted by `spectral.fit_unit_bases`.

Letters: L layers, H heads per layer, d head width, k compact head coordinates (d under the default
convention, d + 3 under equal_share), D embedding size, K components, U units.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import Tensor

from .contributions import UnitLayout
from .files import load_tensors, save_tensors

__all__ = ["PCABasis", "Selection", "UnitBases", "Unreached", "select_components"]

#: How many components of a unit to use: ``"all"`` (every component above the numerical rank),
#: an int K (the top K), or a float threshold t in (0, 1] (the smallest K whose cumulative
#: explained-variance ratio exceeds t).
Selection = Union[int, float, Literal["all"]]
#: What an explained-variance threshold keeps in a unit that never exceeds it: ``all`` its valid
#: components (this framework) or ``one`` (the authors' code).
Unreached = Literal["all", "one"]


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

    def select(self, components: Selection, unreached: Unreached = "all") -> Tensor:
        """Boolean (*U, K) mask of the components to use; see `select_components`.

        Args:
            components: ``"all"``, an int K or a float threshold.
            unreached: what a threshold keeps in a unit that never exceeds it (see `select_components`).
        """
        return select_components(self.explained_variance_ratio, self.mask, components, unreached)

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
        pooler: bases of the pooler units (MAP readouts' ``pool.mlp``), units (P,), K = D; None
            when the layout has none.
        pooler_units: their names, in the order of `pooler`.
        compact: whether the heads were cached in the compact form (False: full-form heads, k = D,
            K the head width d).
    """

    heads: PCABasis
    mlps: PCABasis
    emb: PCABasis
    head_coord_mean: Tensor
    n_samples: int
    convention: str = "default"
    output: PCABasis | None = None
    metadata: dict = field(default_factory=dict)
    pooler: PCABasis | None = None
    pooler_units: tuple[str, ...] = ()
    compact: bool = True

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
    def layout(self) -> UnitLayout:
        """The layout of the units these bases describe."""
        form = None
        if self.pooler_units or not self.compact:
            form = {
                "compact": self.compact,
                "head_width": self.heads.num_components,
                "pooler_units": list(self.pooler_units),
            }
        return UnitLayout.from_shape(
            (self.num_layers, self.num_heads, self.head_dim, self.output_dim), self.convention, form
        )

    @property
    def names(self) -> list[str]:
        """Unit names in the authors' order: emb, the L MLPs, the L*H heads layer-major."""
        return self.layout.names

    def unit(self, name: str) -> PCABasis:
        """The basis of one unit by name (``"emb"``, ``"l3.mlp"``, ``"l3.h5"``).

        Args:
            name: the unit name.
        """
        try:
            ref = self.layout.parse(name)
        except ValueError as err:
            raise KeyError(f"unknown unit {name!r}: {err}") from None
        if ref.kind == "emb":
            return self.emb
        if ref.kind == "pooler":
            return self.pooler[self.pooler_units.index(name)]
        return self.mlps[ref.layer] if ref.kind == "mlp" else self.heads[ref.layer, ref.head]

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
            pooler=None if self.pooler is None else self.pooler.to(*args, **kwargs),
            pooler_units=self.pooler_units,
            compact=self.compact,
        )

    @classmethod
    def zeros(cls, layout: UnitLayout, k: int | None = None) -> UnitBases:
        """Zero bases of a layout's shapes: an adapter built on them gets its buffers from a checkpoint.

        Args:
            layout: the units (heads keep ``layout.head_width`` components, k compact coordinates).
            k: compact head width (default ``layout.k``).
        """
        dim, comps = layout.output_dim, layout.head_width

        def basis(*units: int, comps: int) -> PCABasis:
            return PCABasis(
                mean=torch.zeros(*units, dim),
                components=torch.zeros(*units, comps, dim),
                explained_variance=torch.zeros(*units, comps),
                explained_variance_ratio=torch.zeros(*units, comps),
                mask=torch.ones(*units, comps, dtype=torch.bool),
            )

        return cls(
            heads=basis(layout.layers, layout.heads, comps=comps),
            mlps=basis(layout.layers, comps=dim),
            emb=basis(comps=dim),
            head_coord_mean=torch.zeros(layout.layers, layout.heads, layout.k if k is None else k),
            n_samples=2,
            convention=layout.convention,
            output=basis(comps=dim),
            pooler=basis(len(layout.pooler_units), comps=dim) if layout.pooler_units else None,
            pooler_units=tuple(layout.pooler_units),
            compact=layout.compact,
        )

    def _kinds(self) -> dict[str, PCABasis]:
        kinds = {"heads": self.heads, "mlps": self.mlps, "emb": self.emb}
        if self.output is not None:
            kinds["output"] = self.output
        if self.pooler is not None:
            kinds["pooler"] = self.pooler
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
        if self.pooler_units or not self.compact:  # compact bases without pooler units: as before
            header["pooler_units"] = list(self.pooler_units)
            header["compact"] = self.compact
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
            pooler=basis("pooler"),
            pooler_units=tuple(header.get("pooler_units", ())),
            compact=bool(header.get("compact", True)),
        )


# --------------------------------------------------------------------------------------------
# Component selection
# --------------------------------------------------------------------------------------------


def select_components(
    explained_variance_ratio: Tensor, mask: Tensor, components: Selection, unreached: Unreached = "all"
) -> Tensor:
    """Which components of each unit to use, as a boolean mask of the same (*U, K) shape.

    Only unmasked components (above the numerical rank) are ever selected.

    Args:
        explained_variance_ratio: (*U, K) ratios, decreasing along K.
        mask: (*U, K) bool, the valid components.
        components: ``"all"``; an int K >= 0 (the top K valid ones); or a float threshold t in
            (0, 1]: the smallest K whose cumulative explained-variance ratio exceeds t.
        unreached: what a threshold keeps in a unit whose valid components never exceed it (e.g.
            t = 1, or a rank-deficient unit): ``"all"`` its valid components (this framework's
            default) or ``"one"`` its first component only (the authors' code: the argmax of an
            all-false mask is 0, so K = 1; configs/recipes/paper.yaml).

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
    if unreached == "one":
        never = ~(cumulative > threshold).any(-1, keepdim=True)  # (*U, 1)
        k_sel = torch.where(never, torch.ones_like(k_sel), k_sel)
    elif unreached != "all":
        raise ValueError(f"unknown unreached={unreached!r}; valid: all, one")
    return mask & (pos < k_sel)

"""The baselines ResiDual is compared with (method.md §2 table), each next to its typed options.

| method | options | adapter | learned |
|---|---|---|---|
| ``coarse`` | `CoarseOptions` | `CoarseAdapter`: one scalar per head, other units dropped | L*H |
| ``linear`` | `LinearOptions` | `LinearAdapter`: ``nn.Linear(D, D)`` on the embedding | D*D + D |
| ``spectral`` | `SpectralOptions` | `SpectralAdapter`: one scalar per PC of the embedding | D |
| ``zeroshot`` | `ZeroShotOptions` | `ZeroShotAdapter`: the embedding itself | 0 |

Every adapter maps `Contributions` to an adapted image embedding (N, D), not normalised. Frozen
tensors are persistent buffers, learned ones Parameters. Pure torch, no Lightning.

Letters: N samples, L layers, H heads per layer, k compact head coordinates, D embedding size,
K components.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .contributions import Contributions, cast_maps, shared_maps, sum_heads
from .transform import Adapter, AdapterOptions, Init, float_dtype, init_lambdas, nan_where, transform_dense
from .unit_bases import PCABasis, UnitBases

__all__ = [
    "CoarseAdapter",
    "CoarseOptions",
    "LinearAdapter",
    "LinearOptions",
    "SpectralAdapter",
    "SpectralOptions",
    "ZeroShotAdapter",
    "ZeroShotOptions",
]


# --------------------------------------------------------------------------------------------
# coarse
# --------------------------------------------------------------------------------------------


@dataclass
class CoarseOptions(AdapterOptions):
    """``coarse`` ("Optimized" in the paper): one learned scalar per head, every other unit dropped.

    Attributes:
        init: initial head scales: ``ones`` or ``normal`` (1 + N(0, 1), the authors').
        seed: seed of the ``normal`` init.
    """

    method: ClassVar[str] = "coarse"

    init: Literal["ones", "normal"] = "normal"
    seed: int = 0

    def build(self, bases: UnitBases | None, head_maps: Tensor) -> CoarseAdapter:
        """A `CoarseAdapter` (the bases are not used)."""
        return CoarseAdapter(head_maps, **asdict(self))


class CoarseAdapter(Adapter):
    """One learned scalar per head; heads' contributions are scaled, every other unit dropped.

    ``z = sum_{l,h} w_{l,h} c_{l,h}`` (the authors' "Optimized" coarse variant, ablation 'zero').
    The initial scales are kept as the buffer ``head_weights_init``.

    Args:
        head_maps: (L, H, D, k) head maps of the cache.
        init: ``"ones"`` or ``"normal"`` (1 + N(0, 1), the authors').
        seed: seed of the ``"normal"`` init.
    """

    def __init__(self, head_maps: Tensor, init: Literal["ones", "normal"] = "normal", seed: int = 0) -> None:
        super().__init__()
        layers, heads = head_maps.shape[:2]
        dtype = float_dtype(head_maps)
        if init == "ones":
            w = torch.ones(layers, heads, dtype=torch.float64)
        elif init == "normal":
            w = 1.0 + torch.randn(
                layers, heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
            )
        else:
            raise ValueError(f"unknown init {init!r} for coarse; valid: ones, normal")
        self.register_buffer("head_maps", cast_maps(head_maps, dtype), persistent=not shared_maps(head_maps))
        start = w.to(dtype=dtype, device=head_maps.device)  # (L, H)
        self.head_weights = nn.Parameter(start.clone())
        self._record_initial("head_weights_init", start, w)

    def forward(self, batch: Contributions) -> Tensor:
        """Sum of the scaled head contributions (N, D).

        Args:
            batch: cached contributions.
        """
        y = batch.heads.to(self.head_maps.dtype)  # (N, L, H, k)
        return sum_heads(self.head_maps, y * self.head_weights[..., None])

    def num_learned(self) -> int:
        """L*H."""
        return self.head_weights.numel()

    def unit_weights(self) -> dict[str, Tensor]:
        """``heads``: (L, H) per-head scales."""
        return {"heads": self.head_weights.detach().clone().float()}

    def initial_unit_weights(self) -> dict[str, Tensor]:
        """``heads``: (L, H) scales at construction."""
        return {"heads": self.head_weights_init.detach().clone().float()}


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------


@dataclass
class LinearOptions(AdapterOptions):
    """``linear``: ``nn.Linear(D, D)`` on the final image embedding.

    Attributes:
        identity_init: start from the identity map and zero bias (the zero-shot embedding); false
            keeps ``nn.Linear``'s default init, as the authors' code.
        seed: seed of the default init.
    """

    method: ClassVar[str] = "linear"

    identity_init: bool = False
    seed: int = 0

    def build(self, bases: UnitBases | None, head_maps: Tensor) -> LinearAdapter:
        """A `LinearAdapter` (the bases are not used)."""
        return LinearAdapter(head_maps, **asdict(self))


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
        dtype = float_dtype(head_maps)
        self.register_buffer("head_maps", cast_maps(head_maps, dtype), persistent=not shared_maps(head_maps))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = nn.Linear(dim, dim, dtype=dtype, device=head_maps.device)
        if identity_init:
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(dim, dtype=dtype))
                self.linear.bias.zero_()

    def forward(self, batch: Contributions) -> Tensor:
        """``linear(embedding)`` (N, D).

        Args:
            batch: cached contributions.
        """
        dtype = self.head_maps.dtype
        return self.linear(batch.to(dtype).embedding(self.head_maps))

    def num_learned(self) -> int:
        """D*D + D."""
        return sum(p.numel() for p in self.linear.parameters())


# --------------------------------------------------------------------------------------------
# spectral
# --------------------------------------------------------------------------------------------


@dataclass
class SpectralOptions(AdapterOptions):
    """``spectral``: one learned scale per principal component of the final image embedding.

    Attributes:
        init: initial scales: ``ones``, ``normal`` (1 + N(0, 1), the authors'), ``explained_variance``
            (the explained variances), ``singular`` or ``eigen`` (the authors' name; both the singular
            values of the centred reference data; ``eigen`` meant the explained variances before
            this release and warns once).
        add_mean: add the embedding's reference mean back (the authors do not).
        seed: seed of the ``normal`` init.
        basis: the directions scaled: ``output_pca`` (the principal components of the embedding,
            ``Phi^T diag(lambda) Phi (e - mu)``, the paper's text; this framework's default) or
            ``standard`` (the output's standard basis, ``lambda * (e - mu)`` elementwise, what the
            authors' code runs). With ``standard`` the ``explained_variance``/``singular``/``eigen``
            inits use each coordinate's variance on the reference set. None: ``model.spectral_basis``
            (``output_pca`` unless a recipe sets it: configs/recipes/paper.yaml sets ``standard``).
    """

    method: ClassVar[str] = "spectral"
    needs_bases: ClassVar[bool] = True

    init: Init = "normal"
    add_mean: bool = False
    seed: int = 0
    basis: Literal["output_pca", "standard"] | None = None

    def build(self, bases: UnitBases | None, head_maps: Tensor) -> SpectralAdapter:
        """A `SpectralAdapter` on the PCA of the embedding (``bases.output``)."""
        return SpectralAdapter.from_bases(bases, head_maps, **asdict(self))


def standard_basis(pca: PCABasis) -> PCABasis:
    """The output's standard basis as a `PCABasis`: identity components, the PCA's mean, and each
    coordinate's variance ``diag(Phi^T diag(var) Phi)`` as its explained variance (every coordinate
    learned). `SpectralAdapter` on it computes ``lambda * (e - mu)`` elementwise.
    """
    comps, var = pca.components, pca.explained_variance * pca.mask
    dim = comps.shape[-1]
    coord_var = (comps.pow(2) * var[:, None]).sum(0)  # (D,)
    total = coord_var.sum()
    return PCABasis(
        mean=pca.mean,
        components=torch.eye(dim, dtype=comps.dtype, device=comps.device),
        explained_variance=coord_var,
        explained_variance_ratio=coord_var / total if total > 0 else coord_var,
        mask=torch.ones(dim, dtype=pca.mask.dtype, device=pca.mask.device),
    )


class SpectralAdapter(Adapter):
    """One learned scale per principal component of the final image embedding.

    ``z = Phi^T diag(lambda) Phi (e - mu) (+ mu)`` with the PCA (mu, Phi) of the embedding on a
    reference set (``bases.output``; the authors: ImageNet train). The initial lambdas are kept as
    the buffer ``lambdas_init``.

    Args:
        basis: PCA of the final embedding (units (), K components).
        head_maps: (L, H, D, k) head maps of the cache.
        init: ``"ones"``, ``"normal"``, ``"eigen"``, ``"singular"`` or ``"explained_variance"``
            (see `init_lambdas`).
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
        dtype = float_dtype(head_maps)
        basis = basis.to(device=head_maps.device, dtype=dtype)
        if basis.components.ndim != 2:
            raise ValueError(
                f"spectral needs one (K, D) basis, got components {tuple(basis.components.shape)}"
            )
        lam = init_lambdas(init, basis, n_samples, torch.Generator().manual_seed(seed))
        self.add_mean, self.init = add_mean, init
        self.register_buffer("head_maps", cast_maps(head_maps, dtype), persistent=not shared_maps(head_maps))
        self.register_buffer("components", basis.components)  # (K, D)
        self.register_buffer("mean", basis.mean)  # (D,)
        self.register_buffer("select", basis.mask)  # (K,)
        start = (lam.to(basis.mask.device) * basis.mask).to(dtype)  # (K,)
        self.lambdas = nn.Parameter(start.clone())
        self._record_initial("lambdas_init", start, lam if init in ("ones", "normal") else None, "select")

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
        kind = kwargs.pop("basis", None) or "output_pca"
        if kind == "standard":
            return cls(standard_basis(bases.output), head_maps, **kwargs)
        if kind != "output_pca":
            raise ValueError(f"unknown spectral basis {kind!r}; valid: output_pca, standard")
        return cls(bases.output, head_maps, **kwargs)

    def forward(self, batch: Contributions) -> Tensor:
        """The rescaled embedding (N, D).

        Args:
            batch: cached contributions.
        """
        dtype = self.head_maps.dtype
        e = batch.to(dtype).embedding(self.head_maps)  # (N, D)
        out = transform_dense(
            e[:, None], self.components[None], self.mean[None], (self.lambdas * self.select)[None]
        )
        return out + self.mean if self.add_mean else out

    def num_learned(self) -> int:
        """Number of components (D for a full-rank embedding)."""
        return int(self.select.sum())

    def unit_weights(self) -> dict[str, Tensor]:
        """``output``: (K,) lambdas, NaN where masked."""
        return {"output": nan_where(self.lambdas, self.select)}

    def initial_unit_weights(self) -> dict[str, Tensor]:
        """``output``: (K,) lambdas at construction, NaN where masked."""
        return {"output": nan_where(self.lambdas_init, self.select)}


# --------------------------------------------------------------------------------------------
# zeroshot
# --------------------------------------------------------------------------------------------


@dataclass
class ZeroShotOptions(AdapterOptions):
    """``zeroshot``: nothing learned, the backbone's embedding against the classifier; no options."""

    method: ClassVar[str] = "zeroshot"

    def build(self, bases: UnitBases | None, head_maps: Tensor) -> ZeroShotAdapter:
        """A `ZeroShotAdapter` (the bases are not used)."""
        return ZeroShotAdapter(head_maps)


class ZeroShotAdapter(Adapter):
    """Nothing learned: the backbone's embedding, recomposed from the cache.

    Args:
        head_maps: (L, H, D, k) head maps of the cache.
    """

    def __init__(self, head_maps: Tensor) -> None:
        super().__init__()
        maps = cast_maps(head_maps, float_dtype(head_maps))  # (L, H, D, k); the identity: a view, not stored
        self.register_buffer("head_maps", maps, persistent=not shared_maps(maps))

    def forward(self, batch: Contributions) -> Tensor:
        """The embedding (N, D).

        Args:
            batch: cached contributions.
        """
        dtype = self.head_maps.dtype
        return batch.to(dtype).embedding(self.head_maps)

    def num_learned(self) -> int:
        """0."""
        return 0

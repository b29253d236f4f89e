"""The contract every layer shares: the layout of a ViT's residual units and their contributions.

`UnitLayout` is the one description of a backbone's units: their shapes, their names (built and
parsed here and nowhere else: ``emb``, ``l{l}.mlp``, ``l{l}.h{h}``, plus any pooler units a
library adds), and selections of them. `Contributions` is the one type of unit contributions:
the decomposition returns it, the activation cache stores and yields it, the adapters and the
model consume it. Pure torch: no Lightning, nothing from the data layer.

Letters: N images, U units (1 + L + L*H + pooler units), L layers, H heads per layer, d head
width, k compact head width (d, or d + 3 under ``equal_share``), D output embedding size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, TypedDict

import torch
from torch import Tensor

Convention = Literal["default", "equal_share"]
CONVENTIONS: tuple[str, ...] = ("default", "equal_share")

# Extra compact coordinates a head carries under the equal-share convention: 1/sigma, mean/sigma, 1.
EQUAL_SHARE_EXTRA = 3

EMB = "emb"
_UNIT = re.compile(r"^l(?P<layer>\d+)\.(?:(?P<mlp>mlp)|h(?P<head>\d+))$")


class UnitRef(NamedTuple):
    """A parsed unit name: ``kind`` is ``emb``, ``mlp``, ``head`` or ``pooler``."""

    kind: str
    layer: int | None = None
    head: int | None = None


def mlp_name(layer: int) -> str:
    """The name of layer `layer`'s MLP unit."""
    return f"l{layer}.mlp"


def head_name(layer: int, head: int) -> str:
    """The name of head `head` of layer `layer`."""
    return f"l{layer}.h{head}"


def parse_unit(name: str) -> UnitRef:
    """Parse ``emb``, ``l{l}.mlp`` or ``l{l}.h{h}`` (no range check; see `UnitLayout.parse`).

    Raises:
        ValueError: any other string, naming the valid forms.
    """
    if name == EMB:
        return UnitRef("emb")
    m = _UNIT.match(name)
    if m is None:
        raise ValueError(f"unit name {name!r} is not 'emb', 'l<layer>.mlp' or 'l<layer>.h<head>'")
    if m["mlp"]:
        return UnitRef("mlp", int(m["layer"]))
    return UnitRef("head", int(m["layer"]), int(m["head"]))


class UnitForm(TypedDict, total=False):
    """What a layout's ``(L, H, k, D)`` shape leaves out (`UnitLayout.form`).

    Attributes:
        compact: whether heads have the compact ``head_maps @ y`` form (False: heads are stored
            as (N, L, H, D), their head maps the identity, never stored).
        head_width: d, the width of one head (k = D in the full form says nothing of it).
        pooler_units: names of the pooler's units, after the heads.
    """

    compact: bool
    head_width: int
    pooler_units: list[str]


@dataclass(frozen=True)
class UnitLayout:
    """Shape and names of a ViT's residual units.

    Attributes:
        layers: L, the number of residual blocks.
        heads: H, attention heads per block.
        head_width: d, the width of one head.
        output_dim: D, the size of the image embedding.
        convention: how the final LayerNorm's constants were split; it sets k, the compact head
            width (d, or d + 3 under ``equal_share``).
        width: W, the transformer width (0 when only the compact shape is known).
        pool: how the embedding is read: ``"tok"`` (CLS token), ``"avg_ln"`` (mean of the patch
            tokens, then one LayerNorm) or ``"ln_avg"`` (a LayerNorm per token, then the mean).
        library: the library the model came from (``open_clip``, ...).
        pooler_units: names of extra units a pooler adds (an attention pooler's own MLP), stored
            in the full (N, D) form after the heads.
        compact: whether heads have the compact ``head_maps @ y`` form; False: every unit is
            stored as (N, D).
    """

    layers: int
    heads: int
    head_width: int
    output_dim: int
    convention: Convention = "default"
    width: int = 0
    pool: Literal["tok", "avg_ln", "ln_avg", "map"] = "tok"
    library: str = "open_clip"
    pooler_units: tuple[str, ...] = ()
    compact: bool = True

    @classmethod
    def from_shape(
        cls, shape: Sequence[int], convention: Convention = "default", form: UnitForm | None = None
    ) -> UnitLayout:
        """The layout of an ``(L, H, k, D)`` shape and its `form` (what caches and checkpoints record).

        Args:
            shape: ``(L, H, k, D)``.
            convention: the decomposition convention.
            form: `UnitLayout.form` of a layout with pooler units or full-form heads (None: a
                compact layout without pooler units, whose shape says everything).

        Raises:
            ValueError: k too small for the convention, or a full form whose k is not D.
        """
        layers, heads, k, dim = (int(v) for v in shape)
        if form:
            compact = bool(form.get("compact", True))
            pooler = tuple(str(n) for n in form.get("pooler_units", ()))
            if not compact:
                if k != dim:
                    raise ValueError(f"shape {tuple(shape)} of full-form heads must have k = D = {dim}")
                width = int(form["head_width"])
                return cls(layers, heads, width, dim, convention, pooler_units=pooler, compact=False)
        else:
            pooler = ()
        extra = EQUAL_SHARE_EXTRA if convention == "equal_share" else 0
        if k - extra < 1:
            raise ValueError(f"shape {tuple(shape)} has k={k}, too small for the {convention} convention")
        return cls(layers, heads, k - extra, dim, convention, pooler_units=pooler)

    @property
    def form(self) -> UnitForm | None:
        """What `shape` leaves out, as plain values (None for a compact layout without pooler units).

        ``{"compact": ..., "head_width": d, "pooler_units": [...]}``: a data module links it into
        the model beside `shape`, checkpoints and cache metadata record it, and `from_shape`
        rebuilds the layout from both.
        """
        if self.compact and not self.pooler_units:
            return None
        return {
            "compact": self.compact,
            "head_width": self.head_width,
            "pooler_units": list(self.pooler_units),
        }

    def with_convention(self, convention: Convention) -> UnitLayout:
        """The same units under another convention."""
        return replace(self, convention=convention)

    @property
    def k(self) -> int:
        """Width of the stored head coordinates: d, or d + 3 under ``equal_share``; D in the full form."""
        if not self.compact:
            return self.output_dim
        return self.head_width + (EQUAL_SHARE_EXTRA if self.convention == "equal_share" else 0)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(L, H, k, D)`` (k = D for full-form heads: see `form`)."""
        return (self.layers, self.heads, self.k, self.output_dim)

    @property
    def mlp_names(self) -> list[str]:
        """``l{l}.mlp`` for every layer."""
        return [mlp_name(layer) for layer in range(self.layers)]

    @property
    def head_names(self) -> list[str]:
        """``l{l}.h{h}``, layer-major."""
        return [head_name(layer, h) for layer in range(self.layers) for h in range(self.heads)]

    @property
    def names(self) -> list[str]:
        """Unit names in the authors' order: emb, the L MLPs, the L*H heads layer-major, pooler units."""
        return [EMB, *self.mlp_names, *self.head_names, *self.pooler_units]

    @property
    def num_units(self) -> int:
        """U = 1 + L + L*H (+ pooler units)."""
        return 1 + self.layers + self.layers * self.heads + len(self.pooler_units)

    def parse(self, name: str) -> UnitRef:
        """Parse a unit name of this layout.

        Raises:
            ValueError: not a unit name, or a layer/head outside this layout (named).
        """
        if name in self.pooler_units:
            return UnitRef("pooler")
        ref = parse_unit(name)
        if ref.layer is not None and not 0 <= ref.layer < self.layers:
            raise ValueError(f"unit {name!r}: layer {ref.layer} is outside 0..{self.layers - 1}")
        if ref.head is not None and not 0 <= ref.head < self.heads:
            raise ValueError(f"unit {name!r}: head {ref.head} is outside 0..{self.heads - 1}")
        return ref

    def index(self, name: str) -> int:
        """Position of a unit in `names` (the order of dim 1 of the full (N, U, D) form)."""
        ref = self.parse(name)
        if ref.kind == "emb":
            return 0
        if ref.kind == "mlp":
            return 1 + ref.layer
        if ref.kind == "head":
            return 1 + self.layers + ref.layer * self.heads + ref.head
        return 1 + self.layers + self.layers * self.heads + self.pooler_units.index(name)

    def select(self, units: str | Iterable[str]) -> list[str]:
        """Unit names from a selection: kinds (``heads``, ``mlps``, ``emb``, ``all``) and/or names.

        Raises:
            ValueError: an unknown kind or name (named), or an empty selection.
        """
        kinds = {"heads": self.head_names, "mlps": self.mlp_names, "emb": [EMB], "all": self.names}
        chosen: list[str] = []
        for item in [units] if isinstance(units, str) else list(units):
            if item in kinds:
                chosen += kinds[item]
            else:
                self.parse(item)
                chosen.append(item)
        if not chosen:
            raise ValueError("the unit selection is empty")
        return list(dict.fromkeys(chosen))


@dataclass
class Contributions:
    """Unit contributions of N images in the compact, exact form (the one contributions type).

    The image embedding is ``emb + mlps.sum(1) + einsum("lhdk,nlhk->nd", head_maps, heads)``
    (`embedding`); ``head_maps`` (L, H, D, k) is fixed per backbone, so a cache stores it once and
    a model keeps it as a buffer: batches read from a cache carry none and take the model's.
    Pooler units (names after the heads, e.g. ``pool.mlp`` of a MAP readout) are (N, D) tensors
    in `extra` by name and are part of `embedding` and `expand`. Without a compact form
    (``UnitLayout.compact`` False, MAP readouts) ``heads`` is (N, L, H, D) and ``head_maps`` is
    the identity expanded over (L, H) (a view: one (D, D) matrix in memory).

    Attributes:
        heads: (N, L, H, k) head coordinates y.
        mlps: (N, L, D) MLP contributions.
        emb: (N, D) embedding contribution (with the constants the convention folds into it).
        label: (N,) class indices, when known.
        head_maps: (L, H, D, k) fixed maps: head (l, h)'s contribution is ``head_maps[l, h] @ y``.
        names: the U unit names (`UnitLayout.names`).
        convention: the convention the constant terms were split with.
        extra: whatever a reader adds: pooler units' (N, D) contributions by name (tensors here
            follow `to`, `float` and indexing).
    """

    heads: Tensor
    mlps: Tensor
    emb: Tensor
    label: Tensor | None = None
    head_maps: Tensor | None = None
    names: list[str] = field(default_factory=list)
    convention: str = "default"
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.heads.shape[0]

    def _maps(self, head_maps: Tensor | None) -> Tensor:
        maps = head_maps if head_maps is not None else self.head_maps
        if maps is None:
            raise ValueError("these contributions carry no head_maps: pass the cache's or model's")
        if _shared(maps):  # one map for every head (the full form's identity): cast it once
            return maps[0, 0].to(self.heads.dtype).expand(maps.shape)
        return maps.to(self.heads.dtype)

    def head_contributions(self, head_maps: Tensor | None = None) -> Tensor:
        """(N, L, H, D) contributions of every head."""
        maps = self._maps(head_maps)
        if _shared(maps):
            return self.heads @ maps[0, 0].T  # (N, L, H, D)
        return torch.einsum("lhdk,nlhk->nlhd", maps, self.heads)  # (N, L, H, D)

    def pooler_names(self) -> list[str]:
        """The pooler units among `names` (after the heads); their (N, D) contributions are in `extra`."""
        layers, heads = self.heads.shape[1:3]
        return list(self.names[1 + layers + layers * heads :])

    def _pooler(self) -> list[Tensor]:
        """The pooler units' (N, D) contributions, in the order of `names`."""
        missing = [name for name in self.pooler_names() if name not in self.extra]
        if missing:
            raise ValueError(f"pooler units {missing} are in names but not in extra")
        return [self.extra[name] for name in self.pooler_names()]

    def embedding(self, head_maps: Tensor | None = None) -> Tensor:
        """The backbone's image embedding (N, D) recomposed exactly: the sum of every unit."""
        maps = self._maps(head_maps)
        if _shared(maps):
            heads = self.heads.sum((1, 2)) @ maps[0, 0].T  # (N, D)
        else:
            heads = torch.einsum("lhdk,nlhk->nd", maps, self.heads)  # (N, D)
        out = self.emb + self.mlps.sum(1) + heads
        for pooled in self._pooler():
            out = out + pooled
        return out

    def expand(self, head_maps: Tensor | None = None) -> Tensor:
        """(N, U, D) contributions in the order of `names` (pooler units last), exactly."""
        n, layers, heads = self.heads.shape[:3]
        # Exactness is a float32 property: keep autocast from rounding the expansion to bf16.
        with torch.autocast(device_type=self.heads.device.type, enabled=False):
            head_c = self.head_contributions(head_maps).reshape(n, layers * heads, -1)  # (N, L*H, D)
        dtype = head_c.dtype
        pooled = [p[:, None].to(dtype) for p in self._pooler()]
        return torch.cat([self.emb[:, None].to(dtype), self.mlps.to(dtype), head_c, *pooled], dim=1)

    def _map(self, fn) -> Contributions:
        extra = {k: fn(v) if isinstance(v, Tensor) else v for k, v in self.extra.items()}
        return replace(self, heads=fn(self.heads), mlps=fn(self.mlps), emb=fn(self.emb), extra=extra)

    def to(self, *args, **kwargs) -> Contributions:
        """Move/cast the contributions (labels keep their dtype but follow the device)."""
        device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        out = self._map(lambda t: t.to(*args, **kwargs))
        if self.label is not None and device is not None:
            out.label = self.label.to(device)
        return out

    def float(self) -> Contributions:
        """Float32 contributions (caches store float16 by default)."""
        return self._map(lambda t: t.float())

    def pin_memory(self) -> Contributions:
        """Pinned copy, so DataLoader(pin_memory=True) works with this type."""
        out = self._map(lambda t: t.pin_memory())
        out.label = self.label.pin_memory() if self.label is not None else None
        return out

    def __getitem__(self, index) -> Contributions:
        """The contributions (and labels) of a subset of the N images; head maps are shared."""
        out = self._map(lambda t: t[index])
        out.label = self.label[index] if self.label is not None else None
        return out


def _shared(maps: Tensor) -> bool:
    """Whether (L, H, D, k) head maps are one map expanded over the heads (zero strides, a view)."""
    return maps.ndim == 4 and maps.stride(0) == 0 and maps.stride(1) == 0


def shared_maps(maps: Tensor) -> bool:
    """Whether (L, H, D, k) head maps are one (D, k) map expanded over (L, H) (a view, e.g. the
    full form's identity): then they are never materialised nor stored."""
    return _shared(maps)


def identity_maps(
    layers: int,
    heads: int,
    dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The full form's (L, H, D, D) head maps: one (D, D) identity expanded over (L, H) (a view)."""
    return torch.eye(dim, device=device, dtype=dtype).expand(layers, heads, dim, dim)


def layout_maps(layout: UnitLayout, device=None, dtype: torch.dtype | None = None) -> Tensor:
    """Head maps of a layout as a model starts with them: the identity view in the full form,
    zeros (filled from a cache or checkpoint) in the compact one."""
    layers, heads, k, dim = layout.shape
    if not layout.compact:
        return identity_maps(layers, heads, dim, device, dtype)
    return torch.zeros(layers, heads, dim, k, device=device, dtype=dtype)


def cast_maps(maps: Tensor, *args, **kwargs) -> Tensor:
    """``maps.to(*args, **kwargs)``, keeping shared maps a view (never materialising them)."""
    if _shared(maps):
        return maps[0, 0].to(*args, **kwargs).expand(maps.shape)
    return maps.to(*args, **kwargs)


def apply_maps(maps: Tensor, y: Tensor) -> Tensor:
    """``(..., L, H, k) -> (..., L, H, D)``: every head's ``maps[l, h] @ y``; shared maps as one matmul."""
    if _shared(maps):
        return y @ maps[0, 0].mT
    return torch.einsum("lhdk,...lhk->...lhd", maps, y)


def sum_heads(maps: Tensor, y: Tensor) -> Tensor:
    """``(N, L, H, k) -> (N, D)``: the sum of every head's ``maps[l, h] @ y``."""
    if _shared(maps):
        return y.sum((1, 2)) @ maps[0, 0].mT
    return torch.einsum("lhdk,nlhk->nd", maps, y)


def keep_shared_maps(apply):
    """Wrap ``nn.Module._apply`` so that shared head-map buffers stay views through ``.to()``/
    ``.cuda()``/``.double()`` (moving a view materialises it)."""

    def _apply(self, fn, recurse=True):
        shared = {k: b.shape for k, b in self._buffers.items() if b is not None and _shared(b)}
        for k in shared:
            self._buffers[k] = self._buffers[k][0, 0]
        try:
            return apply(self, fn, recurse)
        finally:
            for k, shape in shared.items():
                self._buffers[k] = self._buffers[k].expand(shape)

    return _apply


@dataclass
class UnitContributions:
    """Per-unit contributions to the image embedding in the full form.

    Attributes:
        contributions: (N, U, D); ``contributions.sum(1)`` equals ``encode_image(images)``.
        names: the U unit names, in the order of dim 1.
    """

    contributions: Tensor
    names: list[str]

    def unit(self, name: str) -> Tensor:
        """The (N, D) contributions of one unit by name."""
        return self.contributions[:, self.names.index(name)]


def expand(compact: Contributions) -> Tensor:
    """(N, U, D) contributions of compact ones, exactly (`Contributions.expand`)."""
    return compact.expand()

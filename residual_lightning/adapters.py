"""Trainable adapters on cached contributions: one typed options class per method, and the factory.

| method | options (``model.adapter``) | adapter | learned |
|---|---|---|---|
| ``residual`` | `ResidualOptions` | `ResidualAdapter`: heads + MLPs, all components, emb kept | L*H*d + L*D |
| ``residual_star`` | `ResidualStarOptions` | `ResidualAdapter`: heads at 0.9 explained variance | selected |
| ``coarse`` | `CoarseOptions` | `CoarseAdapter`: one scalar per head | L*H |
| ``linear`` | `LinearOptions` | `LinearAdapter`: ``nn.Linear(D, D)`` on the embedding | D*D + D |
| ``spectral`` | `SpectralOptions` | `SpectralAdapter`: one scalar per PC of the embedding | D |
| ``zeroshot`` | `ZeroShotOptions` | `ZeroShotAdapter`: the embedding itself | 0 |

Each method's options are a dataclass whose defaults are the method's preset (method.md §2 table;
the authors' gin configs), next to its adapter: ResiDual in `residual`, the baselines in
`baselines`, the transform and the shared interfaces (`Adapter`, `AdapterOptions`) in `transform`.
A config picks the options by ``class_path``; this module is the front door: `OPTIONS` (the default
options of each ``model.method``), `options_for` (what ``model.adapter`` holds: typed options, the
``class_path`` dict checkpoints store, or the deprecated plain dict) and `build_adapter`; every
adapter and options name is importable from here. Pure torch, no Lightning.
"""

from __future__ import annotations

import difflib
import json
import sys
import warnings
from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from typing import Any, TypedDict

from torch import Tensor

from .baselines import (
    CoarseAdapter,
    CoarseOptions,
    LinearAdapter,
    LinearOptions,
    SpectralAdapter,
    SpectralOptions,
    ZeroShotAdapter,
    ZeroShotOptions,
)
from .residual import ResidualAdapter, ResidualOptions, ResidualStarOptions
from .transform import (
    Adapter,
    AdapterOptions,
    ComponentsSpec,
    Init,
    Others,
    TransformSpec,
    init_lambdas,
    resolve_transform,
)
from .unit_bases import UnitBases

__all__ = [
    "METHODS",
    "OPTIONS",
    "PRESETS",
    "Adapter",
    "AdapterOptions",
    "CoarseAdapter",
    "CoarseOptions",
    "LegacyAdapterOptions",
    "LinearAdapter",
    "LinearOptions",
    "ResidualAdapter",
    "ResidualOptions",
    "ResidualStarOptions",
    "SpectralAdapter",
    "SpectralOptions",
    "ZeroShotAdapter",
    "ZeroShotOptions",
    "build_adapter",
    "class_path",
    "init_lambdas",
    "method_options",
    "options_class",
    "options_for",
    "resolve_transform",
]


class LegacyAdapterOptions(TypedDict, total=False):
    """Deprecated: a plain dict of options beside ``model.method``; use the method's options class.

    The old spelling (``model.adapter: {init: ones}``) overrides the method's defaults; it warns,
    naming the new spelling, and stops working in the next release.

    Attributes:
        transform: see `ResidualOptions`.
        components: see `ResidualOptions`.
        others: see `ResidualOptions`.
        init: see `ResidualOptions`.
        add_mean: see `ResidualOptions`.
        seed: see `ResidualOptions`.
        identity_init: see `LinearOptions`.
    """

    transform: TransformSpec
    components: ComponentsSpec
    others: Others
    init: Init
    add_mean: bool
    seed: int
    identity_init: bool


#: The options class of each ``model.method`` (its defaults when ``model.adapter`` is not given).
OPTIONS: dict[str, type[AdapterOptions]] = {
    cls.method: cls
    for cls in (
        ResidualOptions,
        ResidualStarOptions,
        CoarseOptions,
        LinearOptions,
        SpectralOptions,
        ZeroShotOptions,
    )
}
METHODS: tuple[str, ...] = tuple(OPTIONS)
#: Each method's default options as plain dicts (read-only; the options classes are the source).
PRESETS: dict[str, dict[str, Any]] = {method: asdict(cls()) for method, cls in OPTIONS.items()}


def options_class(method: str) -> type[AdapterOptions]:
    """The options class of a method.

    Raises:
        ValueError: unknown method, with close matches and the valid ones.
    """
    if method not in OPTIONS:
        close = difflib.get_close_matches(method, METHODS, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown adapter method {method!r}{hint}; valid methods: {', '.join(METHODS)}")
    return OPTIONS[method]


def method_options(method: str) -> list[str]:
    """The options of a method (the fields of its options class).

    Args:
        method: one of `METHODS`.
    """
    return [f.name for f in fields(options_class(method))]


def class_path(cls: type[AdapterOptions]) -> str:
    """How configs and messages name an options class: from this module, which exports every method's."""
    module = __name__ if cls in OPTIONS.values() else cls.__module__
    return f"{module}.{cls.__qualname__}"


def _cli_value(value: Any) -> str:
    """A value as one shell word for ``--model.adapter.<name>``."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"'{text}'" if " " in text else text


def _from_class_path(spec: Mapping[str, Any]) -> AdapterOptions:
    """Options from ``{"class_path": ..., "init_args": {...}}``; only imported modules are looked in."""
    path = str(spec["class_path"])
    module, _, name = path.rpartition(".")
    found = getattr(sys.modules.get(module), name, None) if module else globals().get(name)
    if not (isinstance(found, type) and issubclass(found, AdapterOptions)):
        known = ", ".join(class_path(c) for c in OPTIONS.values())
        raise ValueError(f"model.adapter class_path {path!r} is not an adapter options class; known: {known}")
    args = dict(spec.get("init_args") or {})
    valid = [f.name for f in fields(found)]
    wrong = [k for k in args if k not in valid]
    if wrong:
        raise ValueError(
            f"model.adapter option(s) {wrong} are not options of {path}; its options: {', '.join(valid)}"
        )
    return found(**args)


def options_for(method: str, adapter: AdapterOptions | Mapping[str, Any] | None = None) -> AdapterOptions:
    """The typed options of `method` from what ``model.adapter`` holds.

    Args:
        method: one of `METHODS`.
        adapter: None (the method's defaults); an `AdapterOptions` of that method;
            ``{"class_path": ..., "init_args": {...}}`` (how checkpoints store options); or,
            deprecated, a plain dict of options overriding the method's defaults (it warns, naming
            the new spelling).

    Raises:
        ValueError: unknown method, options of another method, or options the method does not have.
    """
    cls = options_class(method)
    if adapter is None:
        return cls()
    if isinstance(adapter, Mapping) and "class_path" in adapter:
        adapter = _from_class_path(adapter)
    if isinstance(adapter, AdapterOptions):
        if adapter.method != method:
            raise ValueError(
                f"model.adapter holds {type(adapter).__name__}, the options of method {adapter.method!r}, "
                f"but model.method is {method!r}: set model.method: {adapter.method} or use {class_path(cls)}"
            )
        return adapter
    options, valid = dict(adapter), method_options(method)
    wrong = [k for k in options if k not in valid]
    if wrong:
        raise ValueError(
            f"model.adapter option(s) {wrong} do not apply to method {method!r}; its options: "
            f"{', '.join(valid) or 'none'}"
        )
    if options:
        warnings.warn(
            f"model.adapter as a plain dict beside model.method is deprecated and stops working in the "
            f"next release: write `model.adapter: {{class_path: {class_path(cls)}, "
            f"init_args: {json.dumps(options)}}}` (command line: --model.adapter {cls.__qualname__} "
            + " ".join(f"--model.adapter.{k} {_cli_value(v)}" for k, v in options.items())
            + "); checkpoints that store the old spelling still load",
            FutureWarning,
            stacklevel=3,
        )
    return cls(**options)


def build_adapter(
    method: str | AdapterOptions, bases: UnitBases | None, head_maps: Tensor, **overrides: Any
) -> Adapter:
    """Build an adapter from a method's options.

    Args:
        method: a method name (its default options, `OPTIONS`) or the options themselves.
        bases: PCA bases (needed by residual, residual_star and spectral; may be None otherwise).
        head_maps: (L, H, D, k) head maps of the cache.
        **overrides: options replacing those of `method` (e.g. ``residual_star`` with
            ``others="keep"``).

    Raises:
        ValueError: unknown method (listing the valid ones), an option that does not apply to the
            method (naming it and the valid ones), a bad option value, or missing bases.
    """
    options = method if isinstance(method, AdapterOptions) else options_class(method)()
    valid = [f.name for f in fields(options)]
    for name in overrides:
        if name not in valid:
            raise ValueError(
                f"option {name!r} does not apply to method {options.method!r}; "
                f"its options: {', '.join(valid) or 'none'}"
            )
    options = replace(options, **overrides) if overrides else options
    if options.needs_bases and bases is None:
        raise ValueError(
            f"method {options.method!r} needs PCA bases (fit_unit_bases or UnitBases.load), got None"
        )
    return options.build(bases, head_maps)

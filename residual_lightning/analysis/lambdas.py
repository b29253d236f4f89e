"""How far a trained adapter's lambdas moved, per unit, from where they started.

ResiDual's default init is ``1 + N(0, 1)`` (seeded), so the distance to the identity (lambda = 1)
mostly reflects the random init. The initial lambdas are rebuilt from the checkpoint's adapter
options (method preset, init and seed) for the ``ones`` and ``normal`` inits; for the others the
distance to 1 is used and `lambda_movement` says so.

Letters: L layers, H heads per layer, k compact head coordinates, d learned head components,
D embedding size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from residual_lightning.contributions import head_name, mlp_name

__all__ = ["initial_unit_weights", "lambda_movement"]

_KIND = {"heads": "head", "mlps": "mlp", "emb": "emb", "output": "output"}


def initial_unit_weights(model: Any) -> dict[str, Tensor] | None:
    """The adapter's lambdas at initialisation, keyed like ``adapter.unit_weights()``.

    Rebuilt from the method preset and the checkpoint's adapter options, drawing exactly what the
    adapter drew: ``ones`` and ``normal`` inits of `ResidualAdapter` and `CoarseAdapter`.

    Args:
        model: a `ResidualModel`.

    Returns:
        The initial weights, or None when they cannot be rebuilt (``eigen``/``singular`` inits,
        which depend on the PCA spectra, and the other adapters).
    """
    from residual_lightning.adapters import PRESETS

    options = {**PRESETS.get(model.method, {}), **(model.adapter_options or {})}
    init, seed = options.get("init", "normal"), int(options.get("seed", 0))
    if init not in ("ones", "normal"):
        return None
    return _redrawn_initial_lambdas(model, init, seed)


def _redrawn_initial_lambdas(model: Any, init: str, seed: int) -> dict[str, Tensor] | None:
    """The adapter's initial lambdas, read from the buffers it records at construction.

    A checkpoint written before those buffers existed gets them drawn again when it loads (same
    options, same generator: `Adapter._load_from_state_dict`); `init` and `seed` are not needed.
    None for other adapters, or when the initial lambdas are not known where the adapter learns
    (an ``eigen`` or ``singular`` init restored from such an older checkpoint).
    """
    from residual_lightning.adapters import CoarseAdapter, ResidualAdapter

    adapter = getattr(model, "adapter", None)
    if not isinstance(adapter, (ResidualAdapter, CoarseAdapter)):  # the report's scope (see above)
        return None
    init_weights = adapter.initial_unit_weights()
    for kind, learned in adapter.unit_weights().items():
        start = init_weights.get(kind)
        if start is None or bool(torch.isnan(start[~torch.isnan(learned)]).any()):
            return None
    return {kind: w.float() for kind, w in init_weights.items()} or None


def _unit_slices(kind: str, values: Tensor) -> Iterator[tuple[str, Tensor, tuple]]:
    """(unit name, its entries, index) of one kind of ``unit_weights()``."""
    if kind == "heads":
        layers, heads = values.shape[:2]
        for layer in range(layers):
            for h in range(heads):
                yield head_name(layer, h), values[layer, h].reshape(-1), (layer, h)
    elif kind == "mlps":
        for layer in range(values.shape[0]):
            yield mlp_name(layer), values[layer].reshape(-1), (layer,)
    else:
        yield kind, values.reshape(-1), ()


def lambda_movement(model: Any) -> tuple[list[dict[str, Any]], bool]:
    """Per unit, how far its learned lambdas moved, sorted by decreasing movement.

    Args:
        model: a `ResidualModel`.

    Returns:
        ``(rows, from_init)``: one dict per unit with keys unit, kind, learned (number of learned
        lambdas), moved (sum over learned entries of ``|lambda - lambda_init|``, or of
        ``|lambda - 1|`` when the init cannot be rebuilt), from_identity (sum of ``|lambda - 1|``)
        and mean_from_identity; `from_init` tells which of the two `moved` is.
    """
    adapter = getattr(model, "adapter", None)
    weights = adapter.unit_weights() if adapter is not None else {}
    init = initial_unit_weights(model)
    from_init = init is not None and all(k in init for k in weights)
    rows = []
    for kind, values in weights.items():
        values = values.detach().double().cpu()
        start = init[kind].double() if from_init else None
        for name, v, index in _unit_slices(kind, values):
            learned = torch.isfinite(v)
            count = int(learned.sum())
            if not count:
                continue
            dist = float((v[learned] - 1.0).abs().sum())
            moved = float((v[learned] - start[index].reshape(-1)[learned]).abs().sum()) if from_init else dist
            rows.append(
                {
                    "unit": name,
                    "kind": _KIND.get(kind, kind),
                    "learned": count,
                    "moved": moved,
                    "from_identity": dist,
                    "mean_from_identity": dist / count,
                }
            )
    rows.sort(key=lambda r: -r["moved"])
    return rows, from_init

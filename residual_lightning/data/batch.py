"""Deprecated: the batch type now is `residual_lightning.contributions.Contributions`.

`CachedBatch` and `embedding` are kept for one release so that code written against 0.1 keeps
working, with a `DeprecationWarning`.
"""

from __future__ import annotations

import warnings

from torch import Tensor

from residual_lightning.contributions import Contributions


def CachedBatch(heads: Tensor, mlps: Tensor, emb: Tensor, label: Tensor) -> Contributions:  # noqa: N802
    """Deprecated: a `Contributions` with labels (this was its own class before 0.2)."""
    warnings.warn(
        "residual_lightning.data.batch.CachedBatch is deprecated and will be removed in the next release: "
        "use residual_lightning.contributions.Contributions",
        DeprecationWarning,
        stacklevel=2,
    )
    return Contributions(heads, mlps, emb, label=label)


def embedding(batch: Contributions, head_maps: Tensor) -> Tensor:
    """Deprecated: `Contributions.embedding`."""
    warnings.warn(
        "residual_lightning.data.batch.embedding is deprecated and will be removed in the next release: "
        "use Contributions.embedding(head_maps)",
        DeprecationWarning,
        stacklevel=2,
    )
    return batch.embedding(head_maps)

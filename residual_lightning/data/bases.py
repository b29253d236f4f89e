"""The PCA bases of the reference cache: loaded from one keyed file, or fitted across ranks and saved.

Rank 0 decides whether the file is there and whether it loaded, and broadcasts each decision, so
every rank takes the same branch (the fit ends in collective all-reduces). With several ranks each
fits its share of the batches and `fit_unit_bases` sums the moments across ranks, so the result
equals a single-process fit; rank 0 writes the file, holding its build lock throughout, so a
concurrent job waits and then loads it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from residual_lightning.data.cache import ActivationCache, CacheError
from residual_lightning.locks import BuildLock
from residual_lightning.spectral import UnitBases, fit_unit_bases


def rank0_says(flag: Any, world: int) -> Any:
    """Rank 0's value of `flag` (any picklable value), broadcast to every rank."""
    decision = [flag]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(decision, src=0)
    return decision[0]


def load_or_fit_bases(
    path: Path,
    key: dict[str, Any],
    reference_cache: Callable[[], ActivationCache],
    convention: str,
    reference: str,
    on_mismatch: str,
    rank: int,
    world: int,
) -> UnitBases | None:
    """The PCA bases of every unit: read from `path` when it holds them for `key`, else fitted.

    Args:
        path: the keyed bases file.
        key: the reference part's cache key (as a dict) the file must record.
        reference_cache: returns the cache to fit on (called only when fitting).
        convention: decomposition convention of the cache.
        reference: ``train`` or ``imagenet`` (recorded in the file's metadata).
        on_mismatch: a file failing its checks raises (``error``) or is refitted with a warning
            (``rebuild``).
        rank: this rank.
        world: number of ranks.

    Returns:
        The bases (None only on a rank whose own read failed while rank 0's succeeded).

    Raises:
        CacheError: the file fails its checks and `on_mismatch` is ``error``.
    """
    lock = BuildLock(path) if rank == 0 else None  # rank 0 holds it: another job waits, then loads
    if lock is not None:
        lock.acquire()
    try:
        return _load_or_fit(path, key, reference_cache, convention, reference, on_mismatch, rank, world)
    finally:
        if lock is not None:
            lock.release()


def _load_or_fit(path, key, reference_cache, convention, reference, on_mismatch, rank, world):
    bases: UnitBases | None = None
    loaded = False
    if rank0_says(path.exists(), world):  # every rank takes rank 0's branch (all_reduce below)
        try:
            bases = UnitBases.load(path, key=key)
            loaded = True
        except CacheError as err:
            if on_mismatch != "rebuild":
                raise CacheError(f"{err}; delete it or pass --data.on_mismatch rebuild") from err
            warnings.warn(f"{err}; refitting the PCA bases", stacklevel=3)
    if rank0_says(loaded, world):
        return bases
    ref = reference_cache()
    shard = (b for i, b in enumerate(ref.iter_batches(2048)) if i % world == rank)
    bases = fit_unit_bases(
        shard,
        ref.head_maps,
        convention=convention,
        metadata={"reference": reference, "dataset": key["dataset"], "samples": len(ref)},
        layout=ref.layout,
    )
    if rank == 0:
        bases.save(path, key=key)  # atomic, checksummed
    return bases

"""A split's activation cache held on the training device, and the batches drawn from it there.

`DeviceCache` copies a memory-mapped `ActivationCache` once, chunk by chunk, into tensors of the
cache's own storage dtype (float16 by default: the copy is exact) on one device. `DeviceBatches`
then yields `Contributions` by indexing those tensors with the batches of an `EpochBatchSampler`:
no DataLoader, no workers, no host-to-device copy of the data (only one small tensor of indices per
epoch). The batches are the loader's, value for value: the same sampler gives the same indices in
the same order (per rank under DDP, since the sampler shards by rank), and both paths widen the
stored values to float32.

`use_device_cache` decides between this and the memory-mapped loader (``data.cache_on_device``):
``auto`` loads a split when its bytes fit in ``data.device_cache_fraction`` of the device's free
memory (free CUDA memory, or the RAM available on a CPU), ``true`` always, ``false`` never.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from residual_lightning.contributions import Contributions
from residual_lightning.data.cache import ActivationCache
from residual_lightning.data.loaders import EpochBatchSampler, cache_sampler
from residual_lightning.data.writer import POOLER

log = logging.getLogger(__name__)

CacheOnDevice = Literal["auto"] | bool
COPY_CHUNK = 4096  # samples per host-to-device copy while loading (bounds the host buffer)


def cache_nbytes(cache: ActivationCache) -> int:
    """Bytes of a cache's arrays (what `DeviceCache` puts on the device)."""
    return int(sum(array.nbytes for array in cache.arrays.values()))


def free_bytes(device: torch.device) -> int:
    """Free memory of `device`: free CUDA memory, or the RAM available to new allocations on a CPU
    (``MemAvailable`` of /proc/meminfo, else the free physical pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        raise ValueError(f"data.cache_on_device: cannot measure the free memory of device {device}")
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def use_device_cache(
    mode: CacheOnDevice, cache: ActivationCache, device: torch.device, fraction: float, part: str
) -> bool:
    """Whether `part`'s cache goes onto `device` (``data.cache_on_device``), with a log line saying why.

    Args:
        mode: ``auto`` (when it fits in `fraction` of the free memory), True or False.
        cache: the part's cache.
        device: the training device.
        fraction: share of the device's free memory the cache may take under ``auto``.
        part: the part's name (for the log line).
    """
    if mode is False or mode == "false":
        return False
    need = cache_nbytes(cache)
    if mode is True or mode == "true":
        log.info("data.cache_on_device: %s cache (%.1f MB) loaded onto %s", part, need / 1e6, device)
        return True
    budget = int(free_bytes(device) * fraction)
    fits = need <= budget
    log.info(
        "data.cache_on_device auto: %s cache %.1f MB, %.0f%% of free %s memory is %.1f MB: %s",
        part,
        need / 1e6,
        100 * fraction,
        device,
        budget / 1e6,
        "loaded onto the device" if fits else "read from the memory-mapped cache",
    )
    return fits


class DeviceCache:
    """A cache's arrays as tensors on one device, in the cache's storage dtype.

    Args:
        cache: the memory-mapped cache to copy.
        device: where the tensors live.
    """

    def __init__(self, cache: ActivationCache, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.names, self.pooler_units = list(cache.names), list(cache.pooler_units)
        self.tensors: dict[str, Tensor] = {}
        n = len(cache)
        for name, array in cache.arrays.items():
            dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
            out = torch.empty(array.shape, dtype=dtype, device=self.device)
            for start in range(0, n, COPY_CHUNK):  # a bounded host buffer, not the whole array
                stop = min(start + COPY_CHUNK, n)
                out[start:stop].copy_(torch.from_numpy(np.array(array[start:stop])))
            self.tensors[name] = out

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def batch(self, indices: Tensor) -> Contributions:
        """The samples at `indices` (a long tensor on the device), widened to float32 like
        `ActivationCache.batch`, with labels (the head maps stay with the cache)."""
        t = self.tensors
        out = Contributions(
            heads=t["heads"][indices].float(),  # (N, L, H, k)
            mlps=t["mlps"][indices].float(),  # (N, L, D)
            emb=t["emb"][indices].float(),  # (N, D)
            label=t["labels"][indices],
        )
        if POOLER in t:
            pooled = t[POOLER][indices].float()  # (N, P, D)
            out.names = list(self.names)
            out.extra = {name: pooled[:, i] for i, name in enumerate(self.pooler_units)}
        return out


class DeviceBatches:
    """Batches of a `DeviceCache` in the order of an `EpochBatchSampler` (an iterable Lightning
    accepts as a dataloader; it calls ``sampler.set_epoch`` every epoch as for a DataLoader).

    Args:
        cache: the split on the device.
        sampler: the batch order (the memory-mapped loader's sampler, with the same arguments).
    """

    batch_sampler = None  # Lightning inspects a loader's ``sampler``/``batch_sampler`` as a DataLoader's

    def __init__(self, cache: DeviceCache, sampler: EpochBatchSampler) -> None:
        self.cache, self.sampler = cache, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Contributions]:
        batches = list(self.sampler)
        if not batches:
            return
        flat = torch.as_tensor(np.concatenate(batches), dtype=torch.long)
        flat = flat.to(self.cache.device, non_blocking=True)  # one copy of indices per epoch
        for chunk in torch.split(flat, [len(b) for b in batches]):
            yield self.cache.batch(chunk)


def device_loader(
    cache: DeviceCache,
    train: bool,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int,
    world: int,
) -> DeviceBatches:
    """`DeviceBatches` in `cache_loader`'s order (the same `cache_sampler`).

    Args:
        cache: the split on the device.
        train: training order (shuffled, `batch_size` split over the ranks) or evaluation order.
        batch_size: global training batch.
        eval_batch_size: per-rank evaluation batch.
        seed: seed of the training order.
        rank: this rank.
        world: number of ranks.
    """
    return DeviceBatches(
        cache, cache_sampler(len(cache), train, batch_size, eval_batch_size, seed, rank, world)
    )

"""Loaders of `ResidualDataModule`: a batch order that is a function of (seed, epoch), sharded by rank.

`EpochBatchSampler` draws the batches of indices; `CacheBatches` reads a whole batch of a
memory-mapped cache at once (sorted reads) as one `Contributions`. `cache_loader` and
`image_loader` build the DataLoaders of the two modes of the data module (cached contributions,
or preprocessed images for ``finetune``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from residual_lightning.data.cache import ActivationCache


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices: a permutation that depends only on (seed, epoch), sharded by rank.

    Training shards have equal sizes on every rank (the remainder is dropped, as DDP needs);
    evaluation shards (``shuffle=False, drop_last=False``) cover every sample exactly once.

    Args:
        n: number of samples.
        batch_size: per-rank batch size.
        shuffle: permute every epoch.
        seed: base seed of the permutation.
        rank: this rank.
        world: number of ranks.
        drop_last: drop the last incomplete batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        if self.shuffle and self.world > 1:
            per_rank = self.n // self.world
            return order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._indices()
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start : start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield np.sort(batch).tolist() if not self.shuffle else batch.tolist()

    def __len__(self) -> int:
        m = len(self._indices())
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)


class CacheBatches(Dataset):
    """Map-style dataset whose items are whole batches: ``dataset[list_of_indices] -> Contributions``."""

    def __init__(self, cache: ActivationCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, indices: list[int]):
        order = np.argsort(indices)
        batch = self.cache.batch(np.asarray(indices)[order])  # sorted reads are faster on a memmap
        inverse = torch.from_numpy(np.argsort(order))
        return batch[inverse]


def _identity(x):
    return x


def cache_sampler(
    n: int, train: bool, batch_size: int, eval_batch_size: int, seed: int, rank: int, world: int
) -> EpochBatchSampler:
    """The batch order of a cache of `n` samples (`cache_loader`'s, and the on-device batches').

    Training: shuffled by (seed, epoch), `batch_size` split over the ranks; evaluation: in order,
    `eval_batch_size` per rank.
    """
    if train:
        per_device = max(1, batch_size // world)
        return EpochBatchSampler(n, per_device, True, seed, rank, world, drop_last=False)
    return EpochBatchSampler(n, eval_batch_size, False, 0, rank, world)


def cache_loader(
    cache: ActivationCache,
    train: bool,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int,
    world: int,
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    """Batches of cached contributions: shuffled by (seed, epoch) for training, in order otherwise.

    Args:
        cache: the part's cache.
        train: training order (shuffled, `batch_size` split over the ranks) or evaluation order.
        batch_size: global training batch.
        eval_batch_size: per-rank evaluation batch.
        seed: seed of the training order.
        rank: this rank.
        world: number of ranks.
        num_workers: DataLoader workers.
        pin_memory: pin batches.
    """
    sampler = cache_sampler(len(cache), train, batch_size, eval_batch_size, seed, rank, world)
    return DataLoader(
        CacheBatches(cache),
        sampler=sampler,
        batch_size=None,  # every item already is a batch
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def image_loader(
    data: Dataset,
    train: bool,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int,
    world: int,
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    """Batches of preprocessed images (``finetune``), in the same order as `cache_loader`'s.

    Args:
        data: the part's image dataset.
        train: training order (shuffled, `batch_size` split over the ranks) or evaluation order.
        batch_size: global training batch.
        eval_batch_size: per-rank evaluation batch (the data module's extraction batch size).
        seed: seed of the training order.
        rank: this rank.
        world: number of ranks.
        num_workers: DataLoader workers.
        pin_memory: pin batches.
    """
    size = max(1, batch_size // world) if train else eval_batch_size
    sampler = EpochBatchSampler(len(data), size, train, seed, rank, world)
    return DataLoader(data, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)

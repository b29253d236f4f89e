"""Extraction: run the frozen backbone once over a dataset part and write its activation cache.

`build_cache` does it in one process (resumable, locked, with a progress bar). `Extractor` is a
LightningModule whose `predict` pass builds several caches at once, sharded across the ranks of any
Lightning strategy (DDP): each rank writes its own chunks, rank 0 marks the caches complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from residual_lightning.data.cache import ActivationCache, CacheKey, CacheWriter, cache_lock, open_or_none
from residual_lightning.units import decompose_compact, unit_layout

log = logging.getLogger(__name__)


@dataclass
class ExtractionJob:
    """One cache to build: a dataset part and its key.

    Attributes:
        dataset: yields ``(image tensor, label)`` already preprocessed.
        key: the cache key.
        path: the cache folder.
    """

    dataset: Dataset
    key: CacheKey
    path: Path


def _chunk_batches(writer: CacheWriter, chunks: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of sample indices that never straddle a chunk boundary."""
    batches = []
    for chunk in chunks:
        start, stop = writer.chunk_range(chunk)
        batches += [list(range(s, min(s + batch_size, stop))) for s in range(start, stop, batch_size)]
    return batches


def open_writer(job: ExtractionJob, model: torch.nn.Module, chunk_size: int, rank: int = 0) -> CacheWriter:
    """Create (or reopen, to resume) the writer of a job; the head maps come from one image."""
    layout = unit_layout(model)
    image = job.dataset[0][0][None]
    param = next(model.parameters())
    with torch.inference_mode():
        probe = decompose_compact(model, image.to(param.device), job.key.convention)
    k = probe.heads.shape[-1]
    meta = {"class_names": list(getattr(job.dataset, "class_names", []) or [])}
    return CacheWriter(
        job.path,
        job.key,
        num_samples=len(job.dataset),
        shape=(layout.layers, layout.heads, k, layout.output_dim),
        names=layout.names,
        head_maps=probe.head_maps,
        chunk_size=chunk_size,
        extra_meta=meta,
        rank=rank,
    )


class _WriteStep:
    """Decompose one batch and write it; commit its chunk when the chunk is full."""

    def __init__(self, model, writer: CacheWriter, convention: str, autocast_dtype: torch.dtype | None):
        self.model, self.writer, self.convention, self.dtype = model, writer, convention, autocast_dtype

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, first_index: int) -> None:
        device = next(self.model.parameters()).device
        # No dtype: leave any surrounding autocast (Lightning's precision plugin) in force.
        amp = torch.autocast(device.type, self.dtype) if self.dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            compact = decompose_compact(self.model, images.to(device), self.convention)
        self.writer.write(first_index, compact, labels)
        chunk = first_index // self.writer.chunk_size
        _, stop = self.writer.chunk_range(chunk)
        if first_index + labels.shape[0] == stop:
            self.writer.commit_chunk(chunk)


def build_cache(
    model: torch.nn.Module,
    job: ExtractionJob,
    batch_size: int = 64,
    chunk_size: int = 1024,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    on_mismatch: str = "error",
    progress: bool = True,
) -> ActivationCache:
    """Build (or resume, or just open) the cache of one dataset part in this process.

    Args:
        model: the frozen open_clip model (or its `.visual`), in eval mode, on its device.
        job: dataset, key and folder.
        batch_size: images per forward pass.
        chunk_size: samples per resumable chunk.
        num_workers: DataLoader workers decoding images.
        autocast_dtype: e.g. ``torch.bfloat16`` to extract under autocast.
        on_mismatch: ``"error"`` or ``"rebuild"`` for a complete cache that fails its checks.
        progress: show a progress bar (images/s and ETA).
    """
    job.path.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(job.path):
        cache = open_or_none(job.path, job.key, on_mismatch)  # type: ignore[arg-type]
        if cache is not None:
            return cache
        writer = open_writer(job, model, chunk_size)
        pending = writer.pending_chunks()
        if pending and len(pending) < writer.num_chunks:
            log.info("resuming %s: %d of %d chunks left", job.path, len(pending), writer.num_chunks)
        batches = _chunk_batches(writer, pending, batch_size)
        loader = DataLoader(job.dataset, batch_sampler=batches, num_workers=num_workers)
        step = _WriteStep(model, writer, job.key.convention, autocast_dtype)
        total = sum(len(b) for b in batches)
        with tqdm(
            total=total, unit="img", desc=f"extract {job.key.dataset}/{job.key.part}", disable=not progress
        ) as bar:
            for batch_indices, (images, labels) in zip(batches, loader):
                step(images, labels, batch_indices[0])
                bar.update(len(batch_indices))
        writer.finalize()
    return ActivationCache.open(job.path, job.key, verify=False)


class Extractor(L.LightningModule):
    """Builds several caches in one `Trainer.predict` pass, sharded across ranks.

    Chunks are dealt round-robin to the ranks (no padding, no repeats); every rank writes into the
    same preallocated files; after a barrier rank 0 verifies that every chunk was written and marks
    each cache complete.

    Args:
        model: the frozen open_clip model.
        jobs: the caches to build.
        batch_size: images per forward pass.
        chunk_size: samples per chunk.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        jobs: list[ExtractionJob],
        batch_size: int = 64,
        chunk_size: int = 1024,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = model
        self.jobs = jobs
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.num_workers = num_workers
        self.writers: list[CacheWriter] = []
        self.todo: list[int] = []

    def setup(self, stage: str) -> None:
        """Rank 0 creates the files, then every rank opens them."""
        self.backbone.eval().requires_grad_(False)
        for job in self.jobs:
            job.path.parent.mkdir(parents=True, exist_ok=True)
        self.todo = [i for i, job in enumerate(self.jobs) if open_or_none(job.path, job.key) is None]
        if self.global_rank == 0:
            for i in self.todo:
                open_writer(self.jobs[i], self.backbone, self.chunk_size, rank=0)
        self.trainer.strategy.barrier("extract-setup")
        self.writers = [
            open_writer(self.jobs[i], self.backbone, self.chunk_size, rank=self.global_rank)
            for i in self.todo
        ]

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per cache left to build, over this rank's share of its pending chunks."""
        loaders = []
        world, rank = self.trainer.world_size, self.global_rank
        for writer, i in zip(self.writers, self.todo):
            pending = writer.pending_chunks()[rank::world]
            batches = _chunk_batches(writer, pending, self.batch_size)
            loaders.append(
                DataLoader(
                    _Indexed(self.jobs[i].dataset), batch_sampler=batches, num_workers=self.num_workers
                )
            )
        return loaders

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Decompose a batch and write it to its cache."""
        images, labels, index = batch
        writer = self.writers[dataloader_idx]
        _WriteStep(self.backbone, writer, writer.key.convention, None)(images, labels, int(index[0]))

    def on_predict_end(self) -> None:
        """Barrier, then rank 0 marks every cache complete."""
        self.trainer.strategy.barrier("extract-end")
        if self.global_rank == 0:
            for writer in self.writers:
                writer.finalize()
        self.trainer.strategy.barrier("extract-final")


class _Indexed(Dataset):
    """Wraps a dataset so that each item also carries its index (to place it in the cache)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, label, i

"""Extraction: run the frozen backbone once over a dataset part and write its activation cache.

`build_cache` does it in one process (resumable, locked, with a progress bar); `build_caches` does
it for every part of a data module (what its `prepare_data` does). `Extractor` is a
LightningModule whose `predict` pass builds several caches at once, sharded across the ranks of any
Lightning strategy (DDP): each rank writes its own chunks, rank 0 marks the caches complete.
`ShardedBuild` is that sharded build without Lightning's predict loop (a multi-device `fit` that
finds caches missing runs it in `setup`). Every path that writes a cache holds its build lock.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from residual_lightning.data.cache import (
    ActivationCache,
    CacheKey,
    CacheWriter,
    OnMismatch,
    cache_lock,
    open_or_none,
)
from residual_lightning.data.writer import page_groups
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


def _chunk_indices(writer: CacheWriter, chunks: Sequence[int]) -> list[int]:
    """Sample indices of the given chunks, in order."""
    return [i for chunk in chunks for i in range(*writer.chunk_range(chunk))]


def open_writer(job: ExtractionJob, model: torch.nn.Module, chunk_size: int, rank: int = 0) -> CacheWriter:
    """Create (or reopen, to resume) the writer of a job; the head maps come from one image."""
    layout = unit_layout(model)
    image = job.dataset[0][0][None]
    param = next(model.parameters())
    with torch.inference_mode():
        probe = decompose_compact(model, image.to(param.device), job.key.convention)
    k = probe.heads.shape[-1]
    meta = {"class_names": list(getattr(job.dataset, "class_names", []) or [])}
    layout = replace(layout, convention=job.key.convention)
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
        form=layout.form,  # pooler units and full-form heads (None: compact, as always)
    )


class _WriteStep:
    """Decompose one batch, write each sample at its index, commit chunks once complete."""

    def __init__(self, model, writer: CacheWriter, convention: str, autocast_dtype: torch.dtype | None):
        self.model, self.writer, self.convention, self.dtype = model, writer, convention, autocast_dtype
        self.written: dict[int, int] = {}  # samples written per pending chunk

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        device = next(self.model.parameters()).device
        # No dtype: leave any surrounding autocast (Lightning's precision plugin) in force.
        amp = torch.autocast(device.type, self.dtype) if self.dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            compact = decompose_compact(self.model, images.to(device), self.convention)
        idx = indices.cpu().numpy()
        self.writer.write(idx, compact, labels)
        for chunk in np.unique(idx // self.writer.chunk_size).tolist():
            n = int((idx // self.writer.chunk_size == chunk).sum())
            self.written[chunk] = self.written.get(chunk, 0) + n
            start, stop = self.writer.chunk_range(chunk)
            if self.written[chunk] == stop - start:
                self.writer.commit_chunk(chunk)


def build_cache(
    model: torch.nn.Module,
    job: ExtractionJob,
    batch_size: int = 64,
    chunk_size: int = 1024,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    on_mismatch: OnMismatch = "error",
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
        cache = open_or_none(job.path, job.key, on_mismatch)
        if cache is not None:
            return cache
        writer = open_writer(job, model, chunk_size)
        pending = writer.pending_chunks()
        if pending and len(pending) < writer.num_chunks:
            log.info("resuming %s: %d of %d chunks left", job.path, len(pending), writer.num_chunks)
        todo = _chunk_indices(writer, pending)
        loader = DataLoader(
            IndexedDataset(job.dataset), batch_size=batch_size, sampler=todo, num_workers=num_workers
        )
        step = _WriteStep(model, writer, job.key.convention, autocast_dtype)
        desc = f"extract {job.key.dataset}/{job.key.part}"
        with tqdm(total=len(todo), unit="img", desc=desc, disable=not progress) as bar:
            for images, labels, indices in loader:
                step(images, labels, indices)
                bar.update(len(indices))
        writer.finalize()
    return ActivationCache.open(job.path, job.key, verify=False)


def build_caches(datamodule: L.LightningDataModule) -> dict[str, ActivationCache]:
    """Build (or resume, or just verify) every cache of a data module in this process, and open them.

    The programmatic twin of ``residual-lightning extract`` (which also shards across devices).

    Args:
        datamodule: the `ResidualDataModule` whose caches to build.

    Returns:
        The opened caches by part (``train``, ``val``, ``test``, and ``reference`` if any).
    """
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.caches


class ShardedBuild:
    """Builds several caches across the ranks of one job; the core of `Extractor` and of a
    multi-device `fit` that finds caches missing.

    `start`: rank 0 takes each cache's build lock (`residual_lightning.locks`; held until
    `finish`, so another job waits for this one and then finds the caches complete), opens or
    restarts the partial caches and creates the files of missing ones; after a barrier every rank
    opens the writers. `items` deals the pending chunks to the ranks in `page_groups` (no two ranks
    write one page of a file), round-robin. `finish`: a barrier, then rank 0 marks every cache
    complete and releases the locks.

    Args:
        model: the frozen backbone, on this rank's device.
        jobs: the caches to build.
        chunk_size: samples per chunk.
        on_mismatch: a cache failing its checks raises (``error``) or is rebuilt (``rebuild``).
        rank: this process's global rank.
        world: the number of ranks.
        barrier: a collective barrier taking a name (e.g. ``trainer.strategy.barrier``).
        autocast_dtype: autocast dtype of the forward passes (None: leave the caller's in force).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        jobs: list[ExtractionJob],
        chunk_size: int,
        on_mismatch: OnMismatch,
        rank: int,
        world: int,
        barrier: Callable[[str], None],
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.jobs, self.chunk_size, self.on_mismatch = model, jobs, chunk_size, on_mismatch
        self.rank, self.world, self.barrier, self.autocast_dtype = rank, world, barrier, autocast_dtype
        self.steps: dict[int, _WriteStep] = {}
        self.locks: list = []

    def start(self) -> None:
        """Lock and prepare the caches (rank 0), then open this rank's writers."""
        if self.rank == 0:
            try:
                for job in sorted(self.jobs, key=lambda j: str(j.path)):  # one order: no deadlock
                    job.path.parent.mkdir(parents=True, exist_ok=True)
                    self.locks.append(cache_lock(job.path).acquire())
                    verify = self.on_mismatch == "rebuild"
                    if open_or_none(job.path, job.key, self.on_mismatch, verify=verify) is None:
                        open_writer(job, self.model, self.chunk_size, rank=0)
            except BaseException:
                self.release()
                raise
        self.barrier("extract-setup")
        for i, job in enumerate(self.jobs):
            if open_or_none(job.path, job.key, verify=False) is None:
                writer = open_writer(job, self.model, self.chunk_size, rank=self.rank)
                self.steps[i] = _WriteStep(self.model, writer, job.key.convention, self.autocast_dtype)

    def items(self) -> list[tuple[int, int]]:
        """This rank's ``(job, sample index)`` items: whole page groups of pending chunks, dealt round-robin."""
        groups = [
            (i, group)
            for i, step in self.steps.items()
            for group in page_groups(step.writer.arrays, step.writer.chunk_size, step.writer.pending_chunks())
        ]
        return [
            (i, s)
            for i, group in groups[self.rank :: self.world]
            for c in group
            for s in range(*self.steps[i].writer.chunk_range(c))
        ]

    def write(
        self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, job: torch.Tensor
    ) -> None:
        """Decompose a batch of items and write each sample to its cache (job -1: a placeholder)."""
        for j in job.unique().tolist():
            if j >= 0:
                sel = job == j
                self.steps[j](images[sel], labels[sel], index[sel])

    def finish(self) -> None:
        """Barrier; rank 0 marks every cache complete and releases the locks; barrier."""
        self.barrier("extract-end")
        if self.rank == 0:
            try:
                for step in self.steps.values():
                    step.writer.finalize()
            finally:
                self.release()
        self.barrier("extract-final")

    def release(self) -> None:
        """Release the build locks this rank holds (rank 0; also after a failure)."""
        while self.locks:
            self.locks.pop().release()

    def run(self, batch_size: int, num_workers: int = 0) -> None:
        """The whole build in this process's loop (a multi-device `fit`; `Extractor` uses `predict`)."""
        self.start()
        try:
            loader = DataLoader(
                _JobItems(self.jobs), batch_size=batch_size, sampler=self.items(), num_workers=num_workers
            )
            for images, labels, index, job in loader:
                self.write(images, labels, index, job)
        except BaseException:
            self.release()
            raise
        self.finish()


class Extractor(L.LightningModule):
    """Builds several caches in one `Trainer.predict` pass, sharded across ranks (`ShardedBuild`).

    The pending chunks of every cache are dealt to the ranks in page groups (no padding, no
    repeats) and read through one loader; every rank writes into the same preallocated files; after
    a barrier rank 0 checks that every chunk was written and marks each cache complete. Rank 0
    holds each cache's build lock from `setup` to the end, so a concurrent job waits, then finds the
    caches complete. A rank left without chunks (more ranks than chunks) processes one placeholder
    sample that it does not write, because Lightning refuses empty loaders.

    Args:
        model: the frozen open_clip model.
        jobs: the caches to build, or a function of the trainer returning them (called in `setup`,
            once the processes exist: `ResidualTrainer.extract` prepares the data there on one
            process, then lists the jobs on every rank).
        batch_size: images per forward pass.
        chunk_size: samples per chunk.
        num_workers: DataLoader workers.
        on_mismatch: a cache that fails its checks raises (``error``) or is rebuilt (``rebuild``;
            checksums are then verified first).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        jobs: list[ExtractionJob] | Callable[[L.Trainer], list[ExtractionJob]],
        batch_size: int = 64,
        chunk_size: int = 1024,
        num_workers: int = 0,
        on_mismatch: OnMismatch = "error",
    ) -> None:
        super().__init__()
        self.backbone = model
        self.jobs = jobs
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.num_workers = num_workers
        self.on_mismatch = on_mismatch
        self.build: ShardedBuild | None = None

    @property
    def steps(self) -> dict[int, _WriteStep]:
        """The writers of this rank, by job."""
        return self.build.steps if self.build is not None else {}

    def setup(self, stage: str) -> None:
        """Lock and prepare the caches on rank 0, then open them on every rank (`ShardedBuild.start`)."""
        self.backbone.eval().requires_grad_(False)
        if callable(self.jobs):
            self.jobs = self.jobs(self.trainer)
        self.build = ShardedBuild(
            self.backbone,
            self.jobs,
            self.chunk_size,
            self.on_mismatch,
            self.global_rank,
            self.trainer.world_size,
            self.trainer.strategy.barrier,
        )
        self.build.start()

    def predict_dataloader(self) -> DataLoader:
        """One loader over this rank's share of every cache's pending chunks: items (job, index)."""
        mine = self.build.items() or [(-1, -1)]
        return DataLoader(
            _JobItems(self.jobs), batch_size=self.batch_size, sampler=mine, num_workers=self.num_workers
        )

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Decompose a batch and write each sample to its cache."""
        self.build.write(*batch)

    def on_predict_end(self) -> None:
        """Barrier, then rank 0 marks every cache complete and releases the locks."""
        self.build.finish()

    def teardown(self, stage: str) -> None:
        """Release the locks left held by a failed run."""
        if self.build is not None:
            self.build.release()


class IndexedDataset(Dataset):
    """Items ``(image, label, index)``: the index places a sample in a cache or names its file."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, label, i


class _JobItems(Dataset):
    """``dataset[(job, index)] -> (image, label, index, job)`` over several jobs' datasets."""

    def __init__(self, jobs: list[ExtractionJob]) -> None:
        self.jobs = jobs

    def __len__(self) -> int:
        return sum(len(j.dataset) for j in self.jobs)

    def __getitem__(self, item: tuple[int, int]):
        job, i = item
        if job < 0:  # placeholder: a real image (for its shape), never written
            image, label = self.jobs[0].dataset[0]
            return image, label, -1, -1
        image, label = self.jobs[job].dataset[i]
        return image, label, i, job

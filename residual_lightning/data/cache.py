"""Activation cache: the compact unit contributions of a dataset split, extracted once.

Layout of one cache (a folder named by the digest of its `CacheKey`)::

    meta.json          key, shapes, unit names, class names, chunk checksums, "complete": true
    heads.npy          (N, L, H, k)  head coordinates y            (float16 by default)
    mlps.npy           (N, L, D)     MLP contributions
    emb.npy            (N, D)        emb contribution
    labels.npy         (N,)          int64
    head_maps.safetensors            (L, H, D, k) float32 fixed maps
    progress/rank*.json              chunks written so far (while incomplete)

Arrays are `.npy` files preallocated at full size and written chunk by chunk through memory maps;
a chunk is recorded (with the sha256 of its bytes) only after it is flushed, so a run killed at any
point, even with SIGKILL, resumes from the last recorded chunk. The same images through the same
model give the same bytes, so a resumed cache is bit-identical to an uninterrupted one. The
``complete`` flag is written last, atomically (write to a temporary file, then `os.replace`). A
cache whose key or checksums do not match is never used silently. A file lock serialises two
processes building the same cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch import Tensor

from residual_lightning.data.batch import CachedBatch
from residual_lightning.units import CompactContributions

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAYS = ("heads", "mlps", "emb", "labels")
CacheDtype = Literal["float16", "float32"]
OnMismatch = Literal["error", "rebuild"]


class CacheError(RuntimeError):
    """A cache that is incomplete, corrupt, or built for something else."""


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a cache's contents.

    Attributes:
        model_name: open_clip architecture.
        weights_id: pretrained tag, ``file-<sha256>`` of a local checkpoint, or ``random``.
        dataset: registry name.
        part: ``train``, ``val``, ``test`` or ``reference``.
        selection: how the samples were chosen (split seed, fractions, shots, subset size).
        preprocessing: description of the image transform.
        convention: decomposition convention.
        dtype: storage dtype.
        format_version: cache format version.
    """

    model_name: str
    weights_id: str
    dataset: str
    part: str
    selection: str
    preprocessing: str
    convention: str
    dtype: str = "float16"
    format_version: int = FORMAT_VERSION

    def digest(self) -> str:
        """A stable 16-hex-digit identifier of this key."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def folder_name(self) -> str:
        """Human-readable folder name: ``<dataset>-<part>-<model>-<digest>``."""
        model = self.model_name.replace("/", "_").replace(":", "_")
        return f"{self.dataset}-{self.part}-{model}-{self.digest()}"


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _chunk_digest(arrays: dict[str, np.ndarray], start: int, stop: int) -> str:
    h = hashlib.sha256()
    for name in ARRAYS:
        h.update(np.ascontiguousarray(arrays[name][start:stop]).tobytes())
    return h.hexdigest()


class CacheWriter:
    """Writes one cache chunk by chunk; resumable; marks completion atomically.

    Args:
        path: the cache folder.
        key: what the cache holds.
        num_samples: N.
        shape: (L, H, k, D).
        names: unit names.
        head_maps: (L, H, D, k) fixed maps.
        chunk_size: samples per chunk (the unit of resumption).
        extra_meta: stored in meta.json (class names, templates, ...).
        rank: this process's rank (progress files are per rank, merged at `finalize`).
    """

    def __init__(
        self,
        path: str | Path,
        key: CacheKey,
        num_samples: int,
        shape: tuple[int, int, int, int],
        names: list[str],
        head_maps: Tensor,
        chunk_size: int = 1024,
        extra_meta: dict | None = None,
        rank: int = 0,
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.n = num_samples
        self.chunk_size = chunk_size
        self.rank = rank
        layers, heads, k, d = shape
        dtype = np.dtype(key.dtype)
        self.shapes = {
            "heads": ((num_samples, layers, heads, k), dtype),
            "mlps": ((num_samples, layers, d), dtype),
            "emb": ((num_samples, d), dtype),
            "labels": ((num_samples,), np.dtype("int64")),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "progress").mkdir(exist_ok=True)
        meta_path = self.path / "meta.json"
        meta = {
            "key": asdict(key),
            "num_samples": num_samples,
            "shape": {"layers": layers, "heads": heads, "k": k, "output_dim": d},
            "chunk_size": chunk_size,
            "names": names,
            "complete": False,
            **(extra_meta or {}),
        }
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if (
                old.get("key") != meta["key"]
                or old.get("num_samples") != num_samples
                or old.get("chunk_size") != chunk_size
            ):
                raise CacheError(f"{self.path} holds a different partial cache; delete it to rebuild")
        elif rank == 0:
            _atomic_write_json(meta_path, meta)
        self.meta = meta
        self.arrays = {}
        for name, (shp, dt) in self.shapes.items():
            file = self.path / f"{name}.npy"
            if file.exists():
                arr = np.load(file, mmap_mode="r+")
                if arr.shape != shp or arr.dtype != dt:
                    raise CacheError(f"{file} has shape {arr.shape} {arr.dtype}, expected {shp} {dt}")
            else:
                arr = np.lib.format.open_memmap(file, mode="w+", dtype=dt, shape=shp)
            self.arrays[name] = arr
        maps_file = self.path / "head_maps.safetensors"
        if not maps_file.exists():
            save_file({"head_maps": head_maps.detach().float().cpu().contiguous()}, str(maps_file))
        self.done: dict[int, str] = self._read_progress()
        self._progress_file = self.path / "progress" / f"rank{rank}.json"
        self.mine: dict[str, str] = (
            json.loads(self._progress_file.read_text()) if self._progress_file.exists() else {}
        )

    @property
    def num_chunks(self) -> int:
        """Number of chunks."""
        return (self.n + self.chunk_size - 1) // self.chunk_size

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """[start, stop) sample indices of a chunk."""
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.n)

    def _read_progress(self) -> dict[int, str]:
        done: dict[int, str] = {}
        for file in sorted((self.path / "progress").glob("rank*.json")):
            with contextlib.suppress(json.JSONDecodeError):  # a torn file is just ignored
                done.update({int(k): v for k, v in json.loads(file.read_text()).items()})
        return done

    def pending_chunks(self) -> list[int]:
        """Chunks not recorded as written."""
        return [c for c in range(self.num_chunks) if c not in self.done]

    def write(self, indices: np.ndarray, compact: CompactContributions, labels: Tensor) -> None:
        """Write a batch of contributions at the given sample indices (sorted or not)."""
        dt = self.shapes["heads"][1]
        self.arrays["heads"][indices] = compact.heads.detach().cpu().numpy().astype(dt)
        self.arrays["mlps"][indices] = compact.mlps.detach().cpu().numpy().astype(dt)
        self.arrays["emb"][indices] = compact.emb.detach().cpu().numpy().astype(dt)
        self.arrays["labels"][indices] = labels.cpu().numpy()

    def commit_chunk(self, chunk: int) -> None:
        """Flush a fully written chunk and record it with its checksum."""
        for arr in self.arrays.values():
            arr.flush()
        start, stop = self.chunk_range(chunk)
        if not all(np.isfinite(self.arrays[a][start:stop]).all() for a in ("heads", "mlps", "emb")):
            raise CacheError(
                f"non-finite contributions (NaN/Inf) in samples {start}-{stop} of {self.path}; "
                "check the model's precision and the input images"
            )
        self.done[chunk] = _chunk_digest(self.arrays, start, stop)
        self.mine[str(chunk)] = self.done[chunk]
        _atomic_write_json(self._progress_file, self.mine)

    def finalize(self) -> Path:
        """Mark the cache complete once every chunk is recorded (rank 0 only)."""
        self.done = self._read_progress()
        missing = self.pending_chunks()
        if missing:
            raise CacheError(f"cannot finalise {self.path}: chunks {missing[:10]} were never written")
        meta = dict(self.meta, complete=True, checksums=[self.done[c] for c in range(self.num_chunks)])
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _atomic_write_json(self.path / "meta.json", meta)
        shutil.rmtree(self.path / "progress", ignore_errors=True)
        return self.path


class ActivationCache:
    """A complete, verified cache, read through memory maps (nothing is loaded eagerly).

    Use `ActivationCache.open`; index with `batch(indices)`.
    """

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.meta = meta
        self.arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        self.head_maps: Tensor = load_file(str(path / "head_maps.safetensors"))["head_maps"]

    @classmethod
    def open(cls, path: str | Path, key: CacheKey | None = None, verify: bool = True) -> ActivationCache:
        """Open a complete cache, checking its key and (with `verify`) every chunk's checksum.

        Args:
            path: the cache folder.
            key: the expected key; a cache built for anything else is refused.
            verify: re-hash the arrays and compare with the recorded checksums.

        Raises:
            CacheError: missing, incomplete, built for another key, or corrupt.
        """
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise CacheError(f"no cache at {path} (meta.json missing)")
        meta = json.loads(meta_file.read_text())
        if not meta.get("complete"):
            raise CacheError(
                f"cache at {path} is incomplete (an extraction was interrupted); build it to resume"
            )
        if key is not None and meta["key"] != asdict(key):
            diff = {k: (meta["key"].get(k), v) for k, v in asdict(key).items() if meta["key"].get(k) != v}
            raise CacheError(
                f"cache at {path} was built for something else; differing fields (cached, wanted): {diff}"
            )
        cache = cls(path, meta)
        n = meta["num_samples"]
        for name, arr in cache.arrays.items():
            if arr.shape[0] != n:
                raise CacheError(f"{path / (name + '.npy')} has {arr.shape[0]} rows, meta.json says {n}")
        if verify:
            cache.verify()
        return cache

    def verify(self) -> None:
        """Re-hash every chunk and compare with meta.json; raise `CacheError` naming the first bad one."""
        size = self.meta["chunk_size"]
        for chunk, expected in enumerate(self.meta["checksums"]):
            start = chunk * size
            stop = min(start + size, len(self))
            if _chunk_digest(self.arrays, start, stop) != expected:
                raise CacheError(
                    f"cache at {self.path} is corrupt: checksum mismatch in chunk {chunk} "
                    f"(samples {start}-{stop}); delete it or rebuild with on_mismatch='rebuild'"
                )

    def __len__(self) -> int:
        return self.meta["num_samples"]

    @property
    def names(self) -> list[str]:
        """Unit names."""
        return self.meta["names"]

    @property
    def labels(self) -> np.ndarray:
        """(N,) labels (memory-mapped)."""
        return self.arrays["labels"]

    def batch(self, indices: np.ndarray | list[int] | slice) -> CachedBatch:
        """Read a batch (float32 tensors). Sorted indices read fastest."""
        if not isinstance(indices, slice):
            indices = np.asarray(indices)
        parts = {name: torch.from_numpy(np.array(self.arrays[name][indices])) for name in ARRAYS}
        return CachedBatch(
            heads=parts["heads"].float(),
            mlps=parts["mlps"].float(),
            emb=parts["emb"].float(),
            label=parts["labels"],
        )

    def iter_batches(self, batch_size: int = 4096) -> Iterable[CachedBatch]:
        """Sequential batches over the whole cache (for PCA and analyses)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, min(start + batch_size, len(self))))


def write_cache(
    path: str | Path, key: CacheKey, compact: CompactContributions, labels: Tensor, chunk_size: int = 4096
) -> ActivationCache:
    """Write in-memory contributions as a complete, checksummed cache (synthetic data, tests, imports).

    Args:
        path: the cache folder.
        key: its key (``key.dtype`` is the storage dtype).
        compact: contributions of all N samples.
        labels: (N,) labels.
        chunk_size: samples per chunk.
    """
    n, layers, heads, k = compact.heads.shape
    shape = (layers, heads, k, compact.mlps.shape[-1])
    writer = CacheWriter(path, key, n, shape, compact.names, compact.head_maps, chunk_size=chunk_size)
    for chunk in writer.pending_chunks():
        start, stop = writer.chunk_range(chunk)
        part = CompactContributions(
            compact.heads[start:stop],
            compact.mlps[start:stop],
            compact.emb[start:stop],
            compact.head_maps,
            compact.names,
        )
        writer.write(np.arange(start, stop), part, labels[start:stop])
        writer.commit_chunk(chunk)
    writer.finalize()
    return ActivationCache.open(path, key, verify=False)


def cache_lock(path: Path) -> FileLock:
    """The lock that serialises builders of the cache at `path`."""
    return FileLock(str(path) + ".lock")


def open_or_none(
    path: Path, key: CacheKey, on_mismatch: OnMismatch = "error", verify: bool = True
) -> ActivationCache | None:
    """Open the cache at `path` if it is complete and valid.

    Returns None when it is absent or incomplete (to be built or resumed). A complete cache that
    fails its checks raises `CacheError`, or with ``on_mismatch="rebuild"`` is deleted with a
    warning and None is returned.
    """
    if not (path / "meta.json").exists():
        return None
    meta = json.loads((path / "meta.json").read_text())
    if not meta.get("complete"):
        if meta.get("key") != asdict(key):
            _handle_mismatch(
                path, CacheError(f"partial cache at {path} was started for another key"), on_mismatch
            )
        return None
    try:
        return ActivationCache.open(path, key, verify=verify)
    except CacheError as err:
        _handle_mismatch(path, err, on_mismatch)
        return None


def _handle_mismatch(path: Path, err: CacheError, on_mismatch: OnMismatch) -> None:
    if on_mismatch != "rebuild":
        raise err
    warnings.warn(f"{err}; rebuilding it", stacklevel=3)
    remove_cache(path)


def remove_cache(path: Path, root: Path | None = None) -> None:
    """Delete one cache folder, refusing anything that is not a cache folder inside `root`.

    Args:
        path: the cache folder.
        root: the cache root it must lie in (default: its parent); symbolic links are refused.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if (
        path.is_symlink()
        or not path.resolve().is_relative_to(root.resolve())
        or path.resolve() == root.resolve()
    ):
        raise CacheError(f"refusing to delete {path}: not a folder inside the cache root {root}")
    if not (path / "meta.json").exists() and not (path / "heads.npy").exists():
        raise CacheError(f"refusing to delete {path}: it is not a cache folder")
    shutil.rmtree(path)

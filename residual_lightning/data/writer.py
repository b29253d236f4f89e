"""Writing an activation cache (layout in `residual_lightning.data.cache`), and reading its files.

`CacheWriter` creates the files at full size with their disk blocks reserved, so that writing them
through memory maps never meets a full disk; records chunks as they are flushed; restarts a
partial cache that cannot be resumed; and marks the cache complete atomically. The helpers open
and check each file, turning a short, torn or unreadable one into a `CacheError` naming it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from residual_lightning.contributions import Contributions, shared_maps
from residual_lightning.data.keys import CacheKey
from residual_lightning.files import (
    CacheError,
    atomic_write_bytes,
    atomic_write_json,
    create_files,
    file_sha256,
    read_json,
    reserve,
)
from residual_lightning.locks import pause_point

log = logging.getLogger(__name__)

ARRAYS = ("heads", "mlps", "emb", "labels")
POOLER = "pooler"  # (N, P, D) pooler units' contributions: only in caches of layouts with some
IDENTITY_MAPS = "identity"  # meta["head_maps"] of full-form caches: no head_maps file
# The `.npy` header is padded to one page, so that a chunk whose first sample starts on a page
# boundary of the data starts on a page boundary of the file (see `page_groups`).
PAGE = 4096


def chunk_digest(arrays: dict[str, np.ndarray], start: int, stop: int) -> str:
    """sha256 of samples [start, stop) of every array (the pooler's last, where there is one)."""
    h = hashlib.sha256()
    for name in (*ARRAYS, POOLER):
        if name in arrays:
            h.update(np.ascontiguousarray(arrays[name][start:stop]).tobytes())
    return h.hexdigest()


def array_specs(
    n: int, shape: tuple[int, int, int, int], dtype: str, pooler_units: int = 0
) -> dict[str, tuple[tuple, np.dtype]]:
    """Shape and dtype of each array of a cache of `n` samples, with ``shape = (L, H, k, D)`` and
    `pooler_units` P pooler units (a ``pooler`` array (N, P, D) only when P > 0)."""
    layers, heads, k, d = shape
    dt = np.dtype(dtype)
    specs = {
        "heads": ((n, layers, heads, k), dt),  # (N, L, H, k)
        "mlps": ((n, layers, d), dt),  # (N, L, D)
        "emb": ((n, d), dt),  # (N, D)
        "labels": ((n,), np.dtype("int64")),  # (N,)
    }
    if pooler_units:
        specs[POOLER] = ((n, pooler_units, d), dt)  # (N, P, D)
    return specs


def meta_form(meta: dict) -> dict | None:
    """The `UnitLayout.form` a cache's meta.json records (None: compact, no pooler units)."""
    return meta.get("form")


def meta_pooler_units(meta: dict) -> list[str]:
    """The pooler units a cache's meta.json records."""
    return list((meta_form(meta) or {}).get("pooler_units", []))


def open_array(file: Path, shape: tuple, dtype: np.dtype, mode: Literal["r", "r+"] = "r") -> np.memmap:
    """Memory-map a cache array, refusing a missing, short, unreadable or mis-shaped file."""
    try:
        arr = np.load(file, mmap_mode="r")  # "r+" would silently extend a short file
    except (OSError, ValueError, EOFError) as err:
        raise CacheError(f"cache array {file} is missing, truncated or unreadable ({err})") from err
    if arr.shape != tuple(shape) or arr.dtype != dtype:
        raise CacheError(
            f"cache array {file} has shape {arr.shape} {arr.dtype}, expected {tuple(shape)} {dtype}"
        )
    return arr if mode == "r" else np.load(file, mmap_mode="r+")


def load_head_maps(file: Path) -> Tensor:
    """(L, H, D, k) head maps of a cache, refusing a missing, truncated or unreadable file."""
    try:
        return load_file(str(file))["head_maps"]
    except Exception as err:  # safetensors raises its own SafetensorError, OSError or KeyError
        raise CacheError(f"head maps {file} are missing, truncated or unreadable ({err})") from err


def read_meta(file: Path) -> dict:
    """A cache's meta.json, refusing a torn one or one that is not a cache's."""
    meta = read_json(file, "cache metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
        raise CacheError(f"cache metadata {file} is not a cache's meta.json (it has no key)")
    return meta


def _read_records(file: Path) -> dict[str, str]:
    """A progress file's records; a missing or torn one is empty (its chunks are redone)."""
    try:
        records = read_json(file, "progress file") if file.exists() else {}
    except CacheError:
        return {}
    return records if isinstance(records, dict) else {}


def _preallocate(file: Path, shape: tuple, dtype: np.dtype) -> None:
    """Create `file` as a `.npy` with its data blocks reserved: not sparse, so writing it through a
    memory map can never meet a full disk (a SIGBUS, not an exception). A kill leaves it short."""
    try:
        with open(file, "wb") as f:
            f.write(page_header(shape, dtype))
            f.flush()
            reserve(f, f.tell(), int(np.prod(shape)) * dtype.itemsize)
    except BaseException:
        file.unlink(missing_ok=True)
        raise


def page_header(shape: tuple, dtype: np.dtype) -> bytes:
    """A `.npy` (format 1.0) header padded with spaces to exactly `PAGE` bytes."""
    fields = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    text = repr(fields).encode("latin1")
    prefix = np.lib.format.magic(1, 0)
    room = PAGE - len(prefix) - 2  # 2: the little-endian uint16 header length
    if len(text) + 1 > room:
        raise ValueError(f"a .npy header for shape {shape} does not fit in {PAGE} bytes")
    body = text + b" " * (room - len(text) - 1) + b"\n"
    return prefix + room.to_bytes(2, "little") + body


def chunk_byte_ranges(
    arrays: dict[str, np.ndarray], chunk_size: int, chunk: int
) -> dict[str, tuple[int, int]]:
    """``{array: (first byte, end byte)}`` of a chunk in each array's file (header included)."""
    ranges = {}
    for name, arr in arrays.items():
        row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
        offset = int(arr.offset) if isinstance(arr, np.memmap) else PAGE
        start = chunk * chunk_size
        stop = min(start + chunk_size, arr.shape[0])
        ranges[name] = (offset + start * row, offset + stop * row)
    return ranges


def page_groups(arrays: dict[str, np.ndarray], chunk_size: int, chunks: list[int]) -> list[list[int]]:
    """`chunks` grouped so that no two groups write the same page of any file.

    Ranks get whole groups, so two ranks (or nodes) never write into one page: on NFS or Lustre a
    page written back by one node cannot clobber bytes another node wrote. A chunk starts a new group
    when its first byte in every file lies on a page boundary (or when it does not follow the
    previous chunk).
    """
    groups: list[list[int]] = []
    for chunk in sorted(chunks):
        aligned = all(first % PAGE == 0 for first, _ in chunk_byte_ranges(arrays, chunk_size, chunk).values())
        if groups and groups[-1][-1] == chunk - 1 and not aligned:
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return groups


class CacheWriter:
    """Writes one cache chunk by chunk; resumable; marks completion atomically.

    Creating it creates the files at full size, or reopens a partial cache to resume it. A partial
    cache of another layout (``num_samples``, ``chunk_size``, shape) or with a short or unreadable
    file holds nothing worth keeping: it is restarted from scratch with a warning. A cache another
    process completed meanwhile has no pending chunks.

    Args:
        path: the cache folder.
        key: what the cache holds.
        num_samples: N.
        shape: (L, H, k, D).
        names: unit names.
        head_maps: (L, H, D, k) fixed maps; full-form ones (the identity expanded over (L, H))
            are not stored: meta.json says ``"head_maps": "identity"``.
        chunk_size: samples per chunk (the unit of resumption).
        extra_meta: stored in meta.json (class names, templates, ...).
        form: `UnitLayout.form` of a layout with pooler units or full-form heads (recorded in
            meta.json; its pooler units get the ``pooler`` array).
        rank: this process's rank (progress files are per rank, merged at `finalize`; only rank 0
            restarts a partial cache).

    Raises:
        ValueError: ``chunk_size`` is not a positive integer.
        NoSpaceError: the disk cannot hold the files (before anything is extracted).
        CacheError: the folder holds a cache of another key, or an unreadable meta.json.
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
        form: dict | None = None,
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.path = Path(path)
        self.key = key
        self.n = num_samples
        self.chunk_size = chunk_size
        self.rank = rank
        pooler = list((form or {}).get("pooler_units", []))
        self.shapes = array_specs(num_samples, shape, key.dtype, len(pooler))
        layers, heads, k, d = shape
        self.identity = shared_maps(head_maps)
        if self.identity and not torch.equal(head_maps[0, 0].cpu(), torch.eye(d, dtype=head_maps.dtype)):
            raise ValueError("shared head maps must be the full form's identity (nothing else is stored)")
        self.meta = {
            "key": asdict(key),
            "num_samples": num_samples,
            "shape": {"layers": layers, "heads": heads, "k": k, "output_dim": d},
            "chunk_size": chunk_size,
            "names": names,
            "complete": False,
            **(extra_meta or {}),
        }
        if form:  # only layouts with pooler units or full-form heads: compact caches are unchanged
            self.meta["form"] = dict(form)
        if self.identity:
            self.meta["head_maps"] = IDENTITY_MAPS
        self.arrays: dict[str, np.memmap] = {}
        self.done: dict[int, str] = {}
        self.mine: dict[str, str] = {}  # this rank's records
        self.finished = False  # complete, by this writer or another process
        self._progress_file = self.path / "progress" / f"rank{rank}.json"
        self.path.mkdir(parents=True, exist_ok=True)
        old = read_meta(self.path / "meta.json") if (self.path / "meta.json").exists() else None
        if old is not None and old["key"] != self.meta["key"]:
            raise CacheError(
                f"{self.path / 'meta.json'} belongs to a cache of another key; delete {self.path}, "
                "or pass --data.on_mismatch rebuild"
            )
        if old is not None and old.get("complete"):  # completed since the caller looked
            self.meta, self.finished = old, True
            return
        problem = self._why_not_resumable(old)
        if problem is not None:
            if rank != 0:
                raise CacheError(f"partial cache {self.path} cannot be resumed: {problem}")
            log.warning("restarting the partial cache %s from scratch: %s", self.path, problem)
            self._clear()
            old = None
        (self.path / "progress").mkdir(exist_ok=True)
        if old is None and rank == 0:
            atomic_write_json(self.path / "meta.json", self.meta)
        self._create_missing_files(head_maps)
        self.arrays = {
            name: open_array(self.path / f"{name}.npy", *spec, "r+") for name, spec in self.shapes.items()
        }
        self.done = self._read_progress()
        self.mine = _read_records(self._progress_file)

    def _why_not_resumable(self, old: dict | None) -> str | None:
        """Why the partial cache in the folder cannot be resumed (None: it can, or there is none)."""
        layout = ("num_samples", "chunk_size", "shape", "form")
        changed = [
            f"{f} {old.get(f)} -> {self.meta.get(f)}"
            for f in layout
            if old and old.get(f) != self.meta.get(f)
        ]
        if changed:
            return f"its layout changed ({', '.join(changed)})"
        recorded = bool(self._read_progress())  # then a missing array loses recorded chunks
        try:
            for name, (shape, dtype) in self.shapes.items():
                if recorded or (self.path / f"{name}.npy").exists():
                    open_array(self.path / f"{name}.npy", shape, dtype)
            if not self.identity and (self.path / "head_maps.safetensors").exists():
                load_head_maps(self.path / "head_maps.safetensors")
        except CacheError as err:
            return str(err)
        return None

    def _clear(self) -> None:
        """Delete a partial cache's files; progress first, so a kill midway leaves no stale records."""
        shutil.rmtree(self.path / "progress", ignore_errors=True)
        for name in (*(f"{a}.npy" for a in (*ARRAYS, POOLER)), "head_maps.safetensors", "meta.json"):
            (self.path / name).unlink(missing_ok=True)

    def _create_missing_files(self, head_maps: Tensor) -> None:
        """Create the arrays (disk space reserved) and the head maps that do not exist yet."""
        todo = [
            (file, int(np.prod(shape)) * dtype.itemsize, lambda f, s=shape, t=dtype: _preallocate(f, s, t))
            for name, (shape, dtype) in self.shapes.items()
            if not (file := self.path / f"{name}.npy").exists()
        ]
        maps = self.path / "head_maps.safetensors"
        if not self.identity and not maps.exists():
            blob = safetensors_bytes({"head_maps": head_maps.detach().float().cpu().contiguous()})
            todo.append((maps, len(blob), lambda f: atomic_write_bytes(f, blob)))
        create_files(self.path, todo, "the activation cache")

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
            done.update({int(k): v for k, v in _read_records(file).items()})
        return done

    def pending_chunks(self) -> list[int]:
        """Chunks not recorded as written (none once the cache is complete)."""
        return [] if self.finished else [c for c in range(self.num_chunks) if c not in self.done]

    def write(self, indices: np.ndarray, compact: Contributions, labels: Tensor) -> None:
        """Write a batch of contributions at the given sample indices (sorted or not)."""
        if self.finished:
            return
        dt = self.shapes["heads"][1]
        self.arrays["heads"][indices] = compact.heads.detach().cpu().numpy().astype(dt)
        self.arrays["mlps"][indices] = compact.mlps.detach().cpu().numpy().astype(dt)
        self.arrays["emb"][indices] = compact.emb.detach().cpu().numpy().astype(dt)
        self.arrays["labels"][indices] = labels.cpu().numpy()
        if POOLER in self.arrays:
            names = self.meta["form"]["pooler_units"]
            missing = [name for name in names if name not in compact.extra]
            if missing:
                raise ValueError(f"the contributions lack the pooler units {missing} this cache stores")
            pooled = torch.stack([compact.extra[name].detach() for name in names], dim=1)  # (N, P, D)
            self.arrays[POOLER][indices] = pooled.cpu().numpy().astype(dt)

    def commit_chunk(self, chunk: int) -> None:
        """Flush a fully written chunk and record it with its checksum."""
        if self.finished:
            return
        for arr in self.arrays.values():
            arr.flush()
        start, stop = self.chunk_range(chunk)
        floats = [a for a in ("heads", "mlps", "emb", POOLER) if a in self.arrays]
        if not all(np.isfinite(self.arrays[a][start:stop]).all() for a in floats):
            raise CacheError(
                f"non-finite contributions (NaN/Inf) in samples {start}-{stop} of {self.path}; "
                "check the model's precision and the input images"
            )
        self.done[chunk] = chunk_digest(self.arrays, start, stop)
        self.mine[str(chunk)] = self.done[chunk]
        try:
            atomic_write_json(self._progress_file, self.mine)
        except FileNotFoundError:  # progress/ is gone: did another process finalise the cache?
            if self._finished_elsewhere():
                return
            self._progress_file.parent.mkdir(exist_ok=True)
            atomic_write_json(self._progress_file, self.mine)

    def _finished_elsewhere(self) -> bool:
        meta_file = self.path / "meta.json"
        meta = read_meta(meta_file) if meta_file.exists() else {}
        if meta.get("complete") and meta["key"] == self.meta["key"]:
            log.info("%s was completed by another process meanwhile", self.path)
            self.finished = True
        return self.finished

    def finalize(self) -> Path:
        """Mark the cache complete once every chunk is recorded (rank 0 only)."""
        pause_point("finalize")  # a test hook (`residual_lightning.locks`): a no-op otherwise
        if self.finished:
            return self.path
        self.done = self._read_progress()
        missing = self.pending_chunks()
        if missing and self._finished_elsewhere():
            return self.path
        if missing:
            raise CacheError(f"cannot finalise {self.path}: chunks {missing[:10]} were never written")
        meta = dict(self.meta, complete=True, checksums=[self.done[c] for c in range(self.num_chunks)])
        if not self.identity:
            meta["head_maps_sha256"] = file_sha256(self.path / "head_maps.safetensors")
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.path / "meta.json", meta)
        shutil.rmtree(self.path / "progress", ignore_errors=True)
        self.finished = True
        return self.path

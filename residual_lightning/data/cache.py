"""Activation cache: the compact unit contributions of a dataset split, extracted once.

Layout of one cache (a folder named by the digest of its `CacheKey`)::

    meta.json          key, shapes, unit names, class names, chunk checksums, "complete": true
    heads.npy          (N, L, H, k)  head coordinates y            (float16 by default)
    mlps.npy           (N, L, D)     MLP contributions
    emb.npy            (N, D)        emb contribution
    labels.npy         (N,)          int64
    pooler.npy         (N, P, D)     pooler units (MAP readouts' ``pool.mlp``), only where P > 0
    head_maps.safetensors            (L, H, D, k) float32 fixed maps (not in full-form caches)

A layout with pooler units or full-form heads (MAP readouts: heads (N, L, H, D), their head maps the
identity) records its `UnitLayout.form` in meta.json (``"form"``) and ``"head_maps": "identity"``
instead of a head-maps file; a compact cache has neither, so its files are as they always were.
    progress/rank*.json              chunks written so far (while incomplete)

`CacheWriter` (in `writer.py`) creates the arrays as `.npy` files at full size with their disk
blocks reserved up front (`os.posix_fallocate`, or written zeros where a filesystem cannot), then
they are written chunk by chunk through memory maps: a full disk fails before extraction starts, as
a `NoSpaceError` naming the bytes needed and free, never as a SIGBUS in the middle. A chunk is recorded (with the sha256 of its
bytes) only after it is flushed, so a run killed at any point, even with SIGKILL, resumes from the
last recorded chunk. The same images through the same model give the same bytes, so a resumed cache
is bit-identical to an uninterrupted one. A partial cache that cannot be resumed (its layout changed,
or a file is short or unreadable) is restarted from scratch with a warning. The ``complete`` flag is
written last, atomically (write to a temporary file, then `os.replace`). A cache whose key or
checksums do not match, or any of whose files is unreadable, is never used silently: that is a
`CacheError` naming the file. A file lock (`residual_lightning.locks`) serialises the processes,
jobs and nodes building the same cache: one builds, the others wait and then open it.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from residual_lightning.contributions import Contributions, UnitLayout, identity_maps, shared_maps
from residual_lightning.data.keys import CacheKey
from residual_lightning.data.writer import (
    IDENTITY_MAPS,
    POOLER,
    CacheWriter,
    array_specs,
    chunk_digest,
    load_head_maps,
    meta_form,
    meta_pooler_units,
    open_array,
    read_meta,
)
from residual_lightning.files import CacheError, check_format, file_sha256
from residual_lightning.locks import BuildLock

log = logging.getLogger(__name__)

CacheDtype = Literal["float16", "float32"]
OnMismatch = Literal["error", "rebuild"]


class ActivationCache:
    """A complete, verified cache, read through memory maps (nothing is loaded eagerly).

    Use `ActivationCache.open`; index with `batch(indices)`.
    """

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.meta = meta
        s = meta["shape"]
        dims = (s["layers"], s["heads"], s["k"], s["output_dim"])
        self.pooler_units = meta_pooler_units(meta)
        extra_names = meta["names"][1 + s["layers"] + s["layers"] * s["heads"] :]
        if extra_names != self.pooler_units:
            raise CacheError(
                f"{path / 'meta.json'} names the pooler units {extra_names} but stores {self.pooler_units} "
                "(a cache written before pooler units were cached)"
            )
        specs = array_specs(len(self), dims, meta["key"]["dtype"], len(self.pooler_units))
        self.arrays = {name: open_array(path / f"{name}.npy", *spec) for name, spec in specs.items()}
        self.identity = meta.get("head_maps") == IDENTITY_MAPS
        if self.identity:  # full-form heads: the identity, never stored nor materialised
            self.head_maps: Tensor = identity_maps(s["layers"], s["heads"], s["output_dim"])
        else:
            self.head_maps = load_head_maps(path / "head_maps.safetensors")

    @classmethod
    def open(cls, path: str | Path, key: CacheKey | None = None, verify: bool = True) -> ActivationCache:
        """Open a complete cache, checking its key and (with `verify`) every chunk's checksum.

        Args:
            path: the cache folder.
            key: the expected key; a cache built for anything else is refused.
            verify: re-hash the arrays and compare with the recorded checksums.

        Raises:
            CacheError: missing, incomplete, built for another key, or corrupt, truncated or
                unreadable (naming the file).
        """
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise CacheError(f"no cache at {path} (meta.json missing)")
        meta = read_meta(meta_file)
        check_format("cache", meta["key"].get("format_version"), path)
        if not meta.get("complete"):
            raise CacheError(
                f"cache at {path} is incomplete (an extraction was interrupted); build it to resume"
            )
        if key is not None and meta["key"] != asdict(key):
            diff = {k: (meta["key"].get(k), v) for k, v in asdict(key).items() if meta["key"].get(k) != v}
            raise CacheError(
                f"cache at {path} was built for something else; differing fields (cached, wanted): {diff}"
            )
        try:
            cache = cls(path, meta)
        except KeyError as err:
            raise CacheError(f"{meta_file} lacks the field {err}; delete {path} or rebuild it") from err
        except CacheError as err:
            raise CacheError(f"{err}; delete {path} or pass --data.on_mismatch rebuild") from err
        if verify:
            cache.verify()
        return cache

    def verify(self) -> None:
        """Re-hash every chunk and the head maps; raise `CacheError` naming the first bad one."""
        size, checksums = self.meta["chunk_size"], self.meta.get("checksums", [])
        if len(checksums) != (len(self) + size - 1) // size:
            raise CacheError(
                f"{self.path / 'meta.json'} records {len(checksums)} chunk checksums for {len(self)} samples"
            )
        for chunk, expected in enumerate(checksums):
            start = chunk * size
            stop = min(start + size, len(self))
            if chunk_digest(self.arrays, start, stop) != expected:
                raise CacheError(
                    f"cache at {self.path} is corrupt: checksum mismatch in chunk {chunk} "
                    f"(samples {start}-{stop}); delete it or rebuild with on_mismatch='rebuild'"
                )
        maps = self.path / "head_maps.safetensors"
        if self.identity:
            return
        if self.meta.get("head_maps_sha256", file_sha256(maps)) != file_sha256(maps):
            raise CacheError(f"head maps {maps} are corrupt: they do not match their recorded checksum")

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

    @property
    def layout(self) -> UnitLayout:
        """The layout of the cached units (shape and convention from meta.json)."""
        shape = self.meta["shape"]
        dims = (shape["layers"], shape["heads"], shape["k"], shape["output_dim"])
        return UnitLayout.from_shape(dims, self.meta["key"]["convention"], meta_form(self.meta))

    def batch(self, indices: np.ndarray | list[int] | slice) -> Contributions:
        """Read a batch (float32 tensors, with labels; the head maps stay with the cache).

        Sorted indices read fastest.
        """
        if not isinstance(indices, slice):
            indices = np.asarray(indices)
        parts = {name: torch.from_numpy(np.array(self.arrays[name][indices])) for name in self.arrays}
        out = Contributions(
            heads=parts["heads"].float(),
            mlps=parts["mlps"].float(),
            emb=parts["emb"].float(),
            label=parts["labels"],
        )
        if POOLER in parts:  # pooler units by name (`Contributions.pooler_names` reads the names)
            pooled = parts[POOLER].float()  # (N, P, D)
            out.names = list(self.names)
            out.extra = {name: pooled[:, i] for i, name in enumerate(self.pooler_units)}
        return out

    def iter_batches(self, batch_size: int = 4096) -> Iterable[Contributions]:
        """Sequential batches over the whole cache (for PCA and analyses)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, min(start + batch_size, len(self))))


def write_cache(
    path: str | Path,
    key: CacheKey,
    compact: Contributions,
    labels: Tensor | None = None,
    chunk_size: int = 4096,
    head_width: int | None = None,
) -> ActivationCache:
    """Write in-memory contributions as a complete, checksummed cache (synthetic data, tests, imports).

    Args:
        path: the cache folder.
        key: its key (``key.dtype`` is the storage dtype).
        compact: contributions of all N samples, with their head maps and unit names.
        labels: (N,) labels (default: ``compact.label``).
        chunk_size: samples per chunk.
        head_width: d of full-form heads (recorded in the form; default k).
    """
    labels = compact.label if labels is None else labels
    if labels is None:
        raise ValueError("write_cache needs labels: pass labels= or contributions with a label")
    n, layers, heads, k = compact.heads.shape
    shape = (layers, heads, k, compact.mlps.shape[-1])
    pooler = compact.pooler_names()
    full = shared_maps(compact.head_maps)
    form = (
        {"compact": not full, "head_width": head_width or k, "pooler_units": pooler}
        if pooler or full
        else None
    )
    writer = CacheWriter(
        path, key, n, shape, compact.names, compact.head_maps, chunk_size=chunk_size, form=form
    )
    for chunk in writer.pending_chunks():
        start, stop = writer.chunk_range(chunk)
        writer.write(np.arange(start, stop), compact[start:stop], labels[start:stop])
        writer.commit_chunk(chunk)
    writer.finalize()
    return ActivationCache.open(path, key, verify=False)


def cache_lock(path: Path) -> BuildLock:
    """The lock that serialises builders of the cache at `path` (`residual_lightning.locks`)."""
    return BuildLock(path)


def open_or_none(
    path: Path, key: CacheKey, on_mismatch: OnMismatch = "error", verify: bool = True
) -> ActivationCache | None:
    """Open the cache at `path` if it is complete and valid.

    Returns None when it is absent or incomplete (to be built or resumed). A complete cache that
    fails its checks, an unreadable meta.json, or a partial cache of another key raises
    `CacheError`, or with ``on_mismatch="rebuild"`` is deleted with a warning and None is returned.
    """
    if not (path / "meta.json").exists():
        return None
    try:
        meta = read_meta(path / "meta.json")
        if not meta.get("complete"):
            if meta["key"] != asdict(key):
                raise CacheError(f"partial cache at {path} was started for another key")
            return None
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

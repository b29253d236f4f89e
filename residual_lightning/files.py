"""Files the framework writes and later reads back: atomic writes, checksums, format versions.

Every file residual-lightning derives from data (activation caches, PCA bases, text classifiers,
checkpoints) goes through these helpers, so that:

- a write is atomic: a temporary name in the same folder (host + pid + random, so two processes or
  nodes never share one), flushed and fsynced, then renamed over the target; a crash or a full
  disk leaves the old file or none, never a truncated one;
- a file read back is checked: its format version (`check_format`), the key it was built for, and a
  checksum of its contents; any failure is a `CacheError` naming the file, which
  ``on_mismatch: rebuild`` catches to rebuild it;
- a large file later written through a memory map is created with its disk space reserved
  (`reserve`, `create_files`): a full disk is a `NoSpaceError` up front, never a SIGBUS midway.

Pure Python + torch + safetensors: the torch-only core (`spectral`) uses it too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from torch import Tensor

# The format each kind of file is written in; a file of an older format is refused by `check_format`.
FORMAT_VERSIONS = {"cache": 2, "bases": 2, "classifier": 2, "checkpoint": 1}
OnMismatch = Literal["error", "rebuild"]


class CacheError(RuntimeError):
    """A derived file (cache, bases, classifier, checkpoint) that is missing, incomplete, corrupt,
    stale, or built for something else. The message names the file."""


class StaleFileError(CacheError):
    """A file written by another (older or newer) format version of residual-lightning."""


def check_format(kind: str, found: Any, path: str | Path) -> None:
    """Refuse a file written in another format version than this version of the framework writes.

    Args:
        kind: ``cache``, ``bases``, ``classifier`` or ``checkpoint``.
        found: the version recorded in the file (None: written before versions were recorded).
        path: the file, for the message.

    Raises:
        StaleFileError: the versions differ.
    """
    current = FORMAT_VERSIONS[kind]
    try:
        version = int(found) if found is not None else 1
    except (TypeError, ValueError):
        version = None
    if version == current:
        return
    if version is not None and version > current:
        raise StaleFileError(
            f"{path} was written by a newer residual-lightning ({kind} format {version}; this version "
            f"reads format {current}): upgrade residual-lightning, or delete the file to rebuild it"
        )
    remedy = (
        "train it again with this version"
        if kind == "checkpoint"
        else "delete it, or pass --data.on_mismatch rebuild to rebuild it"
    )
    raise StaleFileError(
        f"{path} was written by an older residual-lightning ({kind} format {found if found is not None else 1}; "
        f"this version reads format {current}): {remedy}"
    )


def temporary_name(path: str | Path) -> Path:
    """A hidden sibling of `path` that no other process, job or node will pick (host, pid, random)."""
    path = Path(path)
    host = socket.gethostname().split(".")[0] or "host"
    return path.with_name(f".{path.name}.{host}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(folder), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`.

    On any error (a full disk included) the temporary file is removed and `path` is untouched.

    Example:
        >>> with atomic_path("out.bin") as tmp:  # doctest: +SKIP
        ...     tmp.write_bytes(b"...")
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file the framework wrote; a torn or unreadable one is a `CacheError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{what} {path} is unreadable or torn ({err})") from err


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def key_string(key: Any) -> str:
    """Canonical JSON of a key (what a derived file was built from)."""
    return json.dumps(key, sort_keys=True, default=str)


def save_tensors(
    path: str | Path, tensors: dict[str, Tensor], kind: str, key: Any, metadata: dict[str, str] | None = None
) -> None:
    """Write named tensors as a safetensors file, atomically, with kind, format, key and checksum.

    Args:
        path: the file.
        tensors: what to store.
        kind: a key of `FORMAT_VERSIONS` (``bases``, ``classifier``).
        key: JSON-able description of what the file was built from; `load_tensors` compares it.
        metadata: more string metadata to store.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta.update(
        kind=kind,
        format_version=str(FORMAT_VERSIONS[kind]),
        key=key_string(key),
        sha256=tensors_sha256(tensors),
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tensors(
    path: str | Path, kind: str, key: Any = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a file written by `save_tensors`, checking kind, format version, key and checksum.

    Args:
        path: the file.
        kind: the kind it must be.
        key: the key it must have been built for (None: not checked).
        device: where to put the tensors.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        CacheError: missing, truncated or unreadable, of another kind, format or key, or corrupt.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{kind} file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            # Copies: a tensor backed by the file's memory map would fault (SIGBUS) if the
            # file were truncated in place later.
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise CacheError(
            f"{kind} file {path} is truncated or unreadable ({type(err).__name__}: {err})"
        ) from err
    if "kind" not in meta:  # written before files carried kind, format and checksum
        check_format(kind, None, path)
    if meta["kind"] != kind:
        raise CacheError(f"{path} is not a {kind} file (it says kind={meta['kind']!r})")
    check_format(kind, meta.get("format_version"), path)
    if key is not None and meta.get("key") != key_string(key):
        raise CacheError(
            f"{kind} file {path} was built for something else: recorded key {meta.get('key')}, wanted {key_string(key)}"
        )
    if tensors_sha256(tensors) != meta.get("sha256"):
        raise CacheError(f"{kind} file {path} is corrupt: its contents do not match the recorded checksum")
    return tensors, meta


def load_or_build(
    path: str | Path,
    load: Callable[[Path], Any],
    build: Callable[[Path], Any],
    on_mismatch: OnMismatch = "error",
) -> Any:
    """Load a derived file, building it when absent; one that fails its checks raises or is rebuilt.

    Args:
        path: the file.
        load: reads and verifies it (raises `CacheError` when it fails a check).
        build: computes the value, writes it to `path` (atomically) and returns it.
        on_mismatch: ``error`` raises the `CacheError`; ``rebuild`` warns, deletes and rebuilds.
    """
    path = Path(path)
    if path.exists():
        try:
            return load(path)
        except CacheError as err:
            if on_mismatch != "rebuild":
                raise CacheError(f"{err}; delete it or pass --data.on_mismatch rebuild") from err
            warnings.warn(f"{err}; rebuilding it", stacklevel=2)
            path.unlink(missing_ok=True)
    return build(path)


class NoSpaceError(OSError, CacheError):
    """A derived file that does not fit on its disk (``errno`` is ENOSPC or EDQUOT); also a `CacheError`."""


def reserve(f: BinaryIO, offset: int, length: int) -> None:
    """Allocate the disk blocks of `length` bytes of `f` from `offset` (they read as zeros).

    Writing there later, through a memory map too, then cannot meet a full disk (a SIGBUS in a
    memory map); a full disk fails here instead, as an `OSError` (ENOSPC). Uses
    `os.posix_fallocate`, or writes zeros where the filesystem or platform has none.
    """
    fallocate = getattr(os, "posix_fallocate", None)  # absent on macOS
    if length > 0 and fallocate is not None:
        try:
            fallocate(f.fileno(), offset, length)
            return
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise
    zeros = memoryview(bytes(min(length, 1 << 24)))
    f.seek(offset)
    while length > 0:
        length -= f.write(zeros[: min(length, len(zeros))])
    f.flush()


def create_files(
    folder: str | Path, files: list[tuple[Path, int, Callable[[Path], None]]], what: str
) -> None:
    """Create files in order, turning a full disk into a `NoSpaceError` that says what is missing.

    Args:
        folder: where they go (for the message and the free space).
        files: ``(path, size in bytes, create)``; ``create(path)`` writes the file.
        what: what they make up, for the message (e.g. ``the activation cache``).

    Raises:
        NoSpaceError: naming the folder, the file that failed, the bytes the files not yet created
            need and the bytes free.
    """
    for i, (path, _, create) in enumerate(files):
        try:
            create(path)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            needed = sum(size for _, size, _ in files[i:])
            free = shutil.disk_usage(folder).free
            raise NoSpaceError(
                err.errno,
                f"No space left on device for {what} {folder}: creating {path.name} and the files after it "
                f"needs {needed} bytes ({needed / 2**20:.1f} MiB), {free} bytes ({free / 2**20:.1f} MiB) "
                "are free; free some space or choose another --data.cache_dir",
            ) from err

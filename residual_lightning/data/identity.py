"""The identity of a dataset part: the digest its cache key records, so changed data never reuses a cache.

For file-based datasets (image folders, CSV lists, every registry dataset read from image files) the
digest covers, for each sample of the part in order, its file path relative to the data root, its
size in bytes and its label, plus the bytes of a fixed sample of 32 files spread over the part (so a
second folder laid out like the first, same names and sizes, is still told apart); with
``hash_contents`` the bytes of every file (for files replaced in place). It deliberately
leaves out the absolute root and modification times, so data copied to a node-local disk on a
cluster keeps its caches. A CSV root adds the digest of the CSV file itself. Array-backed datasets
(CIFAR, MNIST, SVHN, digits) digest their pixel values and labels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from residual_lightning.files import file_sha256

SAMPLED_FILES = 32  # files whose bytes are always hashed, spread evenly over the part


def _unwrap(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """The innermost dataset and the indices into it that `dataset` holds, in order."""
    indices = np.arange(len(dataset))
    while isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices, dtype=np.int64)[indices]
        dataset = dataset.dataset
    return dataset, indices


def _relative(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return path.relative_to(base).as_posix()
        except ValueError:  # a CSV may list absolute paths elsewhere
            pass
    return path.as_posix()


def part_digest(dataset: Dataset, root: str | Path | None, hash_contents: bool = False) -> str:
    """A 16-hex-digit digest of the samples of one dataset part (see the module docstring).

    Args:
        dataset: a loaded part (a Subset of an `ImageListDataset` or `ArrayImageDataset`).
        root: the data root the paths are made relative to (a CSV file: its folder).
        hash_contents: also hash every file's bytes (for files replaced in place, same name and size).

    Raises:
        FileNotFoundError: a listed image file no longer exists (named).
    """
    base, indices = _unwrap(dataset)
    targets = np.asarray(base.targets, dtype=np.int64)
    h = hashlib.sha256()
    h.update(f"n={len(indices)}\n".encode())
    root = Path(root) if root is not None else None
    folder = root.parent if root is not None and root.is_file() else root
    if root is not None and root.is_file():  # a CSV list: its own bytes are part of the data
        h.update(f"csv={file_sha256(root)}\n".encode())
    paths = getattr(base, "paths", None)
    images = getattr(base, "images", None)
    if paths is not None:
        sampled = set(np.linspace(0, len(indices) - 1, min(len(indices), SAMPLED_FILES)).round().astype(int))
        for position, i in enumerate(indices.tolist()):
            path = Path(paths[i])
            try:
                size = path.stat().st_size
            except FileNotFoundError as err:
                raise FileNotFoundError(f"image file {path} of the dataset no longer exists") from err
            h.update(f"{_relative(path, folder)}\0{size}\0{targets[i]}\n".encode())
            if hash_contents or position in sampled:
                h.update(file_sha256(path).encode())
    elif images is not None:
        h.update(f"shape={tuple(images.shape[1:])}\n".encode())
        for start in range(0, len(indices), 4096):  # bounded memory for large arrays
            h.update(np.ascontiguousarray(images[indices[start : start + 4096]]).tobytes())
        h.update(targets[indices].tobytes())
    else:  # an unknown dataset type: at least its labels
        h.update(targets[indices].tobytes())
    return h.hexdigest()[:16]

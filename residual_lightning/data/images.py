"""Image datasets the registry returns: image-file lists and in-memory arrays, with bad-image handling.

Every dataset exposes ``targets`` (int64 array), ``class_names``, ``templates``, ``num_skipped`` and
``skipped_files`` without decoding images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

OnBadImage = Literal["raise", "skip"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(RuntimeError):
    """An image file that PIL cannot open or fully decode (missing, corrupt or truncated)."""


def open_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB.

    Args:
        path: image file.

    Raises:
        BadImageError: the file is missing, corrupt or truncated; the message names the file.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces a full decode, so truncation shows here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"Cannot read image {path}: {err}") from err


def _is_readable(path: str) -> bool:
    try:
        open_rgb(path)
    except BadImageError:
        return False
    return True


class ImageListDataset(Dataset):
    """Images listed as (path, label) pairs, decoded lazily.

    Args:
        paths: image files.
        targets: int label of each file.
        class_names: name of each label.
        templates: prompt templates.
        transform: applied to the PIL RGB image; None returns the PIL image.
        on_bad_image: ``"raise"`` (BadImageError when a bad file is read) or ``"skip"`` (decode
            all files now, drop and count the unreadable ones).
        check_files: with ``"raise"``, check now that every file exists (for user-made lists).
        check_threads: threads used by ``"skip"``'s decoding pass.
        name: dataset name, for messages.
        split: source split, for messages.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        templates: Sequence[str],
        transform: Callable | None = None,
        on_bad_image: OnBadImage = "raise",
        check_files: bool = False,
        check_threads: int = 8,
        name: str = "",
        split: str = "",
    ) -> None:
        paths = [str(p) for p in paths]
        targets = np.asarray(targets, dtype=np.int64)
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.skipped_files: list[str] = []
        if on_bad_image == "skip" and paths:
            with ThreadPoolExecutor(max_workers=max(1, check_threads)) as pool:
                ok = np.fromiter(pool.map(_is_readable, paths, chunksize=64), dtype=bool, count=len(paths))
            self.skipped_files = [p for p, good in zip(paths, ok) if not good]
            paths = [p for p, good in zip(paths, ok) if good]
            targets = targets[ok]
        elif check_files:
            missing = [p for p in paths if not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{name or 'dataset'}: {len(missing)} listed image file(s) do not exist, e.g. {missing[:3]}"
                )
        self.paths = paths
        self.targets = targets
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.transform = transform
        self.name = name
        self.split = split

    @property
    def num_skipped(self) -> int:
        """Number of unreadable images dropped by ``on_bad_image="skip"``."""
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = open_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class ArrayImageDataset(Dataset):
    """Images held in a uint8 array (MNIST, SVHN, CIFAR, digits), converted to PIL RGB on access.

    Args:
        images: uint8 array, (N, H, W) grey or (N, H, W, 3) RGB.
        targets: int label of each image.
        class_names: name of each label.
        templates: prompt templates.
        transform: applied to the PIL RGB image; None returns the PIL image.
        resize: if set, images are upscaled to (resize, resize) before the transform.
        name: dataset name.
        split: source split.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        templates: Sequence[str],
        transform: Callable | None = None,
        resize: int | None = None,
        name: str = "",
        split: str = "",
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N, H, W[, 3]), got {images.dtype} {images.shape}")
        targets = np.asarray(targets, dtype=np.int64)
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.transform = transform
        self.resize = resize
        self.name = name
        self.split = split
        self.skipped_files: list[str] = []

    @property
    def num_skipped(self) -> int:
        """Always 0: array-backed datasets have no files to skip."""
        return 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        if self.resize is not None and image.size != (self.resize, self.resize):
            image = image.resize((self.resize, self.resize), Image.Resampling.BILINEAR)
        image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class _TargetSubset(Subset):
    """A Subset that keeps ``targets``, ``class_names`` and ``templates`` of its source."""

    def __init__(self, dataset: Dataset, indices: np.ndarray) -> None:
        super().__init__(dataset, indices.tolist())
        self.targets = np.asarray(dataset.targets)[indices]
        self.class_names = dataset.class_names
        self.templates = dataset.templates
        self.source_indices = indices

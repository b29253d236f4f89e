"""What ``predict`` reads: the images under ``predict_path`` (or the test part), a disjoint share per rank.

`predict_files` finds the images of a file or folder, `predict_dataset` reads them with the
backbone's transform (labels unknown: ``-1``), `sample_names` names the samples of a registry part,
and `predict_loader` yields ``(image, label, index)`` batches so every prediction keeps its name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader, Dataset

from residual_lightning.data.extract import IndexedDataset
from residual_lightning.data.images import IMAGE_EXTENSIONS, ImageListDataset


def predict_files(path: str | Path) -> list[Path]:
    """The image file `path`, or the images under the folder `path` (recursive, sorted).

    Raises:
        FileNotFoundError: `path` does not exist or holds no image.
    """
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        raise FileNotFoundError(f"predict_path {root} does not exist")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under predict_path {root}")
    return files


def predict_dataset(
    files: list[Path],
    class_names: list[str],
    templates: list[str],
    transform: Callable | None,
    on_bad_image: Literal["raise", "skip"] = "raise",
) -> ImageListDataset:
    """The files as an unlabelled dataset (labels ``-1``); ``skip`` drops unreadable ones.

    Args:
        files: image files.
        class_names: the data module's class names (what the predictions are named by).
        templates: its prompt templates.
        transform: the backbone's eval transform.
        on_bad_image: raise on an unreadable image, or skip it (listed in ``skipped_files``).
    """
    return ImageListDataset(
        files,
        [-1] * len(files),
        class_names,
        templates,
        transform,
        on_bad_image=on_bad_image,
        name="predict_path",
    )


def sample_names(data: Dataset) -> list[str]:
    """A name per sample of a registry part: its file path, or ``test[i]`` for array datasets."""
    paths = getattr(getattr(data, "dataset", None), "paths", None)
    idx = getattr(data, "indices", range(len(data)))
    return [paths[i] for i in idx] if paths is not None else [f"test[{i}]" for i in range(len(data))]


def predict_loader(data: Dataset, batch_size: int, rank: int, world: int, num_workers: int) -> DataLoader:
    """``(image, label, index)`` batches of this rank's share of `data` (nothing repeated across ranks).

    Args:
        data: images to predict.
        batch_size: images per batch.
        rank: this rank.
        world: number of ranks.
        num_workers: DataLoader workers.
    """
    mine = list(range(rank, len(data), world))  # a disjoint share per rank, nothing repeated
    return DataLoader(IndexedDataset(data), batch_size=batch_size, sampler=mine, num_workers=num_workers)

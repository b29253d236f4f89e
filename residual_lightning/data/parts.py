"""The parts a data module caches and what goes into their cache keys besides the backbone.

`load_parts` reads a dataset's train/val/test parts from the registry (and, for an ImageNet
reference, a class-stratified subset of ImageNet train); `selection` is the JSON that records how a
part was drawn; `preprocessing` names what determines the images fed to the backbone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from residual_lightning.data.registry import load_split_datasets
from residual_lightning.data.splits import stratified_split


def load_parts(
    dataset: str,
    root: str | None,
    transform: Callable | None,
    options: dict[str, Any],
    seed: int,
    fractions: list[float] | None,
    shots: int | None,
    download: bool,
    reference_root: str | None = None,
    reference_size: int = 80_000,
) -> dict[str, Dataset]:
    """The ``train``, ``val`` and ``test`` parts, plus ``reference`` when `reference_root` is given.

    Args:
        dataset: registry name.
        root: data root.
        transform: image transform (None: PIL images, for reading labels and names only).
        options: loader options (``image_size`` defaults to 224).
        seed: seed of the splits, few-shot draw and reference subset.
        fractions: override of the split fractions.
        shots: training samples per class (few-shot).
        download: let torchvision download missing files.
        reference_root: ImageNet root of the PCA reference set (None: no reference part).
        reference_size: number of reference images.
    """
    opts = dict(options)
    image_size = opts.pop("image_size", 224)
    parts = load_split_datasets(
        dataset,
        root,
        transform,
        seed=seed,
        fractions=fractions,
        shots=shots,
        download=download,
        image_size=image_size,
        **opts,
    )
    if reference_root is not None:
        ref = load_split_datasets("imagenet", reference_root, transform, seed=seed)["train"]
        parts["reference"] = stratified_subset(ref, reference_size, seed)
    return parts


def stratified_subset(dataset, size: int, seed: int):
    """A class-stratified, seeded subset of `size` samples (all of them if smaller)."""
    targets = np.asarray(dataset.targets)
    if size >= len(targets):
        return dataset
    keep, _ = stratified_split(targets, [size / len(targets), 1 - size / len(targets)], seed=seed)
    sub = Subset(dataset, keep)
    sub.targets = targets[keep]
    sub.class_names = getattr(dataset, "class_names", None)
    return sub


def selection(
    part: str,
    seed: int,
    fractions: list[float] | None,
    shots: int | None,
    reference_size: int,
    options: dict[str, Any],
) -> str:
    """How a part was drawn, as recorded in its cache key (shots only for train, size only for reference)."""
    return json.dumps(
        {
            "part": part,
            "seed": seed,
            "fractions": fractions,
            "shots": shots if part == "train" else None,
            "reference_size": reference_size if part == "reference" else None,
            "options": options,
        },
        sort_keys=True,
    )


def preprocessing_name(amp: torch.dtype | None, backbone: str | None = None) -> str:
    """What determines the images fed to the backbone besides its name and weights.

    Images go through the library's own eval transform of the backbone (no augmentation, so the
    cached contributions are exact for training): with the model name and weights, the library
    and its version pin it (`BackboneSpec.preprocessing_id`, e.g. ``open_clip-eval-3.3.0``); a
    cache extracted under mixed precision records it too.

    Args:
        amp: autocast dtype of extraction, or None.
        backbone: the backbone's `preprocessing_id` (None: the installed open_clip's).
    """
    if backbone is None:
        import open_clip

        backbone = f"open_clip-eval-{open_clip.__version__}"
    return backbone + (f"|autocast-{amp}".replace("torch.", "") if amp else "")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """Autocast dtype of a trainer precision (``bf16-mixed``, ``16-mixed``), None for full precision."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

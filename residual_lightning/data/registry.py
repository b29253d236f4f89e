"""Registry of the image-classification datasets ResiDual is trained and evaluated on.

Each `DatasetSpec` knows its class names, prompt templates, on-disk layout and source splits, and
loads a source split as a `torch.utils.data.Dataset` of ``(transform(PIL RGB image), int label)``.
Every loaded dataset exposes, without decoding images:

- ``targets``: int64 numpy array of labels, one per sample (for stratified splits);
- ``class_names``, ``templates``: what the zero-shot text classifier needs;
- ``num_skipped``, ``skipped_files``: images dropped by ``on_bad_image="skip"``.

On-disk layouts are torchvision's (``root`` is what torchvision's class would get), so
``download=True`` defers to torchvision where it can download. Readers are our own: they list
(path, label) pairs or read the array files directly, which gives cheap ``targets`` everywhere and
avoids torchvision's md5 checks of whole archives. Datasets torchvision cannot fetch (ImageNet,
Stanford Cars, RESISC45) raise `FileNotFoundError` saying where the files go.

Source splits (the ``split`` argument) are the dataset's own: ``train``/``test`` (``val`` for
Flowers-102 and RESISC45), or ``all`` for data without an official split (EuroSAT, SUN397,
digits, user folders and CSVs). The train/val/test parts of method.md §3 are derived from sources
by `residual_lightning.data.splits.make_splits`; `load_split_datasets` does both steps.

Corrupt images: by default reading one raises `BadImageError` naming the file. With
``on_bad_image="skip"`` file-based loaders (every dataset except the array-backed cifar10,
cifar100, mnist, svhn and digits, which cannot hold a bad image) decode every image once when the
dataset is built and drop the unreadable ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from residual_lightning.data import splits as _splits
from residual_lightning.data.templates import (
    DATASET_TEMPLATES,
    load_class_names,
    load_class_names_file,
    load_templates_file,
)

__all__ = [
    "DATASETS",
    "BadImageError",
    "DatasetSpec",
    "ImageListDataset",
    "ArrayImageDataset",
    "get_dataset_spec",
    "load_dataset",
    "load_split_datasets",
    "open_rgb",
]

from residual_lightning.data.csv_reader import _read_csv
from residual_lightning.data.images import (
    ArrayImageDataset,
    BadImageError,
    ImageListDataset,
    OnBadImage,
    _TargetSubset,
    open_rgb,
)
from residual_lightning.data.layouts import _DOWNLOADERS, _LAYOUTS
from residual_lightning.data.readers import (
    _read_cifar10,
    _read_cifar100,
    _read_digits,
    _read_dtd,
    _read_eurosat,
    _read_flowers102,
    _read_food101,
    _read_gtsrb,
    _read_imagefolder,
    _read_imagenet,
    _read_mnist,
    _read_resisc45,
    _read_stanford_cars,
    _read_sun397,
    _read_svhn,
    _resisc45_has_official,
    _Source,
)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of the registry.

    Attributes:
        name: registry key.
        class_names: prompt-ready names in label order; None where they come from the data
            (``imagefolder``, ``csv``). SUN397's loaded datasets carry names derived from their
            own ``ClassName.txt`` (equal to these for the real data).
        templates: prompt templates, each with one ``{}``.
        source_splits: values `load` accepts for ``split``.
        official_splits: parts of the train/val/test protocol taken unchanged from the dataset.
        derived_splits: parts cut by `residual_lightning.data.splits.make_splits`.
        layout: expected files under ``root``.
        can_download: whether ``download=True`` can fetch the data (through torchvision).
        supports_skip: whether ``on_bad_image="skip"`` can drop anything (file-based loaders).
        notes: how the splits are made.
    """

    name: str
    class_names: tuple[str, ...] | None
    templates: tuple[str, ...]
    source_splits: tuple[str, ...]
    official_splits: tuple[str, ...]
    derived_splits: tuple[str, ...]
    layout: str
    can_download: bool
    supports_skip: bool
    notes: str
    reader: Callable[..., _Source] = field(repr=False, compare=False)
    has_official_files: Callable[[Path | None], bool] | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None where the data decides."""
        return None if self.class_names is None else len(self.class_names)

    @property
    def split_protocol(self) -> _splits.SplitProtocol:
        """How train/val/test are made (method.md §3)."""
        return _splits.get_split_protocol(self.name)

    def load(
        self,
        root: str | Path | None,
        split: str,
        transform: Callable | None = None,
        download: bool = False,
        *,
        image_size: int = 224,
        class_names_file: str | Path | None = None,
        templates_file: str | Path | None = None,
        on_bad_image: OnBadImage = "raise",
        check_threads: int = 8,
        **options: Any,
    ) -> ImageListDataset | ArrayImageDataset:
        """Load one source split.

        Args:
            root: data root (see `layout`); the CSV file for ``csv``; ignored by ``digits``.
            split: one of `source_splits`.
            transform: applied to each PIL RGB image; None returns PIL images.
            download: fetch missing files with torchvision where it can.
            image_size: side of the rendered images of ``digits`` (others are not resized here).
            class_names_file: YAML/text list of class names replacing the shipped/derived ones;
                its length must equal the number of classes (for ``csv``: cover the labels).
            templates_file: YAML/text list of templates replacing the shipped ones.
            on_bad_image: ``"raise"`` or ``"skip"`` (file-based loaders; see module docstring).
            check_threads: threads for the decoding pass of ``"skip"``.
            **options: loader options: ``partition`` (dtd, 1..10), ``include_val`` (dtd: add the
                official val list to source train, default True); ``path_column``,
                ``label_column``, ``delimiter`` (csv).

        Returns:
            A dataset of ``(image, label)`` with ``targets``, ``class_names``, ``templates``.
        """
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        if split not in self.source_splits:
            derived = (
                f" Parts {', '.join(self.derived_splits)} are derived: use load_split_datasets()."
                if self.derived_splits
                else ""
            )
            raise ValueError(
                f"{self.name} has no source split {split!r}; its source splits are {', '.join(self.source_splits)}.{derived}"
            )
        file_names = load_class_names_file(class_names_file) if class_names_file is not None else None
        templates = (
            load_templates_file(templates_file) if templates_file is not None else list(self.templates)
        )
        root_path = Path(root).expanduser() if root is not None else None
        src = self.reader(
            root_path, split, download=download, image_size=image_size, class_names=file_names, **options
        )
        names = src.class_names if src.class_names is not None else list(self.class_names or ())
        if file_names is not None and not src.names_from_file:
            if len(file_names) != len(names):
                raise ValueError(
                    f"Class-names file {class_names_file} has {len(file_names)} names, but the {self.name} "
                    f"data at {root_path} has {len(names)} classes"
                )
            names = file_names
        if len(src.labels) and (src.labels.min() < 0 or src.labels.max() >= len(names)):
            raise ValueError(
                f"{self.name}: labels span {src.labels.min()}..{src.labels.max()} but there are {len(names)} classes"
            )
        if src.images is not None:
            return ArrayImageDataset(
                src.images,
                src.labels,
                names,
                templates,
                transform,
                resize=src.resize,
                name=self.name,
                split=split,
            )
        return ImageListDataset(
            src.paths or [],
            src.labels,
            names,
            templates,
            transform,
            on_bad_image=on_bad_image,
            check_files=src.check_files,
            check_threads=check_threads,
            name=self.name,
            split=split,
        )


def _spec(
    name: str,
    reader: Callable[..., _Source],
    source_splits: tuple[str, ...],
    notes: str,
    *,
    fixed_classes: bool = True,
    file_based: bool = True,
    has_official_files: Callable[[Path | None], bool] | None = None,
) -> DatasetSpec:
    protocol = _splits.get_split_protocol(name)
    if protocol.kind == "holdout":
        official, derived = ("test",), ("train", "val")
    elif protocol.kind == "all":
        official, derived = (), ("train", "val", "test")
    else:
        official, derived = ("train", "val", "test"), ()
    return DatasetSpec(
        name=name,
        class_names=tuple(load_class_names(name)) if fixed_classes else None,
        templates=tuple(DATASET_TEMPLATES[name]),
        source_splits=source_splits,
        official_splits=official,
        derived_splits=derived,
        layout=_LAYOUTS[name],
        can_download=name in _DOWNLOADERS,
        supports_skip=file_based,
        notes=notes,
        reader=reader,
        has_official_files=has_official_files,
    )


_TT = ("train", "test")

DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        _spec("cifar10", _read_cifar10, _TT, "train -> 90/10 train/val; official test", file_based=False),
        _spec("cifar100", _read_cifar100, _TT, "train -> 90/10 train/val; official test", file_based=False),
        _spec("mnist", _read_mnist, _TT, "train -> 90/10 train/val; official test", file_based=False),
        _spec(
            "svhn",
            _read_svhn,
            _TT,
            "train -> 80/20 train/val; official test ('extra' unused)",
            file_based=False,
        ),
        _spec("gtsrb", _read_gtsrb, _TT, "train -> 90/10 train/val; official test"),
        _spec("dtd", _read_dtd, _TT, "official train+val (partition 1) -> 80/20 train/val; official test"),
        _spec("eurosat", _read_eurosat, ("all",), "no official split: all 27,000 images -> 80/10/10"),
        _spec(
            "resisc45",
            _read_resisc45,
            ("train", "val", "test", "all"),
            "official train/val/test split files; without them all images -> seeded 60/20/20",
            has_official_files=_resisc45_has_official,
        ),
        _spec("sun397", _read_sun397, ("all",), "no official split: all images -> 80/10/10"),
        _spec("stanford_cars", _read_stanford_cars, _TT, "train -> 80/20 train/val; official test"),
        _spec("food101", _read_food101, _TT, "train -> 90/10 train/val; official test"),
        _spec("flowers102", _read_flowers102, ("train", "val", "test"), "official train/val/test"),
        _spec(
            "imagenet", _read_imagenet, ("train", "val"), "train -> 80/20 train/val; official val is the test"
        ),
        _spec("imagefolder", _read_imagefolder, ("all",), "all images -> 80/10/10", fixed_classes=False),
        _spec("csv", _read_csv, ("all",), "all rows -> 80/10/10", fixed_classes=False),
        _spec("digits", _read_digits, ("all",), "all 1,797 images -> stratified 60/20/20", file_based=False),
    ]
}


def get_dataset_spec(name: str) -> DatasetSpec:
    """Look up a dataset by name.

    Args:
        name: registry key (case-insensitive; ``-`` reads as ``_``).

    Raises:
        ValueError: unknown name; the message lists the valid names and close matches.
    """
    key = name.strip().lower().replace("-", "_")
    if key in DATASETS:
        return DATASETS[key]
    close = difflib.get_close_matches(key, list(DATASETS), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"Unknown dataset {name!r}.{hint} Valid names: {', '.join(DATASETS)}")


def load_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    transform: Callable | None = None,
    download: bool = False,
    image_size: int = 224,
    class_names_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    **kw: Any,
) -> ImageListDataset | ArrayImageDataset:
    """Load a source split of a registry dataset; see `DatasetSpec.load` for every argument.

    Args:
        name: registry key, e.g. ``"cifar10"``.
        root: data root (layout in ``get_dataset_spec(name).layout``).
        split: a source split: ``train``/``val``/``test``/``all`` as the dataset has them.
        transform: applied to each PIL RGB image.
        download: fetch missing files with torchvision where possible.
        image_size: size of the rendered ``digits`` images.
        class_names_file: replacement class names (YAML list or one per line).
        templates_file: replacement prompt templates (YAML list or one per line).
        **kw: ``on_bad_image``, ``check_threads`` and loader options.

    Returns:
        A dataset of ``(transform(image), label)`` with ``targets``, ``class_names``, ``templates``.
    """
    return get_dataset_spec(name).load(
        root,
        split,
        transform,
        download,
        image_size=image_size,
        class_names_file=class_names_file,
        templates_file=templates_file,
        **kw,
    )


def load_split_datasets(
    name: str,
    root: str | Path | None,
    transform: Callable | None = None,
    *,
    seed: int = 42,
    fractions: Sequence[float] | None = None,
    shots: int | None = None,
    **kw: Any,
) -> dict[str, Dataset]:
    """Load the sources of a dataset and cut them into its train/val/test parts (method.md §3).

    Args:
        name: registry key.
        root: data root.
        transform: applied to each PIL RGB image.
        seed: seed of the stratified split and of few-shot sampling.
        fractions: override of the protocol's fractions (see `make_splits`).
        shots: if set, keep only this many training samples per class (drawn from train only).
        **kw: passed to `load_dataset` (``download``, ``image_size``, ``on_bad_image``, ...).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``, Subsets of the source datasets exposing
        ``targets``, ``class_names``, ``templates`` and ``source_indices``.

    Raises:
        ValueError: fewer than 2 classes, or a part that would be empty (see `make_splits`).
    """
    spec = get_dataset_spec(name)
    protocol = spec.split_protocol
    fallback = (
        protocol.kind == "official"
        and spec.has_official_files is not None
        and not spec.has_official_files(Path(root) if root is not None else None)
    )
    sources = _splits.split_sources(spec.name, fallback=fallback)
    loaded = {s: load_dataset(spec.name, root, s, transform, **kw) for s in dict.fromkeys(sources.values())}
    names = next(iter(loaded.values())).class_names
    if len(names) < 2:
        raise ValueError(
            f"{spec.name} at {root}: found {len(names)} class(es) {list(names)}; classification needs "
            "at least 2. "
            "For imagefolder: one sub-folder per class under root; for csv: at least 2 distinct labels "
            "(or a class_names_file naming every class)."
        )
    if protocol.kind == "official" and not fallback:
        idx = _splits.make_splits(
            spec.name, loaded["train"].targets, loaded["test"].targets, targets_val=loaded["val"].targets
        )
    elif protocol.kind == "holdout":
        idx = _splits.make_splits(
            spec.name,
            loaded["train"].targets,
            loaded[sources["test"]].targets,
            fractions=fractions,
            seed=seed,
        )
    else:
        idx = _splits.make_splits(spec.name, loaded["all"].targets, fractions=fractions, seed=seed)
    if shots is not None:
        train_source = loaded[sources["train"]]
        idx["train"] = _splits.few_shot(
            train_source.targets, idx["train"], shots, seed, train_source.class_names
        )
    return {part: _TargetSubset(loaded[sources[part]], idx[part]) for part in _splits.PARTS}

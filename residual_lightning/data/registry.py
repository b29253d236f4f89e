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

import csv
import difflib
import json
import pickle
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from residual_lightning.data import splits as _splits
from residual_lightning.data.templates import (
    DATASET_TEMPLATES,
    DTD_CLASSES,
    EUROSAT_FOLDER_NAMES,
    RESISC45_CLASSES,
    clean_class_name,
    load_class_names,
    load_class_names_file,
    load_templates_file,
    sun397_class_name,
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


@dataclass
class _Source:
    """What a reader found: files (or an array) and labels, plus class names read from the data."""

    labels: np.ndarray
    paths: list[Path] | None = None
    images: np.ndarray | None = None
    class_names: list[str] | None = None
    resize: int | None = None
    check_files: bool = False
    names_from_file: bool = False


# --------------------------------------------------------------------------------------------------
# Layouts and errors

_LAYOUTS = {
    "cifar10": "<root>/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch} (CIFAR's python pickles)",
    "cifar100": "<root>/cifar-100-python/{train, test} (CIFAR's python pickles)",
    "mnist": "<root>/MNIST/raw/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte} (uncompressed idx files)",
    "svhn": "<root>/{train_32x32.mat, test_32x32.mat} (SVHN cropped digits, format 2)",
    "gtsrb": "<root>/gtsrb/GTSRB/Training/<00000..00042>/*.ppm (train); <root>/gtsrb/GTSRB/Final_Test/Images/*.ppm "
    "and <root>/gtsrb/GT-final_test.csv (test)",
    "dtd": "<root>/dtd/dtd/images/<texture>/*.jpg and <root>/dtd/dtd/labels/{train,val,test}<partition>.txt",
    "eurosat": "<root>/eurosat/2750/<AnnualCrop|Forest|HerbaceousVegetation|...>/*.jpg (EuroSAT RGB)",
    "resisc45": "<root>/NWPU-RESISC45/<class>/<class>_NNN.jpg (45 class folders), and for the official split "
    "<root>/resisc45-{train,val,test}.txt (one image file name per line)",
    "sun397": "<root>/SUN397/ClassName.txt and <root>/SUN397/<letter>/<category>[/<subcategory>]/sun_*.jpg",
    "stanford_cars": "<root>/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/*.jpg, "
    "cars_test_annos_withlabels.mat, cars_test/*.jpg}",
    "food101": "<root>/food-101/{meta/train.json, meta/test.json, images/<class>/<id>.jpg}",
    "flowers102": "<root>/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}",
    "imagenet": "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG: 1000 WordNet-id folders in each "
    "(ILSVRC2012, validation images moved into class folders)",
    "imagefolder": "<root>/<class>/<image>: one folder per class, labels in sorted folder order",
    "csv": "a CSV file given as root, with a header row, an image-path column (relative to the CSV's folder or "
    "absolute) and a label column (int label or class name)",
    "digits": "no files: scikit-learn's bundled load_digits (1,797 8x8 images)",
}

_MANUAL = {
    "imagenet": "ImageNet cannot be downloaded automatically: get ILSVRC2012 from https://image-net.org, "
    "extract the train archives into <root>/train/<wnid>/ and sort the 50,000 validation images into "
    "<root>/val/<wnid>/ (e.g. with the widely used valprep.sh).",
    "stanford_cars": "Stanford Cars cannot be downloaded by torchvision any more (the original URL is gone): get "
    "the images, devkit and cars_test_annos_withlabels.mat from a mirror (e.g. Kaggle) and place them as "
    "shown.",
    "resisc45": "torchvision has no RESISC45: download NWPU-RESISC45 (e.g. from the authors' OneDrive or the "
    "torchgeo mirror) and extract it into <root>/NWPU-RESISC45/; for the official 60/20/20 split put "
    "resisc45-train.txt, resisc45-val.txt and resisc45-test.txt (torchgeo / TFDS split lists) in <root>.",
}


def _missing_error(name: str, root: Path | None, problem: str) -> FileNotFoundError:
    hint = _MANUAL.get(name) or (
        "Pass download=True to fetch it with torchvision." if name in _DOWNLOADERS else "Create it as shown."
    )
    return FileNotFoundError(f"{name}: {problem} (root: {root}). Expected layout: {_LAYOUTS[name]}. {hint}")


def _require_root(name: str, root: Path | None) -> Path:
    if root is None:
        raise ValueError(f"{name} needs a root directory. Expected layout: {_LAYOUTS[name]}")
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        raise _missing_error(name, root, f"data root {root} is missing or empty")
    return root


def _root_for(name: str, root: Path | None, download: bool) -> Path:
    """The root to read: must exist unless torchvision is about to download into it."""
    if root is None:
        raise ValueError(f"{name} needs a root directory. Expected layout: {_LAYOUTS[name]}")
    return root if download else _require_root(name, root)


def _ensure(
    name: str, root: Path, required: Sequence[Path], download: bool, fetch: Callable[[], Any] | None
) -> None:
    """Raise a layout error for the first missing path, after trying torchvision's download."""
    missing = [p for p in required if not p.exists()]
    if missing and download and fetch is not None:
        fetch()
        missing = [p for p in required if not p.exists()]
    if missing:
        _require_root(name, root)
        raise _missing_error(name, root, f"{missing[0]} not found")


def _list_images(folder: Path) -> list[Path]:
    """Image files under folder (recursive), sorted, hidden entries skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _loadmat(path: Path) -> dict[str, Any]:
    import scipy.io

    return scipy.io.loadmat(str(path), squeeze_me=True)


# --------------------------------------------------------------------------------------------------
# torchvision downloads (only called when download=True and files are missing)


def _tv(cls_name: str, root: Path, **kw: Any) -> Callable[[], Any]:
    def fetch() -> Any:
        import torchvision.datasets as tvd

        root.mkdir(parents=True, exist_ok=True)
        return getattr(tvd, cls_name)(str(root), download=True, **kw)

    return fetch


_DOWNLOADERS: dict[str, Callable[[Path, str], Callable[[], Any]]] = {
    "cifar10": lambda root, split: _tv("CIFAR10", root, train=split == "train"),
    "cifar100": lambda root, split: _tv("CIFAR100", root, train=split == "train"),
    "mnist": lambda root, split: _tv("MNIST", root, train=split == "train"),
    "svhn": lambda root, split: _tv("SVHN", root, split=split),
    "gtsrb": lambda root, split: _tv("GTSRB", root, split=split),
    "dtd": lambda root, split: _tv("DTD", root),
    "eurosat": lambda root, split: _tv("EuroSAT", root),
    "sun397": lambda root, split: _tv("SUN397", root),
    "food101": lambda root, split: _tv("Food101", root, split=split),
    "flowers102": lambda root, split: _tv("Flowers102", root, split=split),
}


def _fetcher(name: str, root: Path, split: str) -> Callable[[], Any] | None:
    make = _DOWNLOADERS.get(name)
    return make(root, split) if make else None


# --------------------------------------------------------------------------------------------------
# Readers: (root, split, download, image_size, class_names from a file, **options) -> _Source


def _read_cifar(
    name: str, root: Path | None, split: str, download: bool, folder: str, label_key: str
) -> _Source:
    root = _root_for(name, root, download)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        files = [split]  # cifar-100-python/{train,test}
    paths = [root / folder / f for f in files]
    _ensure(name, root, paths, download, _fetcher(name, root, split))
    images, labels = [], []
    for p in paths:
        with open(p, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    data = np.concatenate(images).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return _Source(labels=np.asarray(labels, np.int64), images=np.ascontiguousarray(data))


def _read_cifar10(root, split, *, download, image_size, class_names):
    return _read_cifar("cifar10", root, split, download, "cifar-10-batches-py", "labels")


def _read_cifar100(root, split, *, download, image_size, class_names):
    return _read_cifar("cifar100", root, split, download, "cifar-100-python", "fine_labels")


def _read_idx(path: Path) -> np.ndarray:
    """An uncompressed idx file (MNIST's format): big-endian header, then uint8 data."""
    data = path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an uncompressed uint8 idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape)


def _read_mnist(root, split, *, download, image_size, class_names):
    root = _root_for("mnist", root, download)
    prefix = "train" if split == "train" else "t10k"
    raw = root / "MNIST" / "raw"
    paths = [raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"]
    _ensure("mnist", root, paths, download, _fetcher("mnist", root, split))
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    return _Source(labels=labels.astype(np.int64), images=np.ascontiguousarray(images))


def _read_svhn(root, split, *, download, image_size, class_names):
    root = _root_for("svhn", root, download)
    path = root / f"{split}_32x32.mat"
    _ensure("svhn", root, [path], download, _fetcher("svhn", root, split))
    mat = _loadmat(path)
    images = np.ascontiguousarray(np.asarray(mat["X"], np.uint8).transpose(3, 0, 1, 2))  # (N, 32, 32, 3)
    labels = np.atleast_1d(np.asarray(mat["y"], np.int64)) % 10  # SVHN writes digit 0 as label 10
    return _Source(labels=labels, images=images)


def _read_gtsrb(root, split, *, download, image_size, class_names):
    root = _root_for("gtsrb", root, download)
    base = root / "gtsrb"
    if split == "train":
        folder = base / "GTSRB" / "Training"
        _ensure("gtsrb", root, [folder], download, _fetcher("gtsrb", root, split))
        paths, labels = [], []
        for d in _class_dirs(folder):
            if not d.name.isdigit():
                continue
            files = [p for p in _list_images(d) if p.suffix.lower() == ".ppm"]
            paths += files
            labels += [int(d.name)] * len(files)
    else:
        folder = base / "GTSRB" / "Final_Test" / "Images"
        table = base / "GT-final_test.csv"
        _ensure("gtsrb", root, [folder, table], download, _fetcher("gtsrb", root, split))
        with open(table, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter=";", skipinitialspace=True))
        paths = [folder / r["Filename"] for r in rows]
        labels = [int(r["ClassId"]) for r in rows]
    return _Source(labels=np.asarray(labels, np.int64), paths=paths)


def _read_dtd(
    root, split, *, download, image_size, class_names, partition: int = 1, include_val: bool = True
):
    """DTD source 'train' is the official train + val lists of the partition (the pool the 80/20
    split of method.md §3 cuts; ``include_val=False`` keeps the train list only); 'test' is its
    test list."""
    if not 1 <= int(partition) <= 10:
        raise ValueError(f"dtd partition must be in 1..10, got {partition}")
    root = _root_for("dtd", root, download)
    data = root / "dtd" / "dtd"
    names = (("train", "val") if include_val else ("train",)) if split == "train" else ("test",)
    lists = [data / "labels" / f"{s}{partition}.txt" for s in names]
    _ensure("dtd", root, [data / "images", *lists], download, _fetcher("dtd", root, split))
    index = {c: i for i, c in enumerate(DTD_CLASSES)}
    paths, labels = [], []
    for lst in lists:
        for line in lst.read_text().splitlines():
            if not line.strip():
                continue
            cls, fname = line.strip().split("/")
            if cls not in index:
                raise ValueError(f"dtd: unknown texture class {cls!r} in {lst}")
            paths.append(data / "images" / cls / fname)
            labels.append(index[cls])
    return _Source(labels=np.asarray(labels, np.int64), paths=paths)


def _read_eurosat(root, split, *, download, image_size, class_names):
    root = _root_for("eurosat", root, download)
    folder = root / "eurosat" / "2750"
    _ensure("eurosat", root, [folder], download, _fetcher("eurosat", root, split))
    order = sorted(EUROSAT_FOLDER_NAMES)  # torchvision's ImageFolder order
    paths, labels = [], []
    for d in _class_dirs(folder):
        if d.name not in EUROSAT_FOLDER_NAMES:
            raise ValueError(f"eurosat: unexpected class folder {d} (expected one of {order})")
        files = _list_images(d)
        paths += files
        labels += [order.index(d.name)] * len(files)
    return _Source(labels=np.asarray(labels, np.int64), paths=paths)


def _read_resisc45(root, split, *, download, image_size, class_names):
    root = _require_root("resisc45", root)
    folder = root / "NWPU-RESISC45"
    _ensure("resisc45", root, [folder], False, None)
    index = {c.replace(" ", "_"): i for i, c in enumerate(RESISC45_CLASSES)}
    paths, labels = [], []
    for d in _class_dirs(folder):
        if d.name not in index:
            raise ValueError(f"resisc45: unexpected class folder {d}")
        files = _list_images(d)
        paths += files
        labels += [index[d.name]] * len(files)
    if split != "all":
        split_file = root / f"resisc45-{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(
                f"resisc45: official split file {split_file} not found; {_MANUAL['resisc45']} "
                "Without split files load split='all' (make_splits then draws a seeded 60/20/20)."
            )
        wanted = {line.strip() for line in split_file.read_text().splitlines() if line.strip()}
        keep = [i for i, p in enumerate(paths) if p.name in wanted]
        if len(keep) != len(wanted):
            found = {paths[i].name for i in keep}
            absent = sorted(wanted - found)
            raise FileNotFoundError(
                f"resisc45: {len(absent)} image(s) listed in {split_file} are not under {folder}, e.g. {absent[:3]}"
            )
        paths = [paths[i] for i in keep]
        labels = [labels[i] for i in keep]
    return _Source(labels=np.asarray(labels, np.int64), paths=paths)


def _resisc45_has_official(root: Path | None) -> bool:
    return root is not None and all(
        (Path(root) / f"resisc45-{s}.txt").is_file() for s in ("train", "val", "test")
    )


def _read_sun397(root, split, *, download, image_size, class_names):
    root = _root_for("sun397", root, download)
    data = root / "SUN397"
    _ensure("sun397", root, [data / "ClassName.txt"], download, _fetcher("sun397", root, split))
    categories = [c.strip() for c in (data / "ClassName.txt").read_text().splitlines() if c.strip()]
    index = {c.strip("/"): i for i, c in enumerate(categories)}
    paths, labels = [], []
    for p in sorted(data.rglob("sun_*.jpg")):
        category = "/".join(p.relative_to(data).parts[:-1])
        if category not in index:
            raise ValueError(
                f"sun397: image {p} is in category {category!r}, which ClassName.txt does not list"
            )
        paths.append(p)
        labels.append(index[category])
    names = [sun397_class_name(c) for c in categories]  # derived from the data's own class list
    return _Source(labels=np.asarray(labels, np.int64), paths=paths, class_names=names)


def _read_stanford_cars(root, split, *, download, image_size, class_names):
    root = _require_root("stanford_cars", root)
    base = root / "stanford_cars"
    if split == "train":
        annotations, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        annotations, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
    _ensure("stanford_cars", root, [base / "devkit", annotations, images], False, None)
    records = np.atleast_1d(_loadmat(annotations)["annotations"])
    paths = [images / str(r["fname"]) for r in records]
    labels = [int(r["class"]) - 1 for r in records]  # the .mat labels start at 1
    return _Source(labels=np.asarray(labels, np.int64), paths=paths)


def _read_food101(root, split, *, download, image_size, class_names):
    root = _root_for("food101", root, download)
    base = root / "food-101"
    meta = base / "meta" / f"{split}.json"
    _ensure("food101", root, [meta, base / "images"], download, _fetcher("food101", root, split))
    index = {n: i for i, n in enumerate(load_class_names("food101"))}
    paths, labels = [], []
    for folder, rel_paths in json.loads(meta.read_text()).items():
        name = clean_class_name(folder)
        if name not in index:
            raise ValueError(f"food101: unknown class {folder!r} in {meta}")
        paths += [base / "images" / f"{rel}.jpg" for rel in rel_paths]
        labels += [index[name]] * len(rel_paths)
    return _Source(labels=np.asarray(labels, np.int64), paths=paths)


def _read_flowers102(root, split, *, download, image_size, class_names):
    root = _root_for("flowers102", root, download)
    base = root / "flowers-102"
    required = [base / "jpg", base / "imagelabels.mat", base / "setid.mat"]
    _ensure("flowers102", root, required, download, _fetcher("flowers102", root, split))
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
    ids = np.atleast_1d(_loadmat(base / "setid.mat")[key]).astype(np.int64)
    all_labels = np.atleast_1d(_loadmat(base / "imagelabels.mat")["labels"]).astype(np.int64) - 1  # 1-based
    paths = [base / "jpg" / f"image_{i:05d}.jpg" for i in ids]
    return _Source(labels=all_labels[ids - 1], paths=paths)


def _read_imagenet(root, split, *, download, image_size, class_names):
    root = _require_root("imagenet", root)
    folder = root / split
    _ensure("imagenet", root, [folder], False, None)
    dirs = _class_dirs(folder)
    if len(dirs) != 1000:
        raise ValueError(
            f"imagenet: {folder} has {len(dirs)} class folders, expected 1000. Expected layout: {_LAYOUTS['imagenet']}"
        )
    paths, labels = [], []
    for label, d in enumerate(dirs):
        files = _list_images(d)
        paths += files
        labels += [label] * len(files)
    return _Source(labels=np.asarray(labels, np.int64), paths=paths)


def _read_imagefolder(root, split, *, download, image_size, class_names):
    root = _require_root("imagefolder", root)
    if not root.is_dir():
        raise NotADirectoryError(
            f"imagefolder: root {root} is not a directory. Expected layout: {_LAYOUTS['imagefolder']}"
        )
    dirs = _class_dirs(root)
    if not dirs:
        raise _missing_error("imagefolder", root, f"no class folders in {root}")
    paths, labels = [], []
    for label, d in enumerate(dirs):
        files = _list_images(d)
        if not files:
            raise FileNotFoundError(
                f"imagefolder: class folder {d} (class {d.name!r}) holds no images "
                f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += files
        labels += [label] * len(files)
    return _Source(
        labels=np.asarray(labels, np.int64), paths=paths, class_names=[clean_class_name(d.name) for d in dirs]
    )


_PATH_COLUMNS = ("path", "image", "image_path", "filepath", "file", "filename")
_LABEL_COLUMNS = ("label", "class", "target", "y", "class_name")


def _read_csv(
    root,
    split,
    *,
    download,
    image_size,
    class_names,
    path_column: str | None = None,
    label_column: str | None = None,
    delimiter: str = ",",
):
    if root is None:
        raise ValueError(f"csv needs root = the CSV file. Expected: {_LAYOUTS['csv']}")
    if not root.is_file():
        raise _missing_error("csv", root, f"CSV file {root} not found")
    with open(root, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]

    def pick(given: str | None, candidates: tuple[str, ...], what: str) -> str:
        if given is not None:
            if given not in columns:
                raise ValueError(f"CSV {root}: no {what} column {given!r}; columns: {columns}")
            return given
        for c in candidates:
            if c in columns:
                return c
        raise ValueError(
            f"CSV {root}: no {what} column; name one of {list(candidates)} or pass it; columns: {columns}"
        )

    pcol = pick(path_column, _PATH_COLUMNS, "image-path")
    lcol = pick(label_column, _LABEL_COLUMNS, "label")
    if not rows:
        raise ValueError(f"CSV {root} has no data rows")
    raw_labels = [r[lcol] for r in rows]
    if all(re.fullmatch(r"\d+", x) for x in raw_labels):
        labels = np.asarray([int(x) for x in raw_labels], np.int64)
        n_data = int(labels.max()) + 1
        if class_names is not None and n_data > len(class_names):
            raise ValueError(
                f"CSV {root}: labels go up to {n_data - 1} ({n_data} classes) but the class-names file "
                f"has {len(class_names)} names"
            )
        names = list(class_names) if class_names is not None else [str(i) for i in range(n_data)]
    else:
        distinct = sorted(set(raw_labels))
        if class_names is not None:
            index = {n: i for i, n in enumerate(class_names)}
            unknown = [x for x in distinct if x not in index]
            if unknown:
                raise ValueError(
                    f"CSV {root}: {len(distinct)} distinct labels, {len(unknown)} of them not among the "
                    f"{len(class_names)} names of the class-names file, e.g. {unknown[:3]}"
                )
            names = list(class_names)
        else:
            index = {n: i for i, n in enumerate(distinct)}
            names = [clean_class_name(n) for n in distinct]
        labels = np.asarray([index[x] for x in raw_labels], np.int64)
    base = root.parent
    paths = [Path(r[pcol]) if Path(r[pcol]).is_absolute() else base / r[pcol] for r in rows]
    return _Source(
        labels=labels,
        paths=paths,
        class_names=names,
        check_files=True,
        names_from_file=class_names is not None,
    )


def _read_digits(root, split, *, download, image_size, class_names):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8), ink = white
    return _Source(labels=np.asarray(bunch.target, np.int64), images=images, resize=int(image_size))


# --------------------------------------------------------------------------------------------------
# Specs


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

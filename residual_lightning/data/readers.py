"""Per-dataset readers of torchvision's on-disk layouts (and of folders, CSVs and digits).

Each `_read_<name>(root, split, *, download, image_size, class_names)` lists (path, label) pairs or reads
the array files directly and returns an `ImageListDataset` or `ArrayImageDataset`; torchvision is
used only to download missing files. Layout descriptions, missing-file errors and the downloads
live in `residual_lightning.data.layouts`.
"""

from __future__ import annotations

import csv
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from residual_lightning.data.images import IMAGE_EXTENSIONS
from residual_lightning.data.layouts import (
    _LAYOUTS,
    _MANUAL,
    _ensure,
    _fetcher,
    _missing_error,
    _require_root,
    _root_for,
)
from residual_lightning.data.templates import (
    DTD_CLASSES,
    EUROSAT_FOLDER_NAMES,
    RESISC45_CLASSES,
    check_shipped_class_names,
    clean_class_name,
    load_class_names,
    sun397_class_name,
)


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
# Readers: (root, split, download, image_size, class_names from a file, **options) -> _Source


def _read_cifar(
    name: str, root: Path | None, split: str, download: bool, folder: str, label_key: str, check_names: bool
) -> _Source:
    root = _root_for(name, root, download)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        files = [split]  # cifar-100-python/{train,test}
    paths = [root / folder / f for f in files]
    _ensure(name, root, paths, download, _fetcher(name, root, split))
    meta, key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    if check_names and (root / folder / meta).is_file():  # the labels index this list
        with open(root / folder / meta, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        if not isinstance(entry, dict) or key not in entry:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{name}: {root / folder / meta} has no {key!r} list (found: {found})")
        check_shipped_class_names(name, list(entry[key]), root / folder / meta)
    images, labels = [], []
    for p in paths:
        with open(p, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    data = np.concatenate(images).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return _Source(labels=np.asarray(labels, np.int64), images=np.ascontiguousarray(data))


def _read_cifar10(root, split, *, download, image_size, class_names):
    return _read_cifar("cifar10", root, split, download, "cifar-10-batches-py", "labels", class_names is None)


def _read_cifar100(root, split, *, download, image_size, class_names):
    return _read_cifar(
        "cifar100", root, split, download, "cifar-100-python", "fine_labels", class_names is None
    )


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
    meta = base / "devkit" / "cars_meta.mat"
    if class_names is None and meta.is_file():  # the labels index this list
        mat = _loadmat(meta)
        if "class_names" not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise ValueError(f"stanford_cars: {meta} has no 'class_names' variable (found: {found})")
        check_shipped_class_names(
            "stanford_cars", [str(n) for n in np.atleast_1d(mat["class_names"])], meta, clean=False
        )
    records = np.atleast_1d(_loadmat(annotations)["annotations"])
    paths = [images / str(r["fname"]) for r in records]
    labels = [int(r["class"]) - 1 for r in records]  # the .mat labels start at 1
    return _Source(labels=np.asarray(labels, np.int64), paths=paths)


def _read_food101(root, split, *, download, image_size, class_names):
    root = _root_for("food101", root, download)
    base = root / "food-101"
    meta = base / "meta" / f"{split}.json"
    _ensure("food101", root, [meta, base / "images"], download, _fetcher("food101", root, split))
    classes = base / "meta" / "classes.txt"
    if class_names is None and classes.is_file():
        check_shipped_class_names(
            "food101",
            [c.strip() for c in classes.read_text(encoding="utf-8").splitlines() if c.strip()],
            classes,
        )
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


def _read_digits(root, split, *, download, image_size, class_names):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8), ink = white
    return _Source(labels=np.asarray(bunch.target, np.int64), images=images, resize=int(image_size))


# --------------------------------------------------------------------------------------------------
# Specs

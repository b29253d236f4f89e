"""Fakes of the datasets' on-disk files for the data-layer tests, and checks of a loaded dataset.

Fake roots are in the layout torchvision expects (its own classes read them in the reader tests);
class names a real dataset's files hold are typed into ``resources/`` beside this file (never derived
from the shipped lists, which they check).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

EXPECTED_CLASSES = {
    "cifar10": 10,
    "cifar100": 100,
    "mnist": 10,
    "svhn": 10,
    "gtsrb": 43,
    "dtd": 47,
    "eurosat": 10,
    "resisc45": 45,
    "sun397": 397,
    "stanford_cars": 196,
    "food101": 101,
    "flowers102": 102,
    "imagenet": 1000,
    "digits": 10,
}


DATA = Path(__file__).parent / "resources"


def real_names(filename: str) -> list[str]:
    """Class names as a real dataset's own file lists them, in its order: typed from the dataset
    into ``tests/data/resources/`` (never derived from the shipped lists, which they check)."""
    return (DATA / filename).read_text(encoding="utf-8").splitlines()


def colour(i: int) -> tuple[int, int, int]:
    """A distinct solid colour per index, so images identify their sample."""
    return (i * 37 + 11) % 256, (i * 91 + 23) % 256, (i * 53 + 47) % 256


def write_image(path, i: int, fmt: str | None = None, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour(i)).save(path, format=fmt)


def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour(i)).save(buf, format=fmt)
    return buf.getvalue()


def pairs(ds) -> list[tuple[int, bytes]]:
    """(label, RGB pixels) of every sample, sorted: order-free comparison of two datasets."""
    out = []
    for i in range(len(ds)):
        img, label = ds[i]
        out.append((int(label), np.asarray(img.convert("RGB")).tobytes()))
    return sorted(out)


def check_dataset(ds, name: str) -> None:
    """Invariants every loaded dataset must satisfy."""
    assert len(ds.targets) == len(ds) > 0
    assert ds.targets.dtype == np.int64
    assert len(ds.class_names) == EXPECTED_CLASSES.get(name, len(ds.class_names))
    assert 0 <= ds.targets.min() and ds.targets.max() < len(ds.class_names)
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert label == ds.targets[0]
    assert all("{}" in t for t in ds.templates)


def write_tinted_image(path, i: int) -> None:
    """An 8x8 image of a colour set by i (the CSV and split-part tests' images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (i * 40 % 256, 90, 200)).save(path)


def cifar_batch(rng, n, label_key, num_classes):
    return {
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, n).tolist(),
    }


def cifar100_root(tmp_path, fine_label_names):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    train = cifar_batch(rng, 4, "fine_labels", 100)
    train["data"][0] = np.repeat(np.array([255, 0, 7], np.uint8), 1024)  # planar R, G, B
    (base / "train").write_bytes(pickle.dumps(train))
    (base / "test").write_bytes(pickle.dumps(cifar_batch(rng, 2, "fine_labels", 100)))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": fine_label_names}))
    return tmp_path


def mat_records(fnames, classes):
    records = np.zeros(len(fnames), dtype=[("fname", object), ("class", object)])
    for r, (f, c) in enumerate(zip(fnames, classes)):
        records[r] = (f, np.uint8(c))
    return {"annotations": records}


def stanford_cars_root(tmp_path, class_names):
    """cars_meta.mat with `class_names`, 3 train and 2 test images with their annotations."""
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(class_names, dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names.reshape(1, -1)})
    for folder, mat, classes in (
        ("cars_train", base / "devkit" / "cars_train_annos.mat", [1, 196, 5]),
        ("cars_test", base / "cars_test_annos_withlabels.mat", [7, 2]),
    ):
        fnames = [f"{k + 1:05d}.jpg" for k in range(len(classes))]
        for k, f in enumerate(fnames):
            write_image(base / folder / f, 10 * len(classes) + k)
        scipy.io.savemat(mat, mat_records(fnames, classes))
    return tmp_path


def food101_root(tmp_path, classes_txt):
    """meta/classes.txt from `classes_txt`; one image per real class, every 25th also in test."""
    base = tmp_path / "food-101"
    train, test = {}, {}
    for i, folder in enumerate(real_names("food101_classes.txt")):
        write_image(base / "images" / folder / f"{i}.jpg", i)
        train[folder] = [f"{folder}/{i}"]
        if i % 25 == 0:
            test[folder] = [f"{folder}/{i}"]
    (base / "meta").mkdir()
    (base / "meta" / "train.json").write_text(json.dumps(train))
    (base / "meta" / "test.json").write_text(json.dumps(test))
    (base / "meta" / "classes.txt").write_text("\n".join(classes_txt) + "\n")
    return tmp_path

"""Where each dataset's files go: layout descriptions, missing-file errors, torchvision downloads.

`_LAYOUTS` describes each registry dataset's on-disk layout (torchvision's, where it has one) for
error messages; `_MANUAL` says where to get the datasets torchvision cannot download. The readers
(`residual_lightning.data.readers`, `csv_reader`) check their files with `_ensure`, which asks
torchvision to download missing files (only with ``download=True``) before naming the first one
still missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------
# Layouts and errors

_LAYOUTS = {
    "cifar10": "<root>/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch} (CIFAR's python pickles)",
    "cifar100": "<root>/cifar-100-python/{train, test, meta} (CIFAR's python pickles)",
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
    "food101": "<root>/food-101/{meta/train.json, meta/test.json, meta/classes.txt, images/<class>/<id>.jpg}",
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


# --------------------------------------------------------------------------------------------------
# torchvision downloads (only called when download=True and files are missing)


class DatasetDownloadError(RuntimeError):
    """torchvision could not download a dataset (offline, server down, corrupt archive)."""


def _download_error(name: str, cls_name: str, root: Path, err: BaseException) -> DatasetDownloadError:
    return DatasetDownloadError(
        f"{name}: torchvision.datasets.{cls_name} could not download the data into {root}: "
        f"{type(err).__name__}: {err}. The machine may be offline or the server unreachable. Download "
        f"the files elsewhere (e.g. torchvision.datasets.{cls_name}(root, download=True) on a "
        f"connected machine), copy them into {root} (remove any partial download there first) so "
        f"that it reads {_LAYOUTS[name]}, and run again with --data.root {root} "
        "--data.download false."
    )


def _tv(name: str, cls_name: str, root: Path, **kw: Any) -> Callable[[], Any]:
    def fetch() -> Any:
        import torchvision.datasets as tvd

        root.mkdir(parents=True, exist_ok=True)
        try:
            return getattr(tvd, cls_name)(str(root), download=True, **kw)
        except (OSError, RuntimeError) as err:  # URLError, ConnectionError, timeouts; bad md5
            raise _download_error(name, cls_name, root, err) from err

    return fetch


_DOWNLOADERS: dict[str, Callable[[Path, str], Callable[[], Any]]] = {
    "cifar10": lambda root, split: _tv("cifar10", "CIFAR10", root, train=split == "train"),
    "cifar100": lambda root, split: _tv("cifar100", "CIFAR100", root, train=split == "train"),
    "mnist": lambda root, split: _tv("mnist", "MNIST", root, train=split == "train"),
    "svhn": lambda root, split: _tv("svhn", "SVHN", root, split=split),
    "gtsrb": lambda root, split: _tv("gtsrb", "GTSRB", root, split=split),
    "dtd": lambda root, split: _tv("dtd", "DTD", root),
    "eurosat": lambda root, split: _tv("eurosat", "EuroSAT", root),
    "sun397": lambda root, split: _tv("sun397", "SUN397", root),
    "food101": lambda root, split: _tv("food101", "Food101", root, split=split),
    "flowers102": lambda root, split: _tv("flowers102", "Flowers102", root, split=split),
}


def _fetcher(name: str, root: Path, split: str) -> Callable[[], Any] | None:
    make = _DOWNLOADERS.get(name)
    return make(root, split) if make else None

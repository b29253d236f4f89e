"""Dataset registry, loaders and prompt lists, tested offline on tiny fake roots.

Each torchvision-backed loader is checked against torchvision's own class reading the same fake
files (its md5 checks patched out where it has them), so the fakes are in the layout torchvision
expects and our labels/pixels agree with it. Nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets as tvd
from PIL import Image

from residual_lightning.data import registry
from residual_lightning.data.registry import (
    DATASETS,
    BadImageError,
    get_dataset_spec,
    load_dataset,
    load_split_datasets,
)
from residual_lightning.data.splits import PARTS
from residual_lightning.data.templates import (
    DATASET_TEMPLATES,
    DTD_CLASSES,
    EUROSAT_FOLDER_NAMES,
    RESISC45_CLASSES,
    load_class_names,
    load_class_names_file,
    load_templates_file,
    sun397_class_name,
)

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


# ---------------------------------------------------------------------------------------------
# helpers

DATA = Path(__file__).parent / "resources"


def real_names(filename: str) -> list[str]:
    """Class names as a real dataset's own file lists them, in its order: typed from the dataset
    into ``tests/resources/`` (never derived from the shipped lists, which they check)."""
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


# ---------------------------------------------------------------------------------------------
# class names and templates


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_class_names_and_templates(name):
    spec = get_dataset_spec(name)
    assert spec.num_classes == EXPECTED_CLASSES[name]
    assert list(spec.class_names) == load_class_names(name)
    assert all(isinstance(n, str) and n.strip() == n and n for n in spec.class_names)
    assert spec.templates and all(t.count("{}") == 1 for t in spec.templates)
    assert all(t.format("x") != t for t in spec.templates)


def test_every_dataset_has_templates_and_protocol():
    assert set(DATASET_TEMPLATES) == set(DATASETS)
    for spec in DATASETS.values():
        assert set(spec.official_splits).isdisjoint(spec.derived_splits)
        assert set(spec.official_splits) | set(spec.derived_splits) == set(PARTS)
        # every source the protocol draws from is loadable
        assert set(spec.split_protocol.sources.values()) <= set(spec.source_splits)


def test_known_names_in_label_order():
    assert load_class_names("cifar10")[:2] == ["airplane", "automobile"]
    assert load_class_names("cifar100")[1] == "aquarium fish" and load_class_names("cifar100")[-1] == "worm"
    assert load_class_names("gtsrb")[14] == "stop"
    assert load_class_names("eurosat")[0] == "annual crop land"  # torchvision's sorted folder order
    assert load_class_names("eurosat")[-1] == "lake or sea"  # SeaLake
    assert load_class_names("resisc45")[-1] == "wetland"
    assert load_class_names("imagenet")[0] == "tench" and load_class_names("imagenet")[-1] == "toilet paper"
    assert load_class_names("food101")[0] == "apple pie"
    assert load_class_names("flowers102")[0] == "pink primrose"
    assert load_class_names("stanford_cars")[0] == "AM General Hummer SUV 2000"
    assert load_class_names("svhn") == [str(i) for i in range(10)]
    assert len(DATASET_TEMPLATES["imagenet"]) == 80 and len(DATASET_TEMPLATES["cifar10"]) == 18


def test_load_class_names_unknown():
    with pytest.raises(ValueError, match="imagefolder"):
        load_class_names("imagefolder")


def test_sun397_static_names_match_cleaning():
    names = load_class_names("sun397")
    assert names == sorted(names) and len(set(names)) == 397
    assert sun397_class_name("/b/balcony/exterior") == "balcony exterior"
    assert sun397_class_name("car_interior/backseat") == "car interior backseat"  # torchvision's form
    for category in (
        "/a/abbey",
        "/t/theater/indoor_procenium",
        "/b/batters_box",
        "/w/wine_cellar/barrel_storage",
    ):
        assert sun397_class_name(category) in names


def test_templates_file_formats(tmp_path):
    yml = tmp_path / "t.yaml"
    yml.write_text("- 'a photo of a {}.'\n- 'art of the {}.'\n")
    assert load_templates_file(yml) == ["a photo of a {}.", "art of the {}."]
    txt = tmp_path / "t.txt"
    txt.write_text("# comment\na photo of a {}.\n\n  a sketch of a {}.  \n")
    assert load_templates_file(txt) == ["a photo of a {}.", "a sketch of a {}."]
    names = tmp_path / "n.yml"
    names.write_text("[cat, dog]\n")
    assert load_class_names_file(names) == ["cat", "dog"]


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        (None, ".txt", "not found"),
        ("\n# only a comment\n", ".txt", "empty"),
        ("[]", ".yaml", "empty"),
        ("a photo of a {}.\na photo without placeholder\n", ".txt", "placeholder"),
        ("a {} and a {}\n", ".txt", "exactly one"),
        ("key: value\n", ".yaml", "YAML list"),
    ],
)
def test_templates_file_errors_name_the_file(tmp_path, content, suffix, match):
    path = tmp_path / f"templates{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=match) as err:
        load_templates_file(path)
    assert str(path) in str(err.value)


def test_class_names_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="names.txt"):
        load_class_names_file(tmp_path / "names.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        load_class_names_file(tmp_path / "empty.txt")


# ---------------------------------------------------------------------------------------------
# registry lookups and missing data


def test_unknown_name_lists_valid_and_close_match():
    with pytest.raises(ValueError) as err:
        get_dataset_spec("cifar-1O")
    msg = str(err.value)
    assert "'cifar10'" in msg and "Did you mean" in msg
    assert all(n in msg for n in DATASETS)
    assert get_dataset_spec("Stanford-Cars").name == "stanford_cars"


@pytest.mark.parametrize("name", sorted(set(DATASETS) - {"digits", "csv"}))
def test_missing_root_names_path_and_layout(tmp_path, name):
    root = tmp_path / "nowhere"
    split = get_dataset_spec(name).source_splits[0]
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root, split)
    assert str(root) in str(err.value) and "Expected layout" in str(err.value)
    root.mkdir()  # empty root: same
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        load_dataset(name, root, split)


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("imagenet", "image-net.org"),
        ("stanford_cars", "cars_test_annos_withlabels.mat"),
        ("resisc45", "resisc45-train.txt"),
    ],
)
def test_no_torchvision_download_says_where_files_go(tmp_path, name, where):
    spec = get_dataset_spec(name)
    assert not spec.can_download
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, tmp_path / "x", spec.source_splits[0], download=True)
    msg = str(err.value)
    assert "cannot be downloaded" in msg or "has no RESISC45" in msg
    assert where in msg and str(tmp_path / "x") in msg


def test_download_goes_through_torchvision_only_when_files_are_missing(tmp_path, monkeypatch):
    calls = []

    def fake_eurosat(root, download=False, **kw):  # stands in for torchvision's downloader
        calls.append((root, download))
        for i, folder in enumerate(sorted(EUROSAT_FOLDER_NAMES)):
            write_image(tmp_path / "eurosat" / "2750" / folder / "1.jpg", i)

    monkeypatch.setattr(tvd, "EuroSAT", fake_eurosat)
    with pytest.raises(FileNotFoundError):
        load_dataset("eurosat", tmp_path, "all")  # download=False never fetches
    assert calls == []
    assert len(load_dataset("eurosat", tmp_path, "all", download=True)) == 10
    assert calls == [(str(tmp_path), True)]
    load_dataset("eurosat", tmp_path, "all", download=True)  # files present: no second fetch
    assert len(calls) == 1


def test_bad_split_is_explained(tmp_path):
    with pytest.raises(ValueError, match="derived"):
        load_dataset("eurosat", tmp_path, "train")
    with pytest.raises(ValueError, match="source splits are train, test"):
        load_dataset("cifar10", tmp_path, "val")


# ---------------------------------------------------------------------------------------------
# array-backed loaders (cifar, mnist, svhn, digits)


@pytest.fixture
def no_md5(monkeypatch):
    """Let torchvision's classes read our fakes: their md5 checks cannot pass on made-up files."""
    for module in (tvd.cifar, tvd.svhn, tvd.flowers102):
        monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)


def _cifar_batch(rng, n, label_key, num_classes):
    return {
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, n).tolist(),
    }


def test_cifar10_matches_torchvision(tmp_path, no_md5):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / f).write_bytes(pickle.dumps(_cifar_batch(rng, 3, "labels", 10)))
    label_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": label_names}))
    for split in ("train", "test"):
        ds = load_dataset("cifar10", tmp_path, split)
        check_dataset(ds, "cifar10")
        tv = tvd.CIFAR10(str(tmp_path), train=split == "train")
        assert len(ds) == len(tv) == (15 if split == "train" else 3)
        np.testing.assert_array_equal(ds.targets, tv.targets)
        for i in range(len(ds)):
            assert np.array_equal(np.asarray(ds[i][0]), np.asarray(tv[i][0]))


def _cifar100_root(tmp_path, fine_label_names):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    train = _cifar_batch(rng, 4, "fine_labels", 100)
    train["data"][0] = np.repeat(np.array([255, 0, 7], np.uint8), 1024)  # planar R, G, B
    (base / "train").write_bytes(pickle.dumps(train))
    (base / "test").write_bytes(pickle.dumps(_cifar_batch(rng, 2, "fine_labels", 100)))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": fine_label_names}))
    return tmp_path


def test_cifar100_channel_layout(tmp_path, no_md5):
    _cifar100_root(tmp_path, real_names("cifar100_fine_label_names.txt"))
    ds = load_dataset("cifar100", tmp_path, "train")
    check_dataset(ds, "cifar100")
    assert ds[0][0].getpixel((5, 9)) == (255, 0, 7)
    np.testing.assert_array_equal(ds.targets, tvd.CIFAR100(str(tmp_path), train=True).targets)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_mnist_matches_torchvision(tmp_path):
    rng = np.random.default_rng(2)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 6), ("t10k", 4)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n)))
    for split in ("train", "test"):
        ds = load_dataset("mnist", tmp_path, split, transform=np.asarray)
        tv = tvd.MNIST(str(tmp_path), train=split == "train")
        np.testing.assert_array_equal(ds.targets, tv.targets.numpy())
        img = ds[1][0]
        assert img.shape == (28, 28, 3)
        np.testing.assert_array_equal(img[..., 0], tv.data[1].numpy())
    check_dataset(load_dataset("mnist", tmp_path, "train"), "mnist")


def test_svhn_matches_torchvision_and_maps_10_to_0(tmp_path, no_md5):
    rng = np.random.default_rng(3)
    for split, n in (("train", 5), ("test", 3)):
        y = np.array([[10], [1], [2], [10], [9]][:n], np.uint8)
        scipy.io.savemat(
            tmp_path / f"{split}_32x32.mat",
            {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y},
        )
    ds = load_dataset("svhn", tmp_path, "train")
    check_dataset(ds, "svhn")
    assert ds.targets.tolist() == [0, 1, 2, 0, 9]
    tv = tvd.SVHN(str(tmp_path), split="train")
    np.testing.assert_array_equal(ds.targets, tv.labels)
    assert pairs(ds) == pairs(tv)


def test_digits_offline():
    ds = load_dataset("digits", None, "all", image_size=64)
    assert len(ds) == len(ds.targets) == 1797
    img, label = ds[5]
    assert img.mode == "RGB" and img.size == (64, 64)
    assert label == ds.targets[5] == 5
    arr = np.asarray(img)
    assert arr.max() > 200 and arr.min() < 30  # rendered ink on background, not a blank image
    assert np.bincount(ds.targets).min() >= 170
    small = load_dataset("digits", None, "all", image_size=8)
    assert small[0][0].size == (8, 8)
    assert ds.num_skipped == 0


# ---------------------------------------------------------------------------------------------
# file-based torchvision layouts


def test_gtsrb_matches_torchvision(tmp_path):
    base = tmp_path / "gtsrb"
    for c in range(43):
        write_image(base / "GTSRB" / "Training" / f"{c:05d}" / f"00000_0000{c % 3}.ppm", c, "PPM")
        (base / "GTSRB" / "Training" / f"{c:05d}" / f"GT-{c:05d}.csv").write_text("ignored")
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate((3, 42, 0)):
        write_image(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", 100 + i, "PPM")
        rows.append(f"{i:05d}.ppm;8;8;0;0;7;7;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    train = load_dataset("gtsrb", tmp_path, "train")
    check_dataset(train, "gtsrb")
    assert train.targets.tolist() == list(range(43))
    assert pairs(train) == pairs(tvd.GTSRB(str(tmp_path), split="train"))
    test = load_dataset("gtsrb", tmp_path, "test")
    assert test.targets.tolist() == [3, 42, 0]
    assert pairs(test) == pairs(tvd.GTSRB(str(tmp_path), split="test"))


def test_dtd_matches_torchvision(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    lines = []
    for i, cls in enumerate(DTD_CLASSES):
        write_image(data / "images" / cls / f"{cls}_0001.jpg", i)
        lines.append(f"{cls}/{cls}_0001.jpg")
    (data / "labels").mkdir(parents=True)
    (data / "labels" / "train1.txt").write_text("\n".join(lines) + "\n")
    (data / "labels" / "val1.txt").write_text("\n".join(lines[::-1][:47]) + "\n")
    (data / "labels" / "test1.txt").write_text("\n".join(lines[::-1]) + "\n")
    (data / "labels" / "test2.txt").write_text("\n".join(lines[::2]) + "\n")
    train = load_dataset("dtd", tmp_path, "train")  # official train + val
    check_dataset(train, "dtd")
    assert len(train) == 94
    tv_train, tv_val = tvd.DTD(str(tmp_path), split="train"), tvd.DTD(str(tmp_path), split="val")
    assert pairs(train) == sorted(pairs(tv_train) + pairs(tv_val))
    test = load_dataset("dtd", tmp_path, "test")
    assert pairs(test) == pairs(tvd.DTD(str(tmp_path), split="test"))
    # A list naming only some classes keeps the 47-class label order (torchvision would renumber).
    half = load_dataset("dtd", tmp_path, "test", partition=2)
    assert half.targets.tolist() == list(range(0, 47, 2))
    with pytest.raises(FileNotFoundError, match="train2.txt"):
        load_dataset("dtd", tmp_path, "train", partition=2)
    assert len(load_dataset("dtd", tmp_path, "train", include_val=False)) == 47


def test_eurosat_matches_torchvision(tmp_path):
    folders = sorted(EUROSAT_FOLDER_NAMES)
    for i, folder in enumerate(folders):
        for k in range(2):
            write_image(tmp_path / "eurosat" / "2750" / folder / f"{folder}_{k + 1}.jpg", 2 * i + k)
    ds = load_dataset("eurosat", tmp_path, "all")
    check_dataset(ds, "eurosat")
    assert ds.class_names[ds.targets[0]] == "annual crop land"
    assert pairs(ds) == pairs(tvd.EuroSAT(str(tmp_path)))
    with pytest.raises(ValueError, match="derived"):
        load_dataset("eurosat", tmp_path, "test")


def test_sun397_matches_torchvision_and_derives_names(tmp_path):
    data = tmp_path / "SUN397"
    categories = ["/a/abbey", "/b/balcony/exterior", "/b/balcony/interior", "/c/car_interior/backseat"]
    (data).mkdir()
    (data / "ClassName.txt").write_text("\n".join(categories) + "\n")
    for i, cat in enumerate(categories):
        for k in range(2):
            write_image(data / cat.strip("/") / f"sun_{i}{k}abc.jpg", 2 * i + k)
    ds = load_dataset("sun397", tmp_path, "all")
    assert ds.class_names == ["abbey", "balcony exterior", "balcony interior", "car interior backseat"]
    assert set(ds.class_names) <= set(load_class_names("sun397"))
    assert sorted(ds.targets.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert pairs(ds) == pairs(tvd.SUN397(str(tmp_path)))


def _mat_records(fnames, classes):
    records = np.zeros(len(fnames), dtype=[("fname", object), ("class", object)])
    for r, (f, c) in enumerate(zip(fnames, classes)):
        records[r] = (f, np.uint8(c))
    return {"annotations": records}


def _stanford_cars_root(tmp_path, class_names):
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
        scipy.io.savemat(mat, _mat_records(fnames, classes))
    return tmp_path


def test_stanford_cars_matches_torchvision(tmp_path):
    _stanford_cars_root(tmp_path, real_names("stanford_cars_meta_class_names.txt"))
    for split, classes in (("train", [1, 196, 5]), ("test", [7, 2])):
        ds = load_dataset("stanford_cars", tmp_path, split)
        check_dataset(ds, "stanford_cars")
        assert ds.targets.tolist() == [c - 1 for c in classes]
        assert pairs(ds) == pairs(tvd.StanfordCars(str(tmp_path), split=split))
    assert ds.class_names[1] == "Acura RL Sedan 2012"  # test label 2 of cars_meta.mat


def _food101_root(tmp_path, classes_txt):
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


def test_food101_matches_torchvision(tmp_path):
    _food101_root(tmp_path, real_names("food101_classes.txt"))
    ds = load_dataset("food101", tmp_path, "train")
    check_dataset(ds, "food101")
    assert ds.targets.tolist() == list(range(101))
    assert pairs(ds) == pairs(tvd.Food101(str(tmp_path), split="train"))
    assert load_dataset("food101", tmp_path, "test").targets.tolist() == [0, 25, 50, 75, 100]


def _swap(names, i, j):
    names = list(names)
    names[i], names[j] = names[j], names[i]
    return names


@pytest.mark.parametrize(
    ("name", "build", "names_file", "meta", "i"),
    [
        ("stanford_cars", _stanford_cars_root, "stanford_cars_meta_class_names.txt", "cars_meta.mat", 5),
        ("cifar100", _cifar100_root, "cifar100_fine_label_names.txt", "meta", 41),
        ("food101", _food101_root, "food101_classes.txt", "classes.txt", 16),
    ],
)
def test_shipped_class_names_checked_against_the_datas_own_list(tmp_path, name, build, names_file, meta, i):
    real = real_names(names_file)
    build(tmp_path, _swap(real, i, i + 1))  # e.g. cheese_plate <-> cheesecake
    with pytest.raises(ValueError) as err:
        load_dataset(name, tmp_path, "train")
    msg = str(err.value)
    assert meta in msg and f"first difference at index {i} (label {i})" in msg
    assert repr(real[i + 1]) in msg and repr(load_class_names(name)[i]) in msg
    assert "class_names_file" in msg
    # a class-names file of the user's replaces the shipped list: nothing to check against
    names = tmp_path / "names.txt"
    names.write_text("\n".join(_swap(real, i, i + 1)) + "\n")
    assert load_dataset(name, tmp_path, "train", class_names_file=names).class_names[i] == real[i + 1]


def test_stanford_cars_meta_with_missing_name_is_refused(tmp_path):
    _stanford_cars_root(tmp_path, real_names("stanford_cars_meta_class_names.txt")[:-1])
    with pytest.raises(ValueError, match=r"cars_meta.mat .*the file has 195 names, the shipped list 196"):
        load_dataset("stanford_cars", tmp_path, "test")


def test_flowers102_matches_torchvision(tmp_path, no_md5):
    base = tmp_path / "flowers-102"
    labels = np.array([[5, 102, 1, 77, 5, 9]])  # 1-based, image i+1 has labels[0, i]
    for i in range(labels.shape[1]):
        write_image(base / "jpg" / f"image_{i + 1:05d}.jpg", i)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(base / "setid.mat", {"trnid": [[1, 2]], "valid": [[3, 4]], "tstid": [[5, 6]]})
    expected = {"train": [4, 101], "val": [0, 76], "test": [4, 8]}
    for split, want in expected.items():
        ds = load_dataset("flowers102", tmp_path, split)
        check_dataset(ds, "flowers102")
        assert ds.targets.tolist() == want
        assert pairs(ds) == pairs(tvd.Flowers102(str(tmp_path), split=split))
    parts = load_split_datasets("flowers102", tmp_path)
    assert [len(parts[p]) for p in PARTS] == [2, 2, 2]


# ---------------------------------------------------------------------------------------------
# layouts torchvision does not read (resisc45, imagenet)


def _resisc45_root(tmp_path, with_splits: bool):
    classes = ["airplane", "sea_ice", "wetland"]
    for c in classes:
        for k in range(1, 6):
            (tmp_path / "NWPU-RESISC45" / c).mkdir(parents=True, exist_ok=True)
            (tmp_path / "NWPU-RESISC45" / c / f"{c}_{k:03d}.jpg").write_bytes(image_bytes(k))
    if with_splits:
        for split, ks in (("train", (1, 2, 3)), ("val", (4,)), ("test", (5,))):
            (tmp_path / f"resisc45-{split}.txt").write_text(
                "".join(f"{c}_{k:03d}.jpg\n" for c in classes for k in ks)
            )
    return tmp_path


def test_resisc45_official_split_files(tmp_path):
    root = _resisc45_root(tmp_path, with_splits=True)
    every = load_dataset("resisc45", root, "all")
    check_dataset(every, "resisc45")
    assert sorted(set(every.targets.tolist())) == [0, RESISC45_CLASSES.index("sea ice"), 44]
    sizes = {s: len(load_dataset("resisc45", root, s)) for s in PARTS}
    assert sizes == {"train": 9, "val": 3, "test": 3}
    parts = load_split_datasets("resisc45", root)
    assert {p: len(parts[p]) for p in PARTS} == sizes
    assert all(parts[p].dataset.split == p for p in PARTS)


def test_resisc45_without_split_files_falls_back(tmp_path):
    root = _resisc45_root(tmp_path, with_splits=False)
    with pytest.raises(FileNotFoundError, match="resisc45-train.txt"):
        load_dataset("resisc45", root, "train")
    parts = load_split_datasets("resisc45", root)
    assert [len(parts[p]) for p in PARTS] == [9, 3, 3]  # seeded 60/20/20 of 15 images
    idx = np.concatenate([parts[p].source_indices for p in PARTS])
    assert sorted(idx.tolist()) == list(range(15))


def test_resisc45_split_file_with_absent_image(tmp_path):
    root = _resisc45_root(tmp_path, with_splits=True)
    (root / "resisc45-test.txt").write_text("airplane_005.jpg\nairplane_999.jpg\n")
    with pytest.raises(FileNotFoundError, match="airplane_999.jpg"):
        load_dataset("resisc45", root, "test")


def test_imagenet_folders(tmp_path):
    payload = image_bytes(1, "PNG")
    for c in range(1000):
        d = tmp_path / "val" / f"n{c:08d}"
        d.mkdir(parents=True)
        (d / f"ILSVRC2012_val_{c:08d}.JPEG").write_bytes(payload)
    ds = load_dataset("imagenet", tmp_path, "val")
    check_dataset(ds, "imagenet")
    assert ds.targets.tolist() == list(range(1000))
    for c in range(3):
        (tmp_path / "train" / f"n{c:08d}").mkdir(parents=True)
    with pytest.raises(ValueError, match="has 3 class folders, expected 1000"):
        load_dataset("imagenet", tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# imagefolder and csv


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for c, cls in enumerate(["golden_retriever", "tabby", "zebra"]):
        for k in range(4):
            write_image(root / cls / f"{k}.png", 10 * c + k)
    (root / ".cache").mkdir()  # hidden folders are not classes
    return root


def test_imagefolder_loads_with_names_and_templates(folder, tmp_path):
    ds = load_dataset("imagefolder", folder, "all")
    check_dataset(ds, "imagefolder")
    assert ds.class_names == ["golden retriever", "tabby", "zebra"]
    assert np.bincount(ds.targets).tolist() == [4, 4, 4]
    names, templates = tmp_path / "names.yaml", tmp_path / "t.txt"
    names.write_text("- dog\n- cat\n- zebra\n")
    templates.write_text("a blurry photo of a {}.\n")
    ds = load_dataset("imagefolder", folder, "all", class_names_file=names, templates_file=templates)
    assert ds.class_names == ["dog", "cat", "zebra"] and ds.templates == ["a blurry photo of a {}."]


def test_imagefolder_class_names_mismatch_names_both_counts(folder, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n")
    with pytest.raises(ValueError) as err:
        load_dataset("imagefolder", folder, "all", class_names_file=names)
    assert "2 names" in str(err.value) and "3 classes" in str(err.value) and str(names) in str(err.value)


def test_imagefolder_empty_class_names_the_class(folder):
    (folder / "unicorn").mkdir()
    with pytest.raises(FileNotFoundError, match="unicorn"):
        load_dataset("imagefolder", folder, "all")


def test_corrupt_image_raise_and_skip(folder):
    good = (folder / "tabby" / "0.png").read_bytes()
    (folder / "tabby" / "9_truncated.png").write_bytes(good[: len(good) // 2])
    jpg = image_bytes(3)
    (folder / "zebra" / "9_truncated.jpg").write_bytes(jpg[: len(jpg) - 20])
    (folder / "zebra" / "notanimage.jpg").write_bytes(b"this is not an image")
    ds = load_dataset("imagefolder", folder, "all")
    assert len(ds) == 15 and ds.num_skipped == 0
    bad = ds.paths.index(str(folder / "zebra" / "notanimage.jpg"))
    with pytest.raises(BadImageError, match="notanimage.jpg"):
        ds[bad]
    bad = ds.paths.index(str(folder / "tabby" / "9_truncated.png"))
    with pytest.raises(BadImageError, match="9_truncated.png"):
        ds[bad]
    skip = load_dataset("imagefolder", folder, "all", on_bad_image="skip")
    assert len(skip) == len(skip.targets) == 12
    assert skip.num_skipped == 3 and len(skip.skipped_files) == 3
    assert np.bincount(skip.targets).tolist() == [4, 4, 4]
    assert all(skip[i][0].mode == "RGB" for i in range(len(skip)))


def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_csv_relative_absolute_and_named_labels(tmp_path):
    write_image(tmp_path / "a" / "0.jpg", 0)
    write_image(tmp_path / "a" / "1.jpg", 1)
    write_image(tmp_path / "elsewhere" / "2.jpg", 2)
    table = tmp_path / "a" / "labels.csv"
    _write_csv(
        table,
        ["image", "label"],
        [["0.jpg", "sea_lion"], ["1.jpg", "cat"], [tmp_path / "elsewhere" / "2.jpg", "cat"]],
    )
    ds = load_dataset("csv", table, "all")
    check_dataset(ds, "csv")
    assert ds.class_names == ["cat", "sea lion"] and ds.targets.tolist() == [1, 0, 0]
    assert np.array_equal(
        np.asarray(ds[2][0])[0, 0], np.asarray(Image.open(tmp_path / "elsewhere" / "2.jpg"))[0, 0]
    )
    names = tmp_path / "names.txt"
    names.write_text("dog\nsea_lion\ncat\n")  # a superset, in its own order
    ds = load_dataset("csv", table, "all", class_names_file=names)
    assert ds.class_names == ["dog", "sea_lion", "cat"] and ds.targets.tolist() == [1, 2, 2]


def test_csv_int_labels_and_mismatch(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", i)
    table = tmp_path / "d.csv"
    _write_csv(table, ["path", "label"], [["0.png", 0], ["1.png", 3], ["2.png", 1]])
    ds = load_dataset("csv", table, "all")
    assert ds.targets.tolist() == [0, 3, 1] and len(ds.class_names) == 4
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    with pytest.raises(ValueError) as err:
        load_dataset("csv", table, "all", class_names_file=names)
    assert "4 classes" in str(err.value) and "2 names" in str(err.value)
    _write_csv(table, ["path", "label"], [["0.png", "cat"], ["1.png", "yak"]])
    names.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="2 names") as err:
        load_dataset("csv", table, "all", class_names_file=names)
    assert "yak" in str(err.value)


def test_csv_errors_and_skip(tmp_path):
    write_image(tmp_path / "0.png", 0)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    table = tmp_path / "d.csv"
    _write_csv(table, ["file_name", "label"], [["0.png", 0]])
    with pytest.raises(ValueError, match="image-path column"):
        load_dataset("csv", table, "all")
    assert len(load_dataset("csv", table, "all", path_column="file_name")) == 1
    _write_csv(table, ["path", "label"], [["0.png", 0], ["missing.png", 1], ["bad.png", 1]])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_dataset("csv", table, "all")
    ds = load_dataset("csv", table, "all", on_bad_image="skip")
    assert len(ds) == 1 and ds.num_skipped == 2 and ds.targets.tolist() == [0]
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_dataset("csv", tmp_path / "nope.csv", "all")


def test_unknown_loader_option_is_rejected(tmp_path):
    with pytest.raises(TypeError):
        load_dataset("digits", None, "all", partition=2)
    with pytest.raises(ValueError, match="on_bad_image"):
        load_dataset("digits", None, "all", on_bad_image="ignore")


# ---------------------------------------------------------------------------------------------
# split datasets


def test_load_split_datasets_digits():
    parts = load_split_datasets("digits", None, image_size=16)
    sizes = [len(parts[p]) for p in PARTS]
    assert sum(sizes) == 1797 and abs(sizes[0] - 0.6 * 1797) <= 2
    seen = np.concatenate([parts[p].source_indices for p in PARTS])
    assert len(np.unique(seen)) == 1797
    for p in PARTS:
        sub = parts[p]
        np.testing.assert_array_equal(sub.targets, sub.dataset.targets[sub.source_indices])
        assert sub[0][1] == sub.targets[0]
    few = load_split_datasets("digits", None, image_size=16, shots=4)
    assert np.bincount(few["train"].targets).tolist() == [4] * 10
    assert set(few["train"].source_indices) <= set(parts["train"].source_indices)
    np.testing.assert_array_equal(few["val"].source_indices, parts["val"].source_indices)


def test_registry_module_exports():
    for name in registry.__all__:
        assert hasattr(registry, name)

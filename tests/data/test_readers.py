"""Per-dataset readers (`residual_lightning.data.readers`), tested offline on tiny fake roots.

Each torchvision-backed reader is checked against torchvision's own class reading the same fake
files (its md5 checks patched out where it has them), so the fakes are in the layout torchvision
expects and our labels/pixels agree with it. Nothing is downloaded.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.io
import torchvision.datasets as tvd

from residual_lightning.data.registry import load_dataset, load_split_datasets
from residual_lightning.data.splits import PARTS
from residual_lightning.data.templates import (
    DTD_CLASSES,
    EUROSAT_FOLDER_NAMES,
    RESISC45_CLASSES,
    load_class_names,
)
from tests.data.fakes import (
    check_dataset,
    cifar100_root,
    cifar_batch,
    food101_root,
    image_bytes,
    pairs,
    real_names,
    stanford_cars_root,
    write_image,
)

# ---------------------------------------------------------------------------------------------
# array-backed readers (cifar, mnist, svhn, digits)


@pytest.fixture
def no_md5(monkeypatch):
    """Let torchvision's classes read our fakes: their md5 checks cannot pass on made-up files."""
    for module in (tvd.cifar, tvd.svhn, tvd.flowers102):
        monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)


def test_cifar10_matches_torchvision(tmp_path, no_md5):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / f).write_bytes(pickle.dumps(cifar_batch(rng, 3, "labels", 10)))
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


def test_cifar100_channel_layout(tmp_path, no_md5):
    cifar100_root(tmp_path, real_names("cifar100_fine_label_names.txt"))
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


def test_stanford_cars_matches_torchvision(tmp_path):
    stanford_cars_root(tmp_path, real_names("stanford_cars_meta_class_names.txt"))
    for split, classes in (("train", [1, 196, 5]), ("test", [7, 2])):
        ds = load_dataset("stanford_cars", tmp_path, split)
        check_dataset(ds, "stanford_cars")
        assert ds.targets.tolist() == [c - 1 for c in classes]
        assert pairs(ds) == pairs(tvd.StanfordCars(str(tmp_path), split=split))
    assert ds.class_names[1] == "Acura RL Sedan 2012"  # test label 2 of cars_meta.mat


def test_food101_matches_torchvision(tmp_path):
    food101_root(tmp_path, real_names("food101_classes.txt"))
    ds = load_dataset("food101", tmp_path, "train")
    check_dataset(ds, "food101")
    assert ds.targets.tolist() == list(range(101))
    assert pairs(ds) == pairs(tvd.Food101(str(tmp_path), split="train"))
    assert load_dataset("food101", tmp_path, "test").targets.tolist() == [0, 25, 50, 75, 100]


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
# imagefolder (the `folder` fixture is in conftest.py)


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

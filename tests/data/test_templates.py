"""Class names and prompt templates (`residual_lightning.data.templates`): the shipped lists, user
files, and the check of the shipped names against a dataset's own list (fakes in `fakes.py`)."""

from __future__ import annotations

import pytest

from residual_lightning.data.registry import get_dataset_spec, load_dataset
from residual_lightning.data.templates import (
    DATASET_TEMPLATES,
    load_class_names,
    load_class_names_file,
    load_templates_file,
    sun397_class_name,
)
from tests.data.fakes import EXPECTED_CLASSES, cifar100_root, food101_root, real_names, stanford_cars_root


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_class_names_and_templates(name):
    spec = get_dataset_spec(name)
    assert spec.num_classes == EXPECTED_CLASSES[name]
    assert list(spec.class_names) == load_class_names(name)
    assert all(isinstance(n, str) and n.strip() == n and n for n in spec.class_names)
    assert spec.templates and all(t.count("{}") == 1 for t in spec.templates)
    assert all(t.format("x") != t for t in spec.templates)


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
# shipped names checked against the dataset's own list


def _swap(names, i, j):
    names = list(names)
    names[i], names[j] = names[j], names[i]
    return names


@pytest.mark.parametrize(
    ("name", "build", "names_file", "meta", "i"),
    [
        ("stanford_cars", stanford_cars_root, "stanford_cars_meta_class_names.txt", "cars_meta.mat", 5),
        ("cifar100", cifar100_root, "cifar100_fine_label_names.txt", "meta", 41),
        ("food101", food101_root, "food101_classes.txt", "classes.txt", 16),
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
    stanford_cars_root(tmp_path, real_names("stanford_cars_meta_class_names.txt")[:-1])
    with pytest.raises(ValueError, match=r"cars_meta.mat .*the file has 195 names, the shipped list 196"):
        load_dataset("stanford_cars", tmp_path, "test")

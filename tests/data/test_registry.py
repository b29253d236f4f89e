"""Dataset registry (`residual_lightning.data.registry`): lookups, loader options, split datasets, and
datasets refused before anything is built (fewer than two classes, a split part that would be empty).

Each error must name the dataset (and root), the setting and the value, and say what to change.
"""

from __future__ import annotations

import numpy as np
import pytest

from residual_lightning.data import registry
from residual_lightning.data.registry import DATASETS, get_dataset_spec, load_dataset, load_split_datasets
from residual_lightning.data.splits import PARTS
from residual_lightning.data.templates import DATASET_TEMPLATES
from tests.data.fakes import write_tinted_image


def test_every_dataset_has_templates_and_protocol():
    assert set(DATASET_TEMPLATES) == set(DATASETS)
    for spec in DATASETS.values():
        assert set(spec.official_splits).isdisjoint(spec.derived_splits)
        assert set(spec.official_splits) | set(spec.derived_splits) == set(PARTS)
        # every source the protocol draws from is loadable
        assert set(spec.split_protocol.sources.values()) <= set(spec.source_splits)


def test_unknown_name_lists_valid_and_close_match():
    with pytest.raises(ValueError) as err:
        get_dataset_spec("cifar-1O")
    msg = str(err.value)
    assert "'cifar10'" in msg and "Did you mean" in msg
    assert all(n in msg for n in DATASETS)
    assert get_dataset_spec("Stanford-Cars").name == "stanford_cars"


def test_bad_split_is_explained(tmp_path):
    with pytest.raises(ValueError, match="derived"):
        load_dataset("eurosat", tmp_path, "train")
    with pytest.raises(ValueError, match="source splits are train, test"):
        load_dataset("cifar10", tmp_path, "val")


def test_unknown_loader_option_is_rejected(tmp_path):
    with pytest.raises(TypeError):
        load_dataset("digits", None, "all", partition=2)
    with pytest.raises(ValueError, match="on_bad_image"):
        load_dataset("digits", None, "all", on_bad_image="ignore")


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


# ---------------------------------------------------------------------------------------------
# fewer than two classes


def test_single_class_imagefolder_is_refused(tmp_path):
    for k in range(10):
        write_tinted_image(tmp_path / "only_cats" / f"{k}.png", k)
    assert len(load_dataset("imagefolder", tmp_path, "all")) == 10  # loading alone is fine
    with pytest.raises(ValueError) as err:
        load_split_datasets("imagefolder", tmp_path)
    msg = str(err.value)
    assert f"imagefolder at {tmp_path}: found 1 class(es) ['only cats']" in msg and "at least 2" in msg


def test_single_label_csv_is_refused(images):
    table = images / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{c}.png,0\n" for c in "abcd"))
    with pytest.raises(ValueError, match=r"csv at .*labels.csv: found 1 class\(es\) \['0'\]"):
        load_split_datasets("csv", table)


# ---------------------------------------------------------------------------------------------
# split parts that would be empty


@pytest.fixture
def two_per_class(tmp_path):
    for c, cls in enumerate(["cat", "dog", "yak"]):
        for k in range(2):
            write_tinted_image(tmp_path / cls / f"{k}.png", 2 * c + k)
    return tmp_path


def test_zero_fraction_part_is_refused(two_per_class):
    with pytest.raises(ValueError) as err:
        load_split_datasets("imagefolder", two_per_class, fractions=[1, 0, 0])
    msg = str(err.value)
    assert "the val part would be empty: fractions [1, 0, 0] (train, val, test)" in msg
    assert "6 samples in 3 classes, samples per class {0: 2, 1: 2, 2: 2}" in msg
    assert "give val a positive fraction, e.g. fractions=[0.8, 0.1, 0.1]" in msg


def test_too_few_samples_per_class_is_refused(two_per_class):
    with pytest.raises(ValueError) as err:
        load_split_datasets("imagefolder", two_per_class)  # 80/10/10 of 2 images a class
    msg = str(err.value)
    assert "part would be empty: fractions [0.8, 0.1, 0.1]" in msg and "with 3+ samples per class" in msg
    parts = load_split_datasets("imagefolder", two_per_class, fractions=[0.4, 0.3, 0.3])
    assert all(len(parts[p]) > 0 for p in PARTS)  # what the message suggests works

"""Stratified splits, the per-dataset protocols of method.md §3, and few-shot sampling."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from residual_lightning.data.splits import (
    PARTS,
    SPLIT_PROTOCOLS,
    few_shot,
    get_split_protocol,
    make_splits,
    split_sources,
    stratified_split,
)


def imbalanced_targets(n: int = 5000, classes: int = 23, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.2, 3.0, classes)
    return rng.choice(classes, size=n, p=weights / weights.sum())


def assert_partition(parts, n):
    everything = np.concatenate(parts)
    assert len(everything) == n and len(np.unique(everything)) == n  # disjoint and covering
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted


@pytest.mark.parametrize("fractions", [(0.9, 0.1), (0.8, 0.2), (0.8, 0.1, 0.1), (0.6, 0.2, 0.2)])
def test_stratified_split_partitions_and_preserves_proportions(fractions):
    y = imbalanced_targets()
    parts = stratified_split(y, fractions, seed=42)
    assert_partition(parts, len(y))
    for part, f in zip(parts, fractions):
        assert abs(len(part) - f * len(y)) <= 1  # totals within one sample of N * f
        for c in np.unique(y):
            n_c = np.sum(y == c)
            assert abs(np.sum(y[part] == c) - f * n_c) < 1 + 1e-9  # and each class within one


def test_stratified_split_deterministic_per_seed():
    y = imbalanced_targets(800, 7)
    a = stratified_split(y, (0.8, 0.1, 0.1), seed=3)
    b = stratified_split(list(y), (0.8, 0.1, 0.1), seed=3)
    c = stratified_split(y, (0.8, 0.1, 0.1), seed=4)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))
    assert [len(x) for x in a] == [len(x) for x in c]


def test_every_class_in_every_part_when_possible():
    y = np.repeat(np.arange(50), 4)  # 4 samples a class: 80/10/10 would round val/test to 0
    parts = stratified_split(y, (0.8, 0.1, 0.1))
    assert_partition(parts, len(y))
    for part in parts:
        assert set(y[part]) == set(range(50))
    rare = np.array([0] * 20 + [1, 1])  # class 1 cannot fill three parts
    parts = stratified_split(rare, (0.8, 0.1, 0.1))
    assert_partition(parts, 22)
    assert sum(np.sum(rare[p] == 1) for p in parts) == 2
    assert np.sum(rare[parts[0]] == 1) >= 1


@pytest.mark.parametrize("fractions", [(0.5, 0.4), (0.7, 0.4, -0.1), ()])
def test_stratified_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(np.zeros(10, int), fractions)


def test_zero_fraction_part_is_empty():
    parts = stratified_split(np.repeat(np.arange(3), 10), (1.0, 0.0))
    assert len(parts[0]) == 30 and len(parts[1]) == 0


@pytest.mark.parametrize(
    ("name", "val_fraction"),
    [
        ("cifar10", 0.1),
        ("cifar100", 0.1),
        ("mnist", 0.1),
        ("gtsrb", 0.1),
        ("food101", 0.1),
        ("svhn", 0.2),
        ("dtd", 0.2),
        ("stanford_cars", 0.2),
    ],
)
def test_holdout_protocols(name, val_fraction):
    y_train, y_test = imbalanced_targets(2000, 10), imbalanced_targets(300, 10, seed=1)
    s = make_splits(name, y_train, y_test)
    assert_partition([s["train"], s["val"]], len(y_train))
    assert abs(len(s["val"]) - val_fraction * len(y_train)) <= 1
    np.testing.assert_array_equal(s["test"], np.arange(len(y_test)))
    assert split_sources(name) == {"train": "train", "val": "train", "test": "test"}
    with pytest.raises(ValueError, match="official test"):
        make_splits(name, y_train)  # validation is never taken from test, and test is required


def test_imagenet_tests_on_its_val_source():
    assert split_sources("imagenet")["test"] == "val"
    s = make_splits("imagenet", np.repeat(np.arange(4), 10), np.arange(8) % 4)
    assert len(s["val"]) == 8 and len(s["test"]) == 8


@pytest.mark.parametrize(("name", "fractions"), [("eurosat", (0.8, 0.1, 0.1)), ("sun397", (0.8, 0.1, 0.1))])
def test_all_data_protocols(name, fractions):
    y = imbalanced_targets(3000, 12)
    s = make_splits(name, y)
    assert_partition([s[p] for p in PARTS], len(y))
    for p, f in zip(PARTS, fractions):
        assert abs(len(s[p]) - f * len(y)) <= 1
    assert split_sources(name) == dict.fromkeys(PARTS, "all")
    with pytest.raises(ValueError, match="source 'all'"):
        make_splits(name, y, y)


def test_digits_60_20_20_seeded():
    y = load_digits().target
    s = make_splits("digits", y)
    assert_partition([s[p] for p in PARTS], 1797)
    assert [len(s[p]) for p in PARTS] == [1078, 360, 359]
    for p, f in zip(PARTS, (0.6, 0.2, 0.2)):
        assert np.all(np.abs(np.bincount(y[s[p]], minlength=10) - f * np.bincount(y)) < 1 + 1e-9)
    again = make_splits("digits", y, seed=42)
    other = make_splits("digits", y, seed=7)
    assert all(np.array_equal(s[p], again[p]) for p in PARTS)
    assert not np.array_equal(s["val"], other["val"])


def test_official_protocols_and_resisc45_fallback():
    s = make_splits("flowers102", [0, 1, 1], [0, 0, 1, 1], targets_val=[1, 0])
    assert [len(s[p]) for p in PARTS] == [3, 2, 4]
    with pytest.raises(ValueError, match="targets_val and targets_test"):
        make_splits("flowers102", [0, 1], [0, 1])
    s = make_splits("resisc45", np.repeat(np.arange(45), 10))  # no split files: seeded 60/20/20
    assert [len(s[p]) for p in PARTS] == [270, 90, 90]
    assert split_sources("resisc45") == {p: p for p in PARTS}
    assert split_sources("resisc45", fallback=True) == dict.fromkeys(PARTS, "all")


def test_fraction_override_and_validation():
    y = np.repeat(np.arange(5), 20)
    s = make_splits("cifar10", y, y[:10], fractions=(0.5, 0.5))
    assert len(s["train"]) == len(s["val"]) == 50
    s = make_splits("eurosat", y, fractions=(0.5, 0.25, 0.25))
    assert [len(s[p]) for p in PARTS] == [50, 25, 25]
    with pytest.raises(ValueError, match=r"\(train, val\)"):
        make_splits("cifar10", y, y, fractions=(0.8, 0.1, 0.1))
    with pytest.raises(ValueError, match="do not pass targets_val"):
        make_splits("cifar10", y, y, targets_val=y)


def test_unknown_protocol_suggests():
    with pytest.raises(ValueError, match="Did you mean 'sun397'"):
        get_split_protocol("sun379")
    assert {"cifar10", "digits", "resisc45", "imagefolder", "csv"} <= set(SPLIT_PROTOCOLS)


def test_few_shot_exact_k_from_train_only():
    y = imbalanced_targets(1500, 8)
    s = make_splits("cifar10", y, y[:100])
    picked = few_shot(y, s["train"], shots=5, seed=0)
    assert np.bincount(y[picked], minlength=8).tolist() == [5] * 8
    assert set(picked) <= set(s["train"]) and not set(picked) & set(s["val"])
    assert np.array_equal(picked, few_shot(y, s["train"], shots=5, seed=0))
    assert not np.array_equal(picked, few_shot(y, s["train"], shots=5, seed=1))
    assert np.all(np.diff(picked) > 0)


def test_few_shot_error_names_the_class():
    y = np.array([0] * 10 + [1] * 10 + [2] * 3)
    train = np.arange(len(y))
    with pytest.raises(ValueError, match=r"'zebra' \(label 2\) has 3 train samples, fewer than shots=4"):
        few_shot(y, train, 4, class_names=["cat", "dog", "zebra"])
    # a class present only outside the train part is caught as well
    with pytest.raises(ValueError, match="label 2 has 0 train samples"):
        few_shot(y, np.arange(20), 1)
    with pytest.raises(ValueError, match="shots"):
        few_shot(y, train, 0)


def test_empty_parts_are_refused_before_anything_is_built():
    y = np.repeat(np.arange(3), 5)
    with pytest.raises(ValueError) as err:  # a holdout with no validation
        make_splits("cifar10", y, y, fractions=(1.0, 0.0))
    msg = str(err.value)
    assert "cifar10: the val part would be empty: fractions [1.0, 0.0] (train, val)" in msg
    assert "15 samples in 3 classes, samples per class {0: 5, 1: 5, 2: 5}" in msg
    assert "fractions=[0.9, 0.1]" in msg
    with pytest.raises(ValueError, match="test part is empty: source split 'test' has no samples"):
        make_splits("cifar10", y, [])
    with pytest.raises(ValueError, match="test part is empty: source split 'val' has no samples"):
        make_splits("imagenet", y, [])  # ImageNet tests on its val source
    with pytest.raises(ValueError, match="flowers102: the val part is empty: source split 'val'"):
        make_splits("flowers102", [0, 1], [0, 1], targets_val=[])
    with pytest.raises(ValueError, match=r"the test part would be empty: fractions \[0.5, 0.5, 0.0\]"):
        make_splits("eurosat", y, fractions=(0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match=r"the val part would be empty: .*\(with 3\+ samples per class"):
        make_splits("sun397", np.arange(3))  # 3 classes of one sample cannot fill val and test
    with pytest.raises(ValueError, match=r"12 classes of 1\.\.4 samples; .*give test a positive fraction"):
        make_splits("sun397", np.r_[np.arange(12), 0, 0, 0], fractions=(0.9, 0.1, 0.0))

"""`ResidualDataModule` and its loaders: batch order, shards across ranks, caches built once and reused,
an ImageNet reference set, and corrupt caches, PCA bases and classifier files refused or rebuilt."""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from residual_lightning.data.cache import CacheError
from residual_lightning.data.datamodule import EpochBatchSampler, ResidualDataModule
from tests.helpers import derived_files, digits_module, setup_digits, tamper

# ---------------------------------------------------------------------------------------------
# loaders


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    a = EpochBatchSampler(100, 8, True, seed=3)
    b = EpochBatchSampler(100, 8, True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert sorted(i for batch in a for i in batch) == list(range(100))


def test_eval_shards_cover_every_sample_once():
    shards = [EpochBatchSampler(103, 10, False, rank=r, world=3) for r in range(3)]
    seen = [i for s in shards for batch in s for i in batch]
    assert sorted(seen) == list(range(103))
    train = [EpochBatchSampler(103, 10, True, seed=1, rank=r, world=3) for r in range(3)]
    sizes = {sum(len(b) for b in s) for s in train}
    assert sizes == {34}  # equal per rank, as DDP needs


# ---------------------------------------------------------------------------------------------
# caches


def test_datamodule_builds_then_reuses_caches(tmp_path):
    from residual_lightning.data.datamodule import build_caches

    dm = ResidualDataModule(
        dataset="digits", cache_dir=str(tmp_path), dataset_options={"image_size": 64}, batch_size=32
    )
    assert dm.missing() == ["train", "val", "test"]
    assert sorted(build_caches(dm)) == ["test", "train", "val"]
    assert dm.missing() == []
    dm2 = ResidualDataModule(
        dataset="digits", cache_dir=str(tmp_path), dataset_options={"image_size": 64}, batch_size=32
    )
    t = time.perf_counter()
    dm2.setup("fit")
    assert time.perf_counter() - t < 1.0
    assert {k: len(v) for k, v in dm2.caches.items()} == {"train": 1078, "val": 360, "test": 359}
    batch = next(iter(dm2.train_dataloader()))
    assert batch.heads.shape == (32, 4, 4, 64) and batch.emb.shape == (32, 128)
    weights, scale = dm2.classifier()
    assert weights.shape == (10, 128) and scale > 0
    assert len(list(dm2.val_dataloader())) == 1


def test_corrupt_cache_is_rebuilt_by_the_datamodule_when_asked(tmp_path):
    from residual_lightning.data.datamodule import ResidualDataModule

    def dm(mode):
        return ResidualDataModule(
            dataset="digits", cache_dir=str(tmp_path), dataset_options={"image_size": 64}, on_mismatch=mode
        )

    first = dm("error")
    first.prepare_data()
    val = first.cache_paths()["val"]
    arr = np.load(val / "heads.npy", mmap_mode="r+")
    arr[3, 0, 0, 0] += 1
    arr.flush()
    del arr
    with pytest.raises(CacheError, match="checksum mismatch"):
        dm("error").setup("fit")
    fixed = dm("rebuild")
    with pytest.warns(UserWarning, match="rebuilding"):
        fixed.prepare_data()
    fixed.setup("fit")
    assert len(fixed.caches["val"]) == 360


# ---------------------------------------------------------------------------------------------
# an ImageNet reference set


def fake_imagenet(root: Path, per_class: int = 1) -> Path:
    """An ImageFolder-style ImageNet root (train/ and val/, 1000 class folders) of tiny PNGs."""
    from PIL import Image

    for split in ("train", "val"):
        for c in range(1000):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (c % 256, (c // 256) * 60, 40 * i)).save(folder / f"{i}.png")
    return root


def test_imagenet_reference_set_gets_its_own_cache_and_the_bases(tmp_path):
    root = fake_imagenet(tmp_path / "imagenet", per_class=2)
    dm = ResidualDataModule(
        dataset="digits",
        cache_dir=str(tmp_path / "cache"),
        dataset_options={"image_size": 64},
        reference="imagenet",
        reference_root=str(root),
        reference_size=300,
    )
    assert dm.parts() == ["train", "val", "test", "reference"]
    dm.prepare_data()
    dm.setup("fit")
    ref = dm.caches["reference"]
    assert ref.meta["key"]["dataset"] == "imagenet" and 250 <= len(ref) <= 350
    bases = dm.bases()
    assert bases.n_samples == len(ref) and bases.metadata["dataset"] == "imagenet"
    assert dm.reference_cache() is ref


def test_imagenet_reference_needs_a_root():
    with pytest.raises(ValueError, match="reference_root"):
        ResidualDataModule(dataset="digits", reference="imagenet")


# ---------------------------------------------------------------------------------------------
# derived files (the `digits` fixture is in tests/conftest.py)


def test_altered_or_truncated_bases_and_classifier_are_refused_or_rebuilt(tmp_path, digits):
    cache = tmp_path / "cache"
    shutil.copytree(digits, cache)
    dm = digits_module(cache)
    dm.setup("fit")
    bases, (weights, scale) = dm.bases(), dm.classifier()
    bases_file, classifier_file = derived_files(dm)

    tamper(bases_file)
    with pytest.raises(CacheError, match=rf"{bases_file.name} is corrupt"):
        setup_digits(cache).bases()
    data = classifier_file.read_bytes()
    classifier_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=rf"{classifier_file.name} is truncated"):
        setup_digits(cache).classifier()

    fixed = setup_digits(cache, on_mismatch="rebuild")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt_bases, (rebuilt_weights, rebuilt_scale) = fixed.bases(), fixed.classifier()
    assert sum("rebuilding" in str(w.message) or "refitting" in str(w.message) for w in caught) == 2
    torch.testing.assert_close(rebuilt_bases.heads.components, bases.heads.components)
    torch.testing.assert_close(rebuilt_weights, weights)
    assert rebuilt_scale == pytest.approx(scale)
    again = setup_digits(cache)
    again.bases(), again.classifier()  # valid again: no error, no warning

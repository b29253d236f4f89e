"""Activation cache: exact contents, resumption after SIGKILL, tamper detection, locking."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from residual_lightning.data.cache import ActivationCache, CacheError, CacheKey, open_or_none
from residual_lightning.data.datamodule import EpochBatchSampler, ResidualDataModule
from residual_lightning.data.extract import ExtractionJob, build_cache
from residual_lightning.data.registry import load_dataset
from residual_lightning.units import decompose_compact, load_backbone

# A child process that builds the digits test cache in small chunks; SIGKILLed mid-way by a test.
BUILD = textwrap.dedent(
    """
    import sys, time, torch
    from residual_lightning.data.extract import build_cache, ExtractionJob
    from residual_lightning.data import extract
    from tests.test_cache import make_job
    model, job = make_job(sys.argv[1], int(sys.argv[2]))
    delay = float(sys.argv[3])
    original = extract._WriteStep.__call__
    def slow(self, *a):
        original(self, *a)
        time.sleep(delay)
    extract._WriteStep.__call__ = slow
    build_cache(model, job, batch_size=16, chunk_size=32, progress=False)
    print("BUILT")
    """
)


def make_job(root: str, n: int = 100, dtype: str = "float16"):
    """The tiny backbone and an extraction job over the first n digits images."""
    torch.manual_seed(0)
    bb = load_backbone("RL-Tiny-ViT-64")
    data = load_dataset("digits", None, "all", bb.transform, image_size=64)
    subset = torch.utils.data.Subset(data, range(n))
    key = CacheKey("RL-Tiny-ViT-64", "random", "digits", "test", f"first{n}", "eval", "default", dtype)
    return bb.model, ExtractionJob(subset, key, Path(root) / key.folder_name())


def arrays_bytes(path: Path) -> dict[str, bytes]:
    return {name: (path / f"{name}.npy").read_bytes() for name in ("heads", "mlps", "emb", "labels")}


def test_cache_holds_the_exact_compact_contributions(tmp_path):
    model, job = make_job(str(tmp_path), n=40, dtype="float32")
    cache = build_cache(model, job, batch_size=16, chunk_size=32, progress=False)
    images = torch.stack([job.dataset[i][0] for i in range(40)])
    with torch.no_grad():
        ref = decompose_compact(model, images)
    batch = cache.batch(np.arange(40))
    torch.testing.assert_close(batch.heads, ref.heads, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.mlps, ref.mlps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.head_maps, ref.head_maps)
    assert batch.label.tolist() == [job.dataset[i][1] for i in range(40)]
    meta = json.loads((job.path / "meta.json").read_text())
    assert meta["complete"] and len(meta["checksums"]) == 2 and not (job.path / "progress").exists()


def test_reopen_is_fast_and_reads_by_memory_map(tmp_path):
    model, job = make_job(str(tmp_path), n=40)
    build_cache(model, job, batch_size=16, chunk_size=32, progress=False)
    t = time.perf_counter()
    cache = ActivationCache.open(job.path, job.key)
    assert time.perf_counter() - t < 1.0
    assert isinstance(cache.arrays["heads"], np.memmap)


@pytest.mark.slow
def test_killed_extraction_resumes_to_identical_cache(tmp_path):
    ref_model, ref_job = make_job(str(tmp_path / "ref"))
    build_cache(ref_model, ref_job, batch_size=16, chunk_size=32, progress=False)
    root = tmp_path / "killed"
    cmd = [sys.executable, "-c", BUILD, str(root), "100", "0.4"]
    proc = subprocess.Popen(
        cmd, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, job = make_job(str(root))
    progress = job.path / "progress" / "rank0.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and len(json.loads(progress.read_text())) >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = json.loads((job.path / "meta.json").read_text())
    assert not meta["complete"], "the child finished before it was killed; the test proves nothing"
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache.open(job.path, job.key)
    out = subprocess.run(
        [sys.executable, "-c", BUILD, str(root), "100", "0"],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
    )
    assert "BUILT" in out.stdout, out.stderr[-2000:]
    assert arrays_bytes(job.path) == arrays_bytes(ref_job.path)


def test_tampered_cache_is_refused_or_rebuilt(tmp_path):
    model, job = make_job(str(tmp_path), n=40)
    build_cache(model, job, batch_size=16, chunk_size=32, progress=False)
    arr = np.load(job.path / "mlps.npy", mmap_mode="r+")
    arr[35, 0, 0] += 1
    arr.flush()
    del arr
    with pytest.raises(CacheError, match="checksum mismatch in chunk 1"):
        ActivationCache.open(job.path, job.key)
    with pytest.warns(UserWarning, match="rebuilding"):
        assert open_or_none(job.path, job.key, on_mismatch="rebuild") is None
    assert not job.path.exists()


def test_cache_for_another_key_is_refused(tmp_path):
    model, job = make_job(str(tmp_path), n=20)
    build_cache(model, job, batch_size=16, chunk_size=32, progress=False)
    other = CacheKey(**{**job.key.__dict__, "convention": "equal_share"})
    with pytest.raises(CacheError, match="convention"):
        ActivationCache.open(job.path, other)


@pytest.mark.slow
def test_two_concurrent_builders_leave_one_valid_cache(tmp_path):
    cmd = [sys.executable, "-c", BUILD, str(tmp_path), "64", "0.05"]
    procs = [
        subprocess.Popen(
            cmd, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all("BUILT" in o[0] for o in outs), [o[1][-1000:] for o in outs]
    _, job = make_job(str(tmp_path), 64)
    cache = ActivationCache.open(job.path, job.key)  # verifies every checksum
    assert len(cache) == 64 and len(list(tmp_path.glob("digits-*"))) == 2  # the folder and its lock


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

"""Activation cache (`residual_lightning.data.cache`): fast memory-mapped reopening, tamper detection,
keys that never let a cache of something else be reused, checks when written, safe deletion."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from residual_lightning.contributions import Contributions
from residual_lightning.data.cache import (
    ActivationCache,
    CacheError,
    CacheKey,
    CacheWriter,
    open_or_none,
    remove_cache,
)
from residual_lightning.data.extract import build_cache
from tests.helpers import make_job


def test_reopen_is_fast_and_reads_by_memory_map(tmp_path):
    model, job = make_job(str(tmp_path), n=40)
    build_cache(model, job, batch_size=16, chunk_size=32, progress=False)
    t = time.perf_counter()
    cache = ActivationCache.open(job.path, job.key)
    assert time.perf_counter() - t < 1.0
    assert isinstance(cache.arrays["heads"], np.memmap)


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


def test_cache_of_another_model_or_format_is_never_reused(tmp_path):
    model, job = make_job(str(tmp_path), n=20)
    build_cache(model, job, batch_size=16, chunk_size=32, progress=False)
    for field, value in (
        ("model_name", "ViT-B-16"),
        ("format_version", 0),
        ("dataset", "mnist"),
        ("preprocessing", "x"),
    ):
        other = CacheKey(**{**job.key.__dict__, field: value})
        with pytest.raises(CacheError, match=field):
            ActivationCache.open(job.path, other)


def test_nan_contributions_are_refused_when_written(tmp_path):
    key = CacheKey("m", "random", "d", "train", "s", "p", "default")
    writer = CacheWriter(
        tmp_path / "c",
        key,
        4,
        (1, 1, 2, 3),
        ["emb", "l0.mlp", "l0.h0"],
        torch.zeros(1, 1, 3, 2),
        chunk_size=4,
    )
    bad = Contributions(
        heads=torch.zeros(4, 1, 1, 2),
        mlps=torch.full((4, 1, 3), float("nan")),
        emb=torch.zeros(4, 3),
        head_maps=torch.zeros(1, 1, 3, 2),
        names=[],
    )
    writer.write(np.arange(4), bad, torch.zeros(4, dtype=torch.long))
    with pytest.raises(CacheError, match=r"non-finite .* samples 0-4"):
        writer.commit_chunk(0)


def test_deleting_refuses_paths_outside_the_cache_root(tmp_path):
    root = tmp_path / "root"
    (root / "c").mkdir(parents=True)
    (root / "c" / "meta.json").write_text("{}")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "meta.json").write_text("{}")
    with pytest.raises(CacheError, match="not a folder inside the cache root"):
        remove_cache(root / ".." / "precious", root)
    (root / "link").symlink_to(outside)
    with pytest.raises(CacheError, match="not a folder inside"):
        remove_cache(root / "link", root)
    with pytest.raises(CacheError, match="not a cache folder"):
        (root / "empty").mkdir()
        remove_cache(root / "empty", root)
    remove_cache(root / "c", root)
    assert outside.exists() and not (root / "c").exists()

"""Reliability: bad input gets a clear error, faults leave no half-written state, runs are reproducible."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_cache import make_job

from residual_lightning.cli import main
from residual_lightning.data.batch import CachedBatch
from residual_lightning.data.cache import ActivationCache, CacheError, CacheKey, CacheWriter, remove_cache
from residual_lightning.data.extract import build_cache
from residual_lightning.model import ResidualModel
from residual_lightning.units import CompactContributions

ROOT = Path(__file__).parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
SHAPE = (4, 4, 64, 128)


def tiny_model(**kw) -> ResidualModel:
    return ResidualModel(class_names=[str(i) for i in range(10)], shape=SHAPE, **kw)


def test_disk_full_during_extraction_leaves_no_complete_cache(tmp_path, monkeypatch):
    model, job = make_job(str(tmp_path), n=96)
    original = CacheWriter.commit_chunk
    calls = []

    def failing(self, chunk):
        calls.append(chunk)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, chunk)

    monkeypatch.setattr(CacheWriter, "commit_chunk", failing)
    with pytest.raises(OSError, match="No space left"):
        build_cache(model, job, batch_size=16, chunk_size=32, progress=False)
    assert not json.loads((job.path / "meta.json").read_text())["complete"]
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache.open(job.path, job.key)
    monkeypatch.setattr(CacheWriter, "commit_chunk", original)
    cache = build_cache(model, job, batch_size=16, chunk_size=32, progress=False)  # resumes
    assert len(cache) == 96
    ActivationCache.open(job.path, job.key)  # every checksum verified


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
    bad = CompactContributions(
        heads=torch.zeros(4, 1, 1, 2),
        mlps=torch.full((4, 1, 3), float("nan")),
        emb=torch.zeros(4, 3),
        head_maps=torch.zeros(1, 1, 3, 2),
        names=[],
    )
    writer.write(np.arange(4), bad, torch.zeros(4, dtype=torch.long))
    with pytest.raises(CacheError, match=r"non-finite .* samples 0-4"):
        writer.commit_chunk(0)


def test_nan_loss_stops_training_naming_the_step():
    model = tiny_model(method="linear")
    model._build_adapter(None)
    batch = CachedBatch(
        torch.full((2, 4, 4, 64), float("nan")),
        torch.zeros(2, 4, 128),
        torch.zeros(2, 128),
        torch.zeros(2, dtype=torch.long),
    )
    with pytest.raises(FloatingPointError, match="train loss is nan at step"):
        model.training_step(batch, 0)


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


def test_incompatible_adapter_option_is_refused_at_construction():
    with pytest.raises(
        ValueError, match=r"\['others'\] do not apply to method 'coarse'; its options: init, seed"
    ):
        tiny_model(method="coarse", adapter={"others": "zero"})


def test_checkpoint_of_another_backbone_is_refused():
    model = tiny_model(method="residual")
    ckpt = {
        "hyper_parameters": {
            "backbone": {"model_name": "ViT-B-16", "pretrained": "openai", "precision": "fp32"}
        }
    }
    with pytest.raises(ValueError, match="checkpoint was trained with backbone=.*ViT-B-16"):
        model.on_load_checkpoint(ckpt)


def test_missing_ckpt_path_is_named(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="nonexistent.ckpt"):
        main(
            [
                "test",
                "--config",
                QUICK,
                "--data.cache_dir",
                str(tmp_path),
                "--ckpt_path",
                str(tmp_path / "nonexistent.ckpt"),
            ]
        )


@pytest.mark.slow
def test_same_seed_gives_identical_lambdas(tmp_path):
    from residual_lightning.data.datamodule import ResidualDataModule

    dm = ResidualDataModule(dataset="digits", cache_dir=str(tmp_path), dataset_options={"image_size": 64})
    dm.prepare_data()
    runs = []
    for _ in range(2):
        L.seed_everything(0)
        model = ResidualModel(
            method="residual", class_names=dm.class_names, shape=dm.shape, backbone=dm.backbone
        )
        t = L.Trainer(
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            deterministic=True,
        )
        t.fit(model, dm)
        runs.append({k: v.clone() for k, v in model.state_dict().items() if k.endswith("_lambdas")})
    assert runs[0].keys() == runs[1].keys() and runs[0]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


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

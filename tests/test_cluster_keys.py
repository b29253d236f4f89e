"""The cache key holds across nodes: a cache built by a job with the data under one absolute path is
reused, without extracting, by a job (another node) that sees the same files under another path;
the data digests a multi-rank run keys its caches by come from rank 0."""

from __future__ import annotations

import shutil

import pytest

from residual_lightning.data import datamodule as datamodule_module
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.data.extract import build_caches
from residual_lightning.units import BackboneSpec
from tests.test_trust import make_folder


def folder_module(root, cache) -> ResidualDataModule:
    return ResidualDataModule(
        BackboneSpec("RL-Tiny-ViT-64"),
        "imagefolder",
        root=str(root),
        dataset_options={"image_size": 64},
        cache_dir=str(cache),
        chunk_size=8,
    )


def test_cache_built_on_one_node_is_reused_with_the_data_elsewhere(tmp_path, monkeypatch):
    node_a = make_folder(tmp_path / "node-a" / "scratch" / "pets")
    node_b = tmp_path / "node-b" / "mnt" / "data" / "copy-of-pets"
    shutil.copytree(node_a, node_b)
    cache = tmp_path / "shared-cache"
    first = folder_module(node_a, cache)
    built = build_caches(first)
    second = folder_module(node_b, cache)
    assert second.cache_paths() == first.cache_paths()
    assert second.missing() == []

    def no_extraction(*args, **kwargs):
        raise AssertionError("the second job extracted again")

    monkeypatch.setattr(datamodule_module, "build_cache", no_extraction)
    monkeypatch.setattr(datamodule_module, "ShardedBuild", no_extraction)
    second.prepare_data()
    second.setup("fit")
    assert {p: c.path for p, c in second.caches.items()} == {p: c.path for p, c in built.items()}


def test_a_different_file_under_the_other_path_is_another_cache(tmp_path):
    node_a = make_folder(tmp_path / "a")
    node_b = tmp_path / "b"
    shutil.copytree(node_a, node_b)
    victim = sorted(node_b.glob("dog/*.bmp"))[0]
    victim.unlink()  # one file fewer on the other node: its train/val/test keys cannot all match
    first, second = folder_module(node_a, tmp_path / "c"), folder_module(node_b, tmp_path / "c")
    assert first.cache_paths() != second.cache_paths()


@pytest.mark.parametrize("rank", [0, 1])
def test_digests_come_from_rank_zero(tmp_path, monkeypatch, rank):
    dm = folder_module(make_folder(tmp_path / "d"), tmp_path / "c")
    sent = []

    def broadcast(box, src):
        sent.append((list(box), src))
        box[0] = {"train": "r0-train", "val": "r0-val", "test": "r0-test"}

    monkeypatch.setattr(dm, "_rank_world", lambda: (rank, 2))
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.broadcast_object_list", broadcast)
    dm._share_digests()
    assert sent[0][1] == 0 and (sent[0][0][0] is None) == (rank != 0)
    assert dm.key("train", "eval").data == "r0-train"

"""`setup` with several ranks (rank and broadcasts mocked, one process): checksums are verified on
rank 0 only and its verdict is every rank's; whether caches are missing is rank 0's decision."""

from __future__ import annotations

import types

import pytest

from residual_lightning.data import datamodule as datamodule_module
from residual_lightning.data.cache import ActivationCache
from residual_lightning.data.extract import build_caches
from residual_lightning.files import CacheError
from tests.test_cluster_keys import folder_module
from tests.test_trust import make_folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster-setup")
    root, cache = make_folder(tmp / "data"), tmp / "cache"
    build_caches(folder_module(root, cache))
    return root, cache


def as_rank(monkeypatch, dm, rank: int, rank0_verdict: str | None = None) -> list:
    """Make `dm` rank `rank` of 2; rank 0's broadcasts say `rank0_verdict`; count verifications."""
    verified = []
    monkeypatch.setattr(dm, "_rank_world", lambda: (rank, 2))

    def rank0_says(value, world):
        if rank == 0:
            return value
        return ([], None) if isinstance(value, tuple) else rank0_verdict

    monkeypatch.setattr(datamodule_module, "rank0_says", rank0_says)
    original = ActivationCache.verify
    monkeypatch.setattr(ActivationCache, "verify", lambda self: (verified.append(self.path), original(self)))
    return verified


def test_only_rank_zero_verifies(built, monkeypatch):
    root, cache = built
    for rank, expected in ((0, 3), (1, 0)):
        dm = folder_module(root, cache)
        verified = as_rank(monkeypatch, dm, rank)
        dm.setup("fit")
        assert len(verified) == expected and len(dm.caches) == 3


def test_rank_zero_finding_a_corrupt_cache_stops_every_rank(built, monkeypatch):
    root, cache = built
    dm = folder_module(root, cache)
    as_rank(monkeypatch, dm, 1, rank0_verdict="cache at X is corrupt: checksum mismatch in chunk 0")
    with pytest.raises(CacheError, match="corrupt: checksum mismatch in chunk 0 \\(found by rank 0\\)"):
        dm.setup("fit")


def test_missing_caches_are_rank_zeros_decision(built, monkeypatch):
    root, cache = built
    dm = folder_module(root, cache)
    as_rank(monkeypatch, dm, 1)
    monkeypatch.setattr(dm, "missing", lambda: pytest.fail("rank 1 looked for missing caches itself"))
    monkeypatch.setattr(dm, "_build_sharded", lambda: pytest.fail("rank 0 said nothing is missing"))
    dm.setup("fit")
    assert len(dm.caches) == 3


@pytest.mark.parametrize(
    ("global_rank", "local_rank", "per_node", "downloads"),
    [(0, 0, False, True), (1, 0, False, False), (1, 0, True, True), (1, 1, True, False)],
)
def test_data_is_prepared_by_one_process_then_a_barrier(
    tmp_path, monkeypatch, global_rank, local_rank, per_node, downloads
):
    dm = folder_module(make_folder(tmp_path / "data", per_class=4), tmp_path / "cache")
    dm.download, dm.prepare_data_per_node = True, per_node
    events = []
    real = datamodule_module.load_parts

    def load_parts(*args):
        events.append(("download" if args[7] else "read", args[2] is not None))
        return real(*args)

    monkeypatch.setattr(datamodule_module, "load_parts", load_parts)
    barrier = types.SimpleNamespace(barrier=lambda name: events.append(("barrier", name)))
    dm.trainer = types.SimpleNamespace(
        global_rank=global_rank, local_rank=local_rank, world_size=4, strategy=barrier
    )
    jobs = dm.distributed_jobs(types.SimpleNamespace(transform=lambda image: image))
    assert len(jobs) == 3
    cut = events.index(("barrier", "prepare-data"))
    assert ("download" in [e[0] for e in events[:cut]]) == downloads
    assert all(kind == "read" for kind, _ in events[cut + 1 :])  # after the barrier nobody downloads

"""Multi-process runs with no caches yet (CPU, gloo, random free ports): a 2-process DDP `fit` builds
the missing caches itself, sharded across its ranks, then trains and tests the best checkpoint; a
two-"node" torchrun `extract` (one process per node) builds one cache into one shared folder; a
grid of three fits started together on one cache folder builds each file once (the first paused by
the test hook while the others wait for its locks) and gives three identical runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from residual_lightning.data.cache import ActivationCache
from tests.cli_helpers import ROOT, quick_args
from tests.test_cluster_concurrent import SCRIPT, extract_argv, free_port, start, wait_for

CPU_DDP = ("--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")


def run(argv: list[str], **env: str) -> subprocess.Popen:
    """Start a command in the repository with PYTHONPATH set and extra environment."""
    full = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen(
        argv, cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def verified_caches(cache) -> dict[str, int]:
    """Samples of each complete cache folder, every chunk checksum verified."""
    return {p.name: len(ActivationCache.open(p)) for p in sorted(cache.iterdir()) if p.is_dir()}


@pytest.mark.slow
def test_two_process_fit_builds_missing_caches_then_tests_the_best_checkpoint(tmp_path):
    cache = tmp_path / "cache"
    argv = [SCRIPT, "fit", *quick_args(tmp_path, cache, "--trainer.max_epochs", "2", "--report", "false")]
    proc = run([*argv, "--trainer.devices", "2", *CPU_DDP], MASTER_PORT=str(free_port()))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "are missing" not in out
    assert sorted(verified_caches(cache).values()) == [359, 360, 1078]
    best = list(tmp_path.glob("runs/quickstart/version_*/checkpoints/best-*.ckpt"))
    assert len(best) == 1 and f"Restoring states from the checkpoint path at {best[0]}" in out
    assert "residual test accuracy" in out


@pytest.mark.slow
def test_two_node_torchrun_extract_builds_one_cache(tmp_path):
    cache, port = tmp_path / "cache", free_port()
    nodes = [
        run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "residual_lightning.cli",
                *extract_argv(cache, tmp_path / f"node{node}")[1:],
                "--trainer.num_nodes",
                "2",
                "--trainer.devices",
                "1",
                *CPU_DDP,
            ]
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=900)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert sorted(verified_caches(cache).values()) == [359, 360, 1078]
    assert "caches ready under" in outs[0]  # global rank 0 (node 0) marked them complete


@pytest.mark.slow
def test_grid_of_three_fits_started_together_shares_the_caches(tmp_path):
    cache, release = tmp_path / "cache", tmp_path / "release"
    logs = [tmp_path / f"fit{i}.log" for i in range(3)]
    argv = [SCRIPT, "fit", "--trainer.max_epochs", "1", "--report", "false"]
    pause = {"RESIDUAL_LIGHTNING_TEST_PAUSE_AT": f"finalize:{release}"}
    procs = [start([*argv, *quick_args(tmp_path / "run0", cache)], logs[0], **pause)]
    wait_for("the first fit to reach finalize", Path(f"{release}.reached").exists, procs, logs)
    procs += [start([*argv, *quick_args(tmp_path / f"run{i}", cache)], logs[i]) for i in (1, 2)]
    for i in (1, 2):  # both wait for the cache the first one is building
        wait_for(f"fit {i} to wait", lambda i=i: "waiting for" in logs[i].read_text(), procs, logs)
    release.touch()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    assert sorted(verified_caches(cache).values()) == [359, 360, 1078]
    assert len(list(cache.glob("bases-*.safetensors"))) == 1
    assert len(list(cache.glob("classifier-*.safetensors"))) == 1
    accs = [
        float(
            next((tmp_path / f"run{i}").glob("runs/quickstart/version_*/checkpoints/best-*.ckpt")).stem.split(
                "acc"
            )[-1]
        )
        for i in range(3)
    ]
    assert max(accs) - min(accs) <= 0.02, accs  # same caches and seed (bases fitted once, then read back)

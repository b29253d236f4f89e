"""Cluster-safe building (`residual_lightning.locks`, `page_groups`): a lock left by a killed process
is recovered, a filesystem without flock still gets a working lock, a waiter says who holds the
lock and gives up with a clear message, and ranks never write one page of a cache file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from residual_lightning.data.cache import ActivationCache, CacheKey, CacheWriter
from residual_lightning.data.extract import build_cache
from residual_lightning.data.writer import PAGE, chunk_byte_ranges, page_groups
from residual_lightning.files import CacheError, temporary_name
from residual_lightning.locks import BuildLock
from tests.helpers import make_job

ROOT = Path(__file__).parents[1]

# A child that takes the build lock of argv[1] (flock failing with argv[2] when not 0) and sleeps.
HOLDER = textwrap.dedent(
    """
    import contextlib, sys, time
    from unittest import mock
    from residual_lightning.locks import BuildLock
    code = int(sys.argv[2])
    def no_flock(fd, op):
        raise OSError(code, "flock not supported (mocked)")
    with mock.patch("fcntl.flock", no_flock) if code else contextlib.nullcontext():
        lock = BuildLock(sys.argv[1]).acquire()
        print("HELD", flush=True)
        time.sleep(600)
    """
)


def no_flock(code: int):
    calls = []

    def flock(fd, op):
        calls.append(op)
        raise OSError(code, "flock not supported (mocked)")

    return flock, calls


@pytest.mark.parametrize("code", [0, errno.ENOSYS, errno.ENOLCK], ids=["flock", "soft-enosys", "soft-enolck"])
def test_lock_of_a_killed_holder_is_recovered(tmp_path, monkeypatch, code):
    target = tmp_path / "cache-folder"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target), str(code)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if code:  # this process sees the same filesystem without flock
        monkeypatch.setattr(fcntl, "flock", no_flock(code)[0])
    try:
        assert proc.stdout.readline().strip() == "HELD"
        with pytest.raises(CacheError, match=rf"timed out .* pid {proc.pid}"):  # really held meanwhile
            BuildLock(target, timeout=0.3, poll=0.1).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with BuildLock(target, timeout=20, poll=0.1) as lock:
        assert json.loads(lock.holder_file.read_text())["pid"] == os.getpid()
    assert not lock.holder_file.exists()


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_build_without_flock_is_safe(tmp_path, monkeypatch, code):
    flock, calls = no_flock(code)
    monkeypatch.setattr(fcntl, "flock", flock)
    model, job = make_job(str(tmp_path), n=40, dtype="float32")
    with pytest.warns(UserWarning, match="flock"):
        build_cache(model, job, batch_size=16, chunk_size=16, progress=False)
    assert calls, "the mocked flock was never called: the test proves nothing"
    ActivationCache.open(job.path, job.key)  # complete, every checksum verified
    # held by us (soft), another lock on the same cache waits and times out
    with BuildLock(job.path):
        with pytest.raises(CacheError, match="timed out"):
            BuildLock(job.path, timeout=0.2, poll=0.1).acquire()


def test_waiter_names_the_holder(tmp_path, caplog):
    with BuildLock(tmp_path / "x"):
        with pytest.raises(CacheError, match=rf"host .* pid {os.getpid()}.*delete .*x\.lock"):
            BuildLock(tmp_path / "x", timeout=0.2, poll=0.1).acquire()
    assert f"pid {os.getpid()}" in caplog.text and "waiting for" in caplog.text


def test_lock_timeout_environment_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDUAL_LIGHTNING_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="RESIDUAL_LIGHTNING_LOCK_TIMEOUT='soon'"):
        BuildLock(tmp_path / "x")


def test_temporary_names_are_unique_per_process_and_call(tmp_path):
    names = {temporary_name(tmp_path / "classifier.safetensors") for _ in range(50)}
    assert len(names) == 50 and all(f"-{os.getpid()}-" in n.name for n in names)


@pytest.mark.parametrize(
    ("n", "shape", "chunk_size"),
    [(1797, (2, 2, 16, 64), 64), (1000, (3, 4, 8, 48), 100), (700, (2, 2, 16, 64), 1024)],
)
def test_ranks_never_write_one_page(tmp_path, n, shape, chunk_size):
    layers, heads, k, d = shape
    key = CacheKey("m", "w", "d", "train", "all", "eval", "default", "float16")
    maps = torch.randn(layers, heads, d, k)
    writer = CacheWriter(
        tmp_path / "c", key, n, shape, [f"u{i}" for i in range(1 + layers + layers * heads)], maps, chunk_size
    )
    assert all(arr.offset == PAGE for arr in writer.arrays.values())  # the page-sized header
    groups = page_groups(writer.arrays, chunk_size, writer.pending_chunks())
    assert sorted(c for g in groups for c in g) == list(range(writer.num_chunks))
    pages = {}  # page of each file -> group writing it
    for g, group in enumerate(groups):
        for chunk in group:
            for name, (first, end) in chunk_byte_ranges(writer.arrays, chunk_size, chunk).items():
                for page in range(first // PAGE, (end - 1) // PAGE + 1):
                    assert pages.setdefault((name, page), g) == g, (
                        f"{name} page {page} is written by two groups"
                    )
    if chunk_size % 64 == 0 and writer.num_chunks > 1:
        assert len(groups) > 1  # page-aligned chunks can be spread over ranks
    assert np.load(tmp_path / "c" / "heads.npy", mmap_mode="r").shape == (n, layers, heads, k)


def test_unaligned_chunks_stay_with_one_rank(tmp_path):
    key = CacheKey("m", "w", "d", "train", "all", "eval", "default", "float16")
    writer = CacheWriter(
        tmp_path / "c", key, 90, (1, 1, 3, 5), ["emb", "mlp0", "h0"], torch.randn(1, 1, 5, 3), 7
    )
    groups = page_groups(writer.arrays, 7, writer.pending_chunks())
    assert groups == [list(range(writer.num_chunks))]  # no chunk start lands on a page boundary

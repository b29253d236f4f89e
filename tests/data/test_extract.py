"""Extraction (`residual_lightning.data.extract`): the cache holds the exact contributions; a killed or
failed extraction leaves no complete cache and resumes to an identical one; concurrent builders
leave one valid cache."""

from __future__ import annotations

import errno
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

from residual_lightning.data.cache import ActivationCache, CacheError, CacheWriter
from residual_lightning.data.extract import build_cache
from residual_lightning.units import decompose_compact
from tests.helpers import arrays_bytes, make_job

ROOT = Path(__file__).parents[2]  # child processes run here, so `tests.helpers` imports


# A child process that builds the digits test cache in small chunks; SIGKILLed mid-way by a test.
BUILD = textwrap.dedent(
    """
    import sys, time, torch
    from residual_lightning.data.extract import build_cache, ExtractionJob
    from residual_lightning.data import extract
    from tests.helpers import make_job
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


@pytest.mark.slow
def test_killed_extraction_resumes_to_identical_cache(tmp_path):
    ref_model, ref_job = make_job(str(tmp_path / "ref"))
    build_cache(ref_model, ref_job, batch_size=16, chunk_size=32, progress=False)
    root = tmp_path / "killed"
    cmd = [sys.executable, "-c", BUILD, str(root), "100", "0.4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "BUILT" in out.stdout, out.stderr[-2000:]
    assert arrays_bytes(job.path) == arrays_bytes(ref_job.path)


@pytest.mark.slow
def test_two_concurrent_builders_leave_one_valid_cache(tmp_path):
    cmd = [sys.executable, "-c", BUILD, str(tmp_path), "64", "0.05"]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all("BUILT" in o[0] for o in outs), [o[1][-1000:] for o in outs]
    _, job = make_job(str(tmp_path), 64)
    cache = ActivationCache.open(job.path, job.key)  # verifies every checksum
    assert len(cache) == 64 and len(list(tmp_path.glob("digits-*"))) == 2  # the folder and its lock


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

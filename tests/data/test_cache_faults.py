"""Activation cache faults: a full disk, torn and truncated files, layout changes, a concurrent finaliser.

Every fault ends in a `CacheError` naming the file (``on_mismatch: error``) or in a rebuilt cache
that opens and verifies (``on_mismatch: rebuild``, or a partial cache that holds nothing worth
keeping); none ends in a bare ValueError, a JSONDecodeError or a SIGBUS.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from residual_lightning.contributions import Contributions
from residual_lightning.data.cache import ActivationCache, CacheError, CacheKey, CacheWriter, write_cache
from residual_lightning.data.extract import ExtractionJob, Extractor, build_cache
from residual_lightning.files import NoSpaceError
from tests.helpers import arrays_bytes, make_job

ROOT = Path(__file__).parents[2]
N, CHUNK = 40, 16  # 3 chunks: 16 + 16 + 8


class Interrupt(Exception):
    """Stands for a kill after some chunks were recorded."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny model, its job, and a complete reference cache built once for the module."""
    model, job = make_job(str(tmp_path_factory.mktemp("ref")), n=N)
    build_cache(model, job, batch_size=8, chunk_size=CHUNK, progress=False)
    return model, job


def copy_of(reference, tmp_path) -> tuple[torch.nn.Module, ExtractionJob]:
    """A private copy of the complete reference cache, and a job pointing at it."""
    model, job = reference
    path = tmp_path / job.path.name
    shutil.copytree(job.path, path)
    return model, ExtractionJob(job.dataset, job.key, path)


def partial_of(reference, tmp_path, monkeypatch, chunks: int = 1, chunk_size: int = CHUNK):
    """A partial cache: its extraction stopped after `chunks` recorded chunks."""
    model, job = reference
    job = ExtractionJob(job.dataset, job.key, tmp_path / job.path.name)
    original = CacheWriter.commit_chunk
    calls = []

    def commit_then_stop(self, chunk):
        if len(calls) == chunks:
            raise Interrupt
        calls.append(chunk)
        original(self, chunk)

    with monkeypatch.context() as m:
        m.setattr(CacheWriter, "commit_chunk", commit_then_stop)
        with pytest.raises(Interrupt):
            build_cache(model, job, batch_size=8, chunk_size=chunk_size, progress=False)
    assert len(json.loads((job.path / "progress" / "rank0.json").read_text())) == chunks
    return model, job


def truncate(file: Path, size: int | None = None) -> None:
    """Cut a file to `size` bytes (default: half)."""
    os.truncate(file, file.stat().st_size // 2 if size is None else size)


def assert_same_as_reference(job: ExtractionJob, reference) -> None:
    cache = ActivationCache.open(job.path, job.key)  # verifies every checksum
    assert len(cache) == N and not (job.path / "progress").exists()
    assert arrays_bytes(job.path) == arrays_bytes(reference[1].path)


# ---------------------------------------------------------------- a complete cache's files

CORRUPTIONS = {
    "heads.npy": lambda f: truncate(f),
    "labels.npy": lambda f: truncate(f, 0),
    "meta.json": lambda f: truncate(f),
    "head_maps.safetensors": lambda f: truncate(f),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_damaged_file_of_a_complete_cache_is_named_or_rebuilt(reference, tmp_path, name):
    model, job = copy_of(reference, tmp_path)
    CORRUPTIONS[name](job.path / name)
    with pytest.raises(CacheError, match=re.escape(str(job.path / name))):
        build_cache(model, job, batch_size=8, chunk_size=CHUNK, on_mismatch="error", progress=False)
    with pytest.warns(UserWarning, match=f"{re.escape(name)}.*rebuilding"):
        build_cache(model, job, batch_size=8, chunk_size=CHUNK, on_mismatch="rebuild", progress=False)
    assert_same_as_reference(job, reference)


def test_opening_a_truncated_array_is_a_cache_error_not_a_value_error(reference, tmp_path):
    _, job = copy_of(reference, tmp_path)
    truncate(job.path / "mlps.npy")
    with pytest.raises(CacheError, match=r"mlps\.npy is missing, truncated or unreadable"):
        ActivationCache.open(job.path, job.key, verify=False)


def test_modified_head_maps_fail_verification(reference, tmp_path):
    _, job = copy_of(reference, tmp_path)
    file = job.path / "head_maps.safetensors"
    blob = bytearray(file.read_bytes())
    blob[-1] ^= 0x01  # one bit of the last float: still a readable file
    file.write_bytes(bytes(blob))
    ActivationCache.open(job.path, job.key, verify=False)
    with pytest.raises(CacheError, match=r"head_maps\.safetensors are corrupt"):
        ActivationCache.open(job.path, job.key)


def test_the_extractor_names_a_torn_cache_or_rebuilds_it_when_asked(reference, tmp_path):
    model, job = copy_of(reference, tmp_path)
    truncate(job.path / "meta.json")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(CacheError, match=re.escape(str(job.path / "meta.json"))):
        trainer.predict(Extractor(model, [job], batch_size=8, chunk_size=CHUNK), return_predictions=False)
    rebuild = Extractor(model, [job], batch_size=8, chunk_size=CHUNK, on_mismatch="rebuild")
    with pytest.warns(UserWarning, match="rebuilding"):
        trainer.predict(rebuild, return_predictions=False)
    assert_same_as_reference(job, reference)


# ---------------------------------------------------------------- a partial cache's files


@pytest.mark.parametrize(
    "damage",
    ["empty heads.npy", "header-only mlps.npy", "missing emb.npy", "truncated head_maps.safetensors"],
)
def test_a_partial_cache_with_an_unusable_file_restarts(reference, tmp_path, monkeypatch, caplog, damage):
    model, job = partial_of(reference, tmp_path, monkeypatch)
    kind, name = damage.split(" ")
    file = job.path / name
    if kind == "missing":
        file.unlink()
    elif kind == "header-only":  # as a kill while reserving its space would leave it
        truncate(file, file.stat().st_size - np.load(file, mmap_mode="r").nbytes)
    else:
        truncate(file, 0 if kind == "empty" else None)
    with caplog.at_level("WARNING", logger="residual_lightning.data.writer"):
        build_cache(model, job, batch_size=8, chunk_size=CHUNK, progress=False)
    assert f"restarting the partial cache {job.path}" in caplog.text and name in caplog.text
    assert_same_as_reference(job, reference)


def test_a_partial_cache_with_a_torn_meta_json_is_named_or_rebuilt(reference, tmp_path, monkeypatch):
    model, job = partial_of(reference, tmp_path, monkeypatch)
    truncate(job.path / "meta.json")
    with pytest.raises(CacheError, match=r"meta\.json is unreadable or torn"):
        build_cache(model, job, batch_size=8, chunk_size=CHUNK, progress=False)
    with pytest.warns(UserWarning, match="rebuilding"):
        build_cache(model, job, batch_size=8, chunk_size=CHUNK, on_mismatch="rebuild", progress=False)
    assert_same_as_reference(job, reference)


def test_a_partial_cache_restarts_when_the_chunk_size_changed(reference, tmp_path, monkeypatch, caplog):
    model, job = partial_of(reference, tmp_path, monkeypatch, chunk_size=8)
    with caplog.at_level("WARNING", logger="residual_lightning.data.writer"):
        cache = build_cache(model, job, batch_size=8, chunk_size=CHUNK, progress=False)
    assert "its layout changed (chunk_size 8 -> 16)" in caplog.text
    assert cache.meta["chunk_size"] == CHUNK and len(cache.meta["checksums"]) == 3
    assert_same_as_reference(job, reference)


def synthetic(n: int, seed: int = 0) -> tuple[Contributions, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    compact = Contributions(
        heads=torch.randn(n, 2, 2, 3, generator=g),  # (N, L, H, k)
        mlps=torch.randn(n, 2, 5, generator=g),  # (N, L, D)
        emb=torch.randn(n, 5, generator=g),  # (N, D)
        head_maps=torch.randn(2, 2, 5, 3, generator=g),  # (L, H, D, k)
        names=["emb", "l0.mlp", "l1.mlp", "l0.h0", "l0.h1", "l1.h0", "l1.h1"],
    )
    return compact, torch.arange(n) % 3


def synthetic_writer(path: Path, n: int, chunk_size: int = 4) -> CacheWriter:
    compact, _ = synthetic(n)
    key = CacheKey("m", "random", "d", "train", "s", "p", "default", "float32")
    return CacheWriter(path, key, n, (2, 2, 3, 5), compact.names, compact.head_maps, chunk_size=chunk_size)


def write_chunks(writer: CacheWriter, chunks: list[int]) -> None:
    compact, labels = synthetic(writer.n)
    for chunk in chunks:
        start, stop = writer.chunk_range(chunk)
        part = compact[start:stop]
        writer.write(np.arange(start, stop), part, labels[start:stop])
        writer.commit_chunk(chunk)


def test_a_partial_cache_restarts_when_the_number_of_samples_changed(tmp_path, caplog):
    write_chunks(synthetic_writer(tmp_path / "c", 10), [0])
    with caplog.at_level("WARNING", logger="residual_lightning.data.writer"):
        writer = synthetic_writer(tmp_path / "c", 12)
    assert "num_samples 10 -> 12" in caplog.text
    assert writer.pending_chunks() == [0, 1, 2]
    write_chunks(writer, [0, 1, 2])
    writer.finalize()
    assert len(ActivationCache.open(tmp_path / "c")) == 12


def test_a_partial_cache_of_another_key_is_still_refused(tmp_path):
    write_chunks(synthetic_writer(tmp_path / "c", 8), [0])
    compact, _ = synthetic(8)
    other = CacheKey("m", "random", "d", "train", "s", "p", "equal_share", "float32")
    with pytest.raises(CacheError, match=r"meta\.json belongs to a cache of another key"):
        CacheWriter(tmp_path / "c", other, 8, (2, 2, 3, 5), compact.names, compact.head_maps, chunk_size=4)


# ---------------------------------------------------------------- chunk size, concurrency


@pytest.mark.parametrize("chunk_size", [0, -4])
def test_a_chunk_size_that_is_not_positive_is_refused(tmp_path, chunk_size):
    with pytest.raises(ValueError, match=f"chunk_size must be a positive integer, got {chunk_size}$"):
        synthetic_writer(tmp_path / "c", 8, chunk_size=chunk_size).pending_chunks()
    assert not (tmp_path / "c").exists()


def test_a_writer_whose_cache_another_process_finalised_neither_crashes_nor_reopens_it(tmp_path):
    first, second = synthetic_writer(tmp_path / "c", 8), synthetic_writer(tmp_path / "c", 8)
    write_chunks(first, [0, 1])
    first.finalize()  # removes progress/
    write_chunks(second, [1])  # commits into a cache that is complete now
    assert second.finished and second.finalize() == tmp_path / "c"
    assert not (tmp_path / "c" / "progress").exists()
    assert synthetic_writer(tmp_path / "c", 8).pending_chunks() == []
    cache = ActivationCache.open(tmp_path / "c")  # verifies every checksum
    torch.testing.assert_close(cache.batch(np.arange(8)).heads, synthetic(8)[0].heads)


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_is_a_no_space_error_before_anything_is_written(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    compact, labels = synthetic(64)
    key = CacheKey("m", "random", "d", "train", "s", "p", "default", "float32")
    with pytest.raises(NoSpaceError) as info:
        write_cache(tmp_path / "c", key, compact, labels, chunk_size=16)
    err = info.value
    assert isinstance(err, CacheError) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    maps = len(safetensors_bytes({"head_maps": compact.head_maps}))
    needed = 4 * (compact.heads.numel() + compact.mlps.numel() + compact.emb.numel()) + 8 * 64 + maps
    assert f"No space left on device for the activation cache {tmp_path / 'c'}: creating heads.npy" in str(
        err
    )
    assert re.search(rf"needs {needed} bytes \(0\.0 MiB\), \d+ bytes \([\d.]+ MiB\) are free", str(err)), err
    assert not list((tmp_path / "c").glob("*.npy")), "a short array was left behind"


@pytest.mark.parametrize("how", ["fallocate", "zeros"])
def test_arrays_are_allocated_on_disk_before_extraction(tmp_path, monkeypatch, how):
    if how == "zeros":  # a filesystem without fallocate: the space is reserved by writing zeros

        def unsupported(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

        monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    writer = synthetic_writer(tmp_path / "c", 4000)
    for name, arr in writer.arrays.items():  # not sparse: a memory-mapped write cannot meet a full disk
        st = (tmp_path / "c" / f"{name}.npy").stat()
        assert st.st_blocks * 512 >= arr.nbytes, f"{name}.npy is sparse: {st.st_blocks * 512} < {arr.nbytes}"
    write_chunks(writer, list(range(writer.num_chunks)))
    writer.finalize()
    cache = ActivationCache.open(tmp_path / "c")
    torch.testing.assert_close(cache.batch(np.arange(4000)).mlps, synthetic(4000)[0].mlps)


# A child that extracts 600 digits images (heads.npy alone is 1.2 MB) into the folder argv[1].
FILL = textwrap.dedent(
    """
    import sys
    from tests.helpers import make_job
    from residual_lightning.data.cache import ActivationCache
    from residual_lightning.data.extract import build_cache
    model, job = make_job(sys.argv[1], 600)
    build_cache(model, job, batch_size=64, chunk_size=128, progress=False)
    print("BUILT", len(ActivationCache.open(job.path, job.key)))
    """
)

# In a private mount namespace: a 1 MiB tmpfs, extract (must fail cleanly), grow it, extract again.
SMALL_THEN_BIG = """
mount -t tmpfs -o size=1m tmpfs "$1" || exit 99
"$2" "$3" "$1" >"$4/out1" 2>"$4/err1"; echo $? >"$4/rc1"
mount -o remount,size=64m tmpfs "$1" || exit 98
"$2" "$3" "$1" >"$4/out2" 2>"$4/err2"; echo $? >"$4/rc2"
"""


@pytest.mark.slow
def test_extraction_on_a_really_full_disk_fails_cleanly_and_reruns_with_space(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a 1 MiB tmpfs in a private mount namespace")
    folder, logs, script = tmp_path / "small", tmp_path / "logs", tmp_path / "fill.py"
    folder.mkdir()
    logs.mkdir()
    script.write_text(FILL)
    mount = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1"', "sh", str(folder)]
    probe = subprocess.run(mount, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()[-300:]}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    args = ["sh", str(folder), sys.executable, str(script), str(logs)]
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c", SMALL_THEN_BIG, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    rc1, err1 = int((logs / "rc1").read_text()), (logs / "err1").read_text()
    assert rc1 == 1, f"exit {rc1} (135 is a SIGBUS): {err1[-2000:]}"
    assert "NoSpaceError: [Errno 28] No space left on device for the activation cache" in err1, err1[-2000:]
    assert f"{folder}/digits-test-RL-Tiny-ViT-64-" in err1
    assert re.search(r"needs \d+ bytes \([\d.]+ MiB\), \d+ bytes \([\d.]+ MiB\) are free", err1), err1[-2000:]
    rc2, out2 = int((logs / "rc2").read_text()), (logs / "out2").read_text()
    assert rc2 == 0 and "BUILT 600" in out2, (logs / "err2").read_text()[-2000:]

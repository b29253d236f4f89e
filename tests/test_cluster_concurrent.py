"""Concurrent `residual-lightning extract` commands (one process, and 2-process DDP) on one cache
folder: the race is forced by the test hook ``RESIDUAL_LIGHTNING_TEST_PAUSE_AT`` (the first
command pauses while holding the build locks, just before marking its caches complete; the second
starts then), so these cannot pass by luck. Both exit 0 and leave one valid cache, byte-identical
to a single run's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from residual_lightning.data.cache import ActivationCache
from tests.cli_helpers import QUICK, ROOT

SCRIPT = str(Path(sys.executable).parent / "residual-lightning")
ARRAYS = ("heads.npy", "mlps.npy", "emb.npy", "labels.npy")


def free_port() -> int:
    """A TCP port free now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extract_argv(cache: Path, root: Path, *extra: str) -> list[str]:
    """`residual-lightning extract` of the quickstart into `cache`."""
    return [
        SCRIPT,
        "extract",
        "--config",
        QUICK,
        "--data.cache_dir",
        str(cache),
        "--data.chunk_size",
        "256",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def start(argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start a command with its output in `log` (a fresh random port for DDP)."""
    full = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port()), **env)
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT)


def wait_for(what: str, done, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> None:
    """Wait until `done()`, failing (with the logs) if a process exits first or time runs out."""
    deadline = time.time() + timeout
    while not done():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.time() > deadline:
            for p in procs:
                p.kill()
            tails = "\n".join(log.read_text()[-3000:] for log in logs)
            pytest.fail(f"{what}: {'a process exited' if dead else 'timed out'}\n{tails}")
        time.sleep(0.2)


def cache_contents(cache: Path) -> dict[str, tuple]:
    """Each cache folder's array bytes and chunk checksums, after verifying every checksum."""
    out = {}
    for meta_file in sorted(cache.glob("*/meta.json")):
        folder = meta_file.parent
        ActivationCache.open(folder)  # complete, every chunk verified
        meta = json.loads(meta_file.read_text())
        out[folder.name] = (meta["checksums"], [(folder / a).read_bytes() for a in ARRAYS])
    return out


def race(tmp_path: Path, *extra: str) -> None:
    """Two extract commands on one cache, the second started while the first holds the locks."""
    cache, release = tmp_path / "cache", tmp_path / "release"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = start(
        extract_argv(cache, tmp_path / "a", *extra),
        logs[0],
        RESIDUAL_LIGHTNING_TEST_PAUSE_AT=f"finalize:{release}",
    )
    wait_for("the first extract to reach finalize", Path(f"{release}.reached").exists, [first], logs)
    second = start(extract_argv(cache, tmp_path / "b", *extra), logs[1])
    wait_for(
        "the second extract to wait for the lock",
        lambda: "waiting for" in logs[1].read_text(),
        [first, second],
        logs,
    )
    assert f"pid {first.pid}" in logs[1].read_text()  # the message names the holder (rank 0)
    release.touch()
    for proc, log in zip((first, second), logs, strict=True):
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    assert "Traceback" not in logs[1].read_text()
    single = tmp_path / "single"
    proc = subprocess.run(
        extract_argv(single, tmp_path / "s", *extra),
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    built, reference = cache_contents(cache), cache_contents(single)
    assert len(built) == 3 and built == reference
    assert not list(cache.glob("**/*.tmp")) and not list(cache.glob("*/progress"))


@pytest.mark.slow
def test_two_concurrent_extracts_build_one_cache(tmp_path):
    race(tmp_path)


@pytest.mark.slow
def test_two_concurrent_ddp_extracts_build_one_cache(tmp_path):
    race(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")

"""Build locks: one builder of a derived file (cache, bases, classifier) at a time, across
processes, jobs and nodes that share a filesystem.

`BuildLock` wraps `filelock.FileLock` (``flock``). Where ``flock`` raises ENOSYS (Lustre mounted
without ``-o flock``) filelock itself falls back to a soft lock, a marker file recording host and
pid that a later process breaks when that process is gone; where ``flock`` raises another "not
supported here" error (ENOLCK on NFS without lockd, EOPNOTSUPP) `BuildLock` uses that soft lock
explicitly, with a warning. A process waiting for a lock says once who holds it (host, pid, since
when, read from ``<file>.lock.holder``), and gives up with a `CacheError` after ``timeout``
seconds (``RESIDUAL_LIGHTNING_LOCK_TIMEOUT``; default: wait as long as it takes). A lock held by a
killed process is free again: the kernel drops a ``flock`` with its process, and filelock breaks a
soft lock whose recorded process is gone.

`pause_point` is a test hook: ``RESIDUAL_LIGHTNING_TEST_PAUSE_AT=<point>:<release file>`` makes
the process that reaches `<point>` create ``<release file>.reached`` and wait until ``<release
file>`` exists, so a test can force a race deterministically.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
import warnings
from pathlib import Path

import filelock

from residual_lightning.files import CacheError, atomic_write_json, read_json

log = logging.getLogger(__name__)

LOCK_TIMEOUT_ENV = "RESIDUAL_LIGHTNING_LOCK_TIMEOUT"
PAUSE_ENV = "RESIDUAL_LIGHTNING_TEST_PAUSE_AT"
# flock errors meaning "no flock on this filesystem" that filelock does not fall back on itself
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def lock_timeout() -> float | None:
    """Seconds to wait for a build lock (``RESIDUAL_LIGHTNING_LOCK_TIMEOUT``; None: no limit)."""
    value = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={value!r} must be positive (seconds)")
    return seconds


class BuildLock:
    """The lock of one derived file or cache folder: ``<target>.lock`` beside it.

    Args:
        target: the file or cache folder being built.
        timeout: seconds to wait before a `CacheError` (default: `lock_timeout`).
        poll: seconds between attempts (and before the "waiting" message).
    """

    def __init__(self, target: str | Path, timeout: float | None = None, poll: float = 0.5) -> None:
        self.target = Path(target)
        self.path = Path(f"{self.target}.lock")
        self.holder_file = Path(f"{self.path}.holder")
        self.timeout = lock_timeout() if timeout is None else timeout
        self.poll = poll
        self._lock: filelock.BaseFileLock = filelock.FileLock(str(self.path))
        self.soft = False

    def holder(self) -> str:
        """Who holds the lock, as recorded by its holder (``unknown`` when not recorded)."""
        try:
            info = read_json(self.holder_file, "lock holder file")
            return f"host {info['host']} pid {info['pid']} since {info['since']}"
        except (CacheError, KeyError, TypeError):
            return "an unknown process"

    def acquire(self) -> BuildLock:
        """Wait for the lock (saying once who holds it), then record this process as its holder.

        Raises:
            CacheError: still held after ``timeout`` seconds, naming the holder and the lock file.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start, told = time.monotonic(), False
        while True:
            try:
                self._lock.acquire(timeout=self.poll)
                break
            except filelock.Timeout:
                waited = time.monotonic() - start
                if not told:
                    log.warning(
                        "waiting for %s: it is being built by %s (lock %s)",
                        self.target,
                        self.holder(),
                        self.path,
                    )
                    told = True
                if self.timeout is not None and waited >= self.timeout:
                    raise CacheError(
                        f"timed out after {waited:.0f} s waiting for {self.target}, which {self.holder()} is "
                        f"building (lock {self.path}); if that process is gone and the lock stays, delete "
                        f"{self.path}; set {LOCK_TIMEOUT_ENV} to wait longer"
                    ) from None
            except OSError as err:
                if err.errno not in NO_FLOCK or self.soft:
                    raise
                warnings.warn(
                    f"flock is not supported on the filesystem of {self.path} ({err}); using a soft lock "
                    "(a marker file with host and pid). See docs/cluster.md for the filesystem requirements",
                    stacklevel=2,
                )
                self.soft = True
                self._lock = filelock.SoftFileLock(f"{self.path}.soft")
        atomic_write_json(
            self.holder_file,
            {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")},
        )
        return self

    def release(self) -> None:
        """Release the lock (the holder record goes first, so it never names a former holder as current)."""
        if self._lock.is_locked:
            self.holder_file.unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def pause_point(point: str) -> None:
    """Test hook: wait at `point` while ``RESIDUAL_LIGHTNING_TEST_PAUSE_AT=<point>:<file>`` says so.

    Creates ``<file>.reached``, then waits (up to 10 minutes) for ``<file>`` to exist.
    """
    value = os.environ.get(PAUSE_ENV, "")
    name, _, file = value.partition(":")
    if name != point or not file:
        return
    release = Path(file)
    Path(f"{release}.reached").touch()
    deadline = time.monotonic() + 600
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

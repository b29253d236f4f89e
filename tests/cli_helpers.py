"""Helpers for CLI tests that run the console script in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L

ROOT = Path(__file__).parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def quick_args(tmp: Path, cache: Path, *extra: str) -> list[str]:
    """The quickstart config with its caches in `cache` and its runs under `tmp`, no progress bar."""
    return [
        "--config",
        QUICK,
        "--data.cache_dir",
        str(cache),
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
        "--trainer.default_root_dir",
        str(tmp),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def fit_killed_during_epoch(argv: list[str], epoch: int) -> None:
    """Run `residual-lightning fit <argv>` in a subprocess that SIGKILLs itself during `epoch`."""
    cmd = [
        sys.executable,
        "-c",
        "from residual_lightning.cli import main; main()",
        "fit",
        *argv,
        "--trainer.callbacks+=tests.cli_helpers.KillDuringEpoch",
        "--trainer.callbacks.epoch",
        str(epoch),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]


class KillDuringEpoch(L.Callback):
    """SIGKILLs its own process in the middle of epoch `epoch` (a crash; last.ckpt is from epoch - 1)."""

    def __init__(self, epoch: int = 2, batch: int = 3) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Kill after a few steps of the chosen epoch."""
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)

"""Helpers for CLI tests that run the console script in subprocesses."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillDuringEpoch(L.Callback):
    """SIGKILLs its own process in the middle of epoch `epoch` (a crash; last.ckpt is from epoch - 1)."""

    def __init__(self, epoch: int = 2, batch: int = 3) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Kill after a few steps of the chosen epoch."""
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)

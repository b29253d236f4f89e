"""Lightning callbacks of the training recipe: TensorBoard pictures, the predictions CSV, and the
LR finder that ``lr: auto`` runs before fitting.

The pictures themselves are drawn by `residual_lightning.plots`. Schedule-free train/eval
switching lives in the LightningModule's own hooks, not here: Lightning's LR finder replaces the
trainer's callbacks while it runs.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from residual_lightning.plots import (
    confusion_figure,
    lambda_figure,
    log_figure,
    lr_finder_figure,
    spectra_figure,
)

log = logging.getLogger(__name__)


def _experiment(trainer: L.Trainer):
    """The TensorBoard SummaryWriter, or None with another (or no) logger."""
    exp = getattr(trainer.logger, "experiment", None) if trainer.logger else None
    return exp if hasattr(exp, "add_image") else None


class ResidualPlots(L.Callback):
    """Logs pictures to TensorBoard: λ heatmap per epoch, spectra at the start, test confusion matrix."""

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        """Spectra of the transformed units' PCA bases and the learned-parameter count."""
        exp = _experiment(trainer)
        if pl_module.logger is not None:
            pl_module.logger.log_metrics({"params/learned": float(pl_module.num_learned())}, step=0)
        dm = trainer.datamodule
        if exp is None or dm is None or pl_module.method not in ("residual", "residual_star"):
            return
        log_figure(exp, "spectra/explained_variance", spectra_figure(dm.bases()), step=0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        """λ heatmap (units x components) of this epoch."""
        exp = _experiment(trainer)
        if exp is None or pl_module.adapter is None or not trainer.is_global_zero:
            return
        fig = lambda_figure(pl_module.adapter.unit_weights())
        if fig is not None:
            log_figure(exp, "adapter/lambda", fig, step=trainer.current_epoch)

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        """The test confusion matrix."""
        exp = _experiment(trainer)
        matrix = getattr(pl_module, "confusion_matrix", None)
        if exp is None or matrix is None or not trainer.is_global_zero:
            return
        figure = confusion_figure(matrix, pl_module.class_names)
        log_figure(exp, "test/confusion_matrix", figure, step=trainer.global_step)


class PredictionCSV(BasePredictionWriter):
    """Writes ``predict`` results to a CSV: file, predicted class, probability (and the true label).

    Args:
        output: the CSV path (default: ``predictions.csv`` in the logger's run folder); each
            rank of a multi-device run writes ``<stem>.rank<r>.csv`` and rank 0 merges them.
            Images skipped by ``predict --skip_bad_images`` are listed in ``skipped_images.txt``
            beside it.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output) if output else None
        self._rows: list[tuple] = []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        """Collect this batch's rows (nothing for predict passes that return no probabilities, e.g. extract)."""
        if not isinstance(prediction, dict) or "probs" not in prediction:
            return
        names = getattr(trainer.datamodule, "predict_names", None)
        probs, labels = prediction["probs"].cpu(), prediction["labels"].cpu()
        index = prediction.get("index")
        index = index.cpu().tolist() if index is not None else list(batch_indices or range(len(probs)))
        best_p, best = probs.max(-1)
        for i, p, c, y in zip(index, best_p.tolist(), best.tolist(), labels.tolist()):
            name = names[i] if names is not None else str(i)
            true = pl_module.class_names[y] if 0 <= y < len(pl_module.class_names) else ""
            self._rows.append((i, name, pl_module.class_names[c], p, true))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        """Write this rank's rows; rank 0 merges every rank's file in index order."""
        if not hasattr(pl_module, "class_names"):  # not a ResidualModel predict (e.g. extract)
            return
        if self.output is None:
            self.output = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        self.output.parent.mkdir(parents=True, exist_ok=True)
        part = self.output.with_suffix(f".rank{trainer.global_rank}.csv")
        with open(part, "w", newline="") as f:
            csv.writer(f).writerows(self._rows)
        trainer.strategy.barrier("prediction-csv")
        skipped = getattr(trainer.datamodule, "predict_skipped", None)
        if trainer.is_global_zero and skipped:
            listing = self.output.with_name("skipped_images.txt")
            listing.write_text("".join(f"{f}\n" for f in skipped))
            print(f"skipped {len(skipped)} unreadable image(s), listed in {listing}")
        if trainer.is_global_zero:
            rows = []
            for r in range(trainer.world_size):
                file = self.output.with_suffix(f".rank{r}.csv")
                with open(file, newline="") as f:
                    rows += list(csv.reader(f))
                file.unlink()
            rows.sort(key=lambda row: int(row[0]))
            with open(self.output, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file", "predicted_class", "probability", "true_class"])
                w.writerows(row[1:] for row in rows)
            print(f"wrote {len(rows)} predictions to {self.output}")
        self._rows = []


def find_lr(trainer: L.Trainer, model, datamodule, num_training: int = 50, min_lr: float = 1e-3) -> float:
    """Lightning's LR finder (50 steps from 1e-3, as the authors); sets ``model.lr`` and logs the curve."""
    from lightning.pytorch.tuner import Tuner

    model.lr = min_lr  # a number while the finder runs
    finder = Tuner(trainer).lr_find(
        model, datamodule=datamodule, min_lr=min_lr, num_training=num_training, update_attr=False
    )
    suggestion = finder.suggestion() if finder is not None else None
    model.lr = float(suggestion) if suggestion else 0.8
    log.info("LR finder suggests %s (using %s)", suggestion, model.lr)
    exp = _experiment(trainer)
    if exp is not None and finder is not None:
        lrs, losses = finder.results["lr"], finder.results["loss"]
        suggested = lrs.index(suggestion) if suggestion in lrs else None
        figure = lr_finder_figure(lrs, losses, suggested, log_x=finder.mode == "exponential")
        log_figure(exp, "lr_finder/curve", figure, step=0)
        exp.add_scalar("lr_finder/suggestion", model.lr, 0)
    return model.lr

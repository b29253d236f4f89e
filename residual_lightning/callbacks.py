"""Lightning callbacks of the training recipe: pictures for the loggers, the predictions CSV, and the
LR finder that ``lr: auto`` runs before fitting.

The pictures themselves are drawn by `residual_lightning.plots`. Schedule-free train/eval
switching lives in the LightningModule's own hooks, not here. The LR finder's rule is in
`residual_lightning.lr_finder`; `find_lr` runs it.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from residual_lightning.lr_finder import (  # noqa: F401  (LR_* and LRFinderResult: the public names)
    LR_MAX,
    LR_MIN,
    LR_PER_DECADE,
    LR_RULE,
    LR_STEPS,
    LRFinderResult,
    RateSearch,
    candidate_rates,
    suggest,
)
from residual_lightning.plots import (
    class_accuracy_figure,
    confusion_figure,
    lambda_figure,
    log_figure,
    lr_finder_figure,
    spectra_figure,
)

log = logging.getLogger(__name__)


def _loggers(trainer: L.Trainer) -> list:
    """The trainer's loggers (empty without one); `log_figure` skips those without image support."""
    return list(getattr(trainer, "loggers", None) or ([trainer.logger] if trainer.logger else []))


class ResidualPlots(L.Callback):
    """Pictures for every logger with image support (`plots.log_figure`): the spectra at the start,
    the λ heatmap per epoch, and after testing the confusion matrix (the most confused pairs beyond
    30 classes) and the per-class accuracy, also written as ``test_per_class_accuracy.csv`` in the
    logger's run folder. Also times the fit for the end-of-fit summary (`fit_seconds`).
    """

    def __init__(self) -> None:
        self.fit_seconds: float | None = None
        self._fit_started: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        """Spectra of the transformed units' PCA bases and the learned-parameter count."""
        self._fit_started, self.fit_seconds = time.perf_counter(), None
        if pl_module.logger is not None:
            pl_module.logger.log_metrics({"params/learned": float(pl_module.num_learned())}, step=0)
        dm = trainer.datamodule
        loggers = _loggers(trainer)
        if not loggers or dm is None or pl_module.method not in ("residual", "residual_star"):
            return
        if trainer.is_global_zero:
            log_figure(loggers, "spectra/explained_variance", spectra_figure(dm.bases()), step=0)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        """Record the fit's wall time."""
        if self._fit_started is not None:
            self.fit_seconds = time.perf_counter() - self._fit_started

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        """λ heatmap (units x components) of this epoch."""
        loggers = _loggers(trainer)
        if not loggers or pl_module.adapter is None or not trainer.is_global_zero:
            return
        fig = lambda_figure(
            pl_module.adapter.unit_weights(), title=f"Learned λ after epoch {trainer.current_epoch}"
        )
        if fig is not None:
            log_figure(loggers, "adapter/lambda", fig, step=trainer.current_epoch)

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        """The test confusion matrix and per-class accuracy (figure and CSV)."""
        # `trainer.log_dir` broadcasts from rank 0: every rank must ask, before any returns.
        folder = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        loggers = _loggers(trainer)
        names = list(getattr(pl_module, "class_names", []) or [])
        matrix = getattr(pl_module, "confusion_matrix", None)
        if loggers and matrix is not None:
            log_figure(loggers, "test/confusion_matrix", confusion_figure(matrix, names), trainer.global_step)
        per_class = getattr(pl_module, "per_class_accuracy", None)
        if per_class is None:
            return
        if loggers:
            figure = class_accuracy_figure(per_class, names)
            log_figure(loggers, "test/class_accuracy", figure, step=trainer.global_step)
        if folder:
            path = write_class_accuracy_csv(per_class, names, Path(folder) / "test_per_class_accuracy.csv")
            log.info("per-class test accuracy written to %s", path)


def write_class_accuracy_csv(accuracy, class_names: list[str], path: str | Path) -> Path:
    """Write ``class,accuracy`` rows (class order; empty accuracy for classes absent from the test set).

    Args:
        accuracy: (C,) accuracies.
        class_names: the C names.
        path: the CSV file (parent folders created).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "accuracy"])
        for name, value in zip(class_names, [float(v) for v in accuracy]):
            w.writerow([name, "" if math.isnan(value) else f"{value:.6f}"])
    return path


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


def find_lr(
    trainer: L.Trainer,
    model,
    datamodule,
    min_lr: float = LR_MIN,
    max_lr: float = LR_MAX,
    per_decade: int = LR_PER_DECADE,
    steps: int = LR_STEPS,
    seed: int = 0,
) -> LRFinderResult:
    """The LR finder of ``lr: auto`` (`residual_lightning.lr_finder`): each rate of a log grid from
    ``min_lr`` to ``max_lr`` trains ``steps`` seeded steps from the same initial state, and the rate
    with the lowest (3-point smoothed) validation loss is suggested. Never clamped.

    Sets ``model.lr`` and ``model.hparams["lr_found"]``, prints one line, logs the curve (the
    suggestion marked) and the value to the trainer's loggers, and returns the `LRFinderResult`.
    On several devices rank 0's suggestion is broadcast.
    """
    lrs = candidate_rates(min_lr, max_lr, per_decade)
    model.lr = lrs[0]  # a number while the search runs
    search = RateSearch(lrs, steps=steps, seed=seed)
    trainer.callbacks = [search, *trainer.callbacks]
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not search]
    if len(search.losses) != len(lrs):
        raise RuntimeError("LR finder did not run (fast_dev_run?): set model.lr to a number")
    lr, index, smoothed = suggest(lrs, search.losses)
    lr = float(trainer.strategy.broadcast(lr, 0))
    index = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / lr)))
    found = LRFinderResult(
        lr=lr, lrs=lrs, losses=search.losses, smoothed=smoothed, index=index, rule=LR_RULE, seed=seed
    )
    model.lr = lr
    model.hparams["lr_found"] = lr
    if trainer.is_global_zero:
        print(f"LR finder: lr = {lr:.4g} ({LR_RULE}; {len(lrs)} rates from {min_lr:g} to {max_lr:g})")
        if index in (0, len(lrs) - 1):  # reported, not moved: the rule's answer stands
            end = "smallest" if index == 0 else "largest"
            print(f"LR finder: {lr:.4g} is the {end} rate tried; the best rate may lie beyond it")
    loggers = _loggers(trainer)
    if loggers and trainer.is_global_zero:
        shown = [v if math.isfinite(v) else float("nan") for v in smoothed]
        figure = lr_finder_figure(lrs, shown, index, ylabel=f"validation loss after {steps} steps (smoothed)")
        log_figure(loggers, "lr_finder/curve", figure, step=0)
    for logger in loggers:
        logger.log_metrics({"lr_finder/suggestion": lr}, step=0)
    return found

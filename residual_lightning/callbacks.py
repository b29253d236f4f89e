"""Lightning callbacks of the training recipe: pictures for the loggers, the predictions CSV, and the
LR finder that ``lr: auto`` runs before fitting.

The pictures themselves are drawn by `residual_lightning.plots`. Schedule-free train/eval
switching lives in the LightningModule's own hooks, not here: Lightning's LR finder replaces the
trainer's callbacks while it runs.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateFinder
from lightning.pytorch.utilities.seed import isolate_rng

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


#: The LR finder's range test: `LR_STEPS` exponentially spaced rates from `LR_MIN` to `LR_MAX`, wide
#: enough for every method (linear's 1e-3 to residual's 0.8, a decade to spare on either side).
LR_MIN, LR_MAX, LR_STEPS = 1e-6, 100.0, 120
#: Points (of `LR_STEPS`) in the centred median-then-mean smoothing of the loss curve.
LR_WINDOW = 15
#: A smoothed loss above this multiple of the running minimum ends the curve (divergence).
LR_DIVERGED = 4.0
#: The rule, as recorded in ``lr_finder.json``.
LR_RULE = "steepest descent of the smoothed loss (in log lr) before its minimum"


@dataclass
class LRFinderResult:
    """One range test: the rates tried, the raw and smoothed losses, and the suggestion."""

    lr: float
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    index: int  # the point of the suggestion
    rule: str
    seed: int

    def as_dict(self) -> dict:
        """Plain values for ``lr_finder.json``."""
        return asdict(self)


def smooth_losses(losses: list[float], window: int = LR_WINDOW) -> list[float]:
    """A centred moving median then mean (``window`` points, shrinking at the ends) over the finite
    prefix of ``losses``: robust to single noisy batches, no lag and no start-up bias (an EMA has
    both). Points from the first non-finite loss on are dropped."""
    finite = []
    for loss in losses:
        if not math.isfinite(loss):
            break
        finite.append(float(loss))
    half = window // 2
    medians = [statistics.median(finite[max(0, i - half) : i + half + 1]) for i in range(len(finite))]
    return [statistics.fmean(medians[max(0, i - half) : i + half + 1]) for i in range(len(medians))]


def suggest_lr(lrs: list[float], losses: list[float]) -> tuple[float, int, list[float]]:
    """The rule of `find_lr`: the rate where the smoothed loss falls fastest per decade of learning
    rate, looked for only up to the smoothed minimum (itself found before the curve diverges: a
    smoothed loss above `LR_DIVERGED` times the running minimum ends it). No clamping.

    Returns the suggestion, its index, and the smoothed curve. Raises ValueError when fewer than
    three finite losses were recorded.
    """
    smoothed = smooth_losses(losses)
    if len(smoothed) < 3:
        raise ValueError(f"LR finder: only {len(smoothed)} finite losses recorded, too few to suggest a rate")
    best = 0
    for i, value in enumerate(smoothed):
        if value > LR_DIVERGED * smoothed[best] and value > smoothed[best] + 1e-8:
            break
        if value < smoothed[best]:
            best = i
    end = max(best, 2) + 1
    logs = [math.log10(x) for x in lrs[:end]]
    slopes = []
    for i in range(end):
        lo, hi = max(0, i - 1), min(end - 1, i + 1)
        slopes.append((smoothed[hi] - smoothed[lo]) / (logs[hi] - logs[lo]))
    index = min(range(end), key=lambda i: (slopes[i], i))
    return lrs[index], index, smoothed


class _SeededLRFinder(LearningRateFinder):
    """Lightning's finder with its data order and dropout seeded (the global RNG state is restored
    afterwards, so the fit that follows draws as it would without the finder)."""

    def __init__(self, seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seed = seed

    def lr_find(self, trainer: L.Trainer, pl_module) -> None:
        """Seed torch, numpy and random, then run the range test."""
        with isolate_rng():
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
            max_epochs = trainer.fit_loop.max_epochs
            trainer.fit_loop.max_epochs = -1  # the steps, not trainer.max_epochs, end the range test
            try:
                super().lr_find(trainer, pl_module)
            finally:
                trainer.fit_loop.max_epochs = max_epochs


def raw_losses(smoothed: list[float], beta: float = 0.98, first_step: int = 1) -> list[float]:
    """The per-step losses behind Lightning's bias-corrected EMA (`_LRCallback`: the i-th value is
    ``avg_i / (1 - beta ** (first_step + i + 1))``, ``avg_i = beta * avg_{i-1} + (1 - beta) * loss_i``)."""
    out, previous = [], 0.0
    for i, value in enumerate(smoothed):
        avg = value * (1 - beta ** (first_step + i + 1))
        out.append((avg - beta * previous) / (1 - beta))
        previous = avg
    return out


def find_lr(
    trainer: L.Trainer,
    model,
    datamodule,
    num_training: int = LR_STEPS,
    min_lr: float = LR_MIN,
    max_lr: float = LR_MAX,
    seed: int = 0,
) -> LRFinderResult:
    """Range test before fitting (``lr: auto``): ``num_training`` steps at exponentially growing rates
    from ``min_lr`` to ``max_lr``, the data order seeded with ``seed``, the model and optimizer restored
    afterwards (Lightning's finder reloads its own checkpoint) and the global RNG state too.

    The suggestion (`suggest_lr`) is the steepest descent of the smoothed loss before its minimum. Sets ``model.lr`` and ``model.hparams["lr_found"]``, prints one line, logs the
    curve and the value to the trainer's loggers, and returns the `LRFinderResult`.
    """
    model.lr = min_lr  # a number while the finder runs
    finder = _SeededLRFinder(
        seed,
        min_lr=min_lr,
        max_lr=max_lr,
        num_training_steps=num_training,
        early_stop_threshold=None,  # divergence is judged on the raw losses, by `suggest_lr`
        update_attr=False,
    )
    finder._early_exit = True  # as `Tuner.lr_find`: stop the fit after the range test
    trainer.callbacks = [finder, *trainer.callbacks]
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not finder]
    result = finder.optimal_lr
    if result is None or not result.results.get("lr"):
        raise RuntimeError("LR finder did not run (fast_dev_run?): set model.lr to a number")
    lrs = [float(x) for x in result.results["lr"]]
    losses = raw_losses([float(x) for x in result.results["loss"]])
    lr, index, smoothed = suggest_lr(lrs, losses)
    found = LRFinderResult(
        lr=lr,
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        index=index,
        rule=LR_RULE,
        seed=seed,
    )
    model.lr = lr
    model.hparams["lr_found"] = lr
    if trainer.is_global_zero:
        print(f"LR finder: lr = {lr:.4g} ({LR_RULE}; {len(lrs)} steps from {min_lr:g} to {max_lr:g})")
    loggers = _loggers(trainer)
    if loggers and trainer.is_global_zero:
        figure = lr_finder_figure(lrs[: len(smoothed)], smoothed, index)
        log_figure(loggers, "lr_finder/curve", figure, step=0)
    for logger in loggers:
        logger.log_metrics({"lr_finder/suggestion": lr}, step=0)
    return found

"""Callbacks and helpers of the training recipe: plots for TensorBoard and the LR finder.

Schedule-free train/eval switching lives in the LightningModule's own hooks, not here: Lightning's
LR finder replaces the trainer's callbacks while it runs.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import BasePredictionWriter  # noqa: E402

log = logging.getLogger(__name__)


def _experiment(trainer: L.Trainer):
    """The TensorBoard SummaryWriter, or None with another (or no) logger."""
    exp = getattr(trainer.logger, "experiment", None) if trainer.logger else None
    return exp if hasattr(exp, "add_figure") else None


def lambda_figure(weights: dict[str, torch.Tensor]) -> plt.Figure | None:
    """Heatmap of learned weights: one row per unit (heads, then MLPs), one column per component."""
    rows, labels = [], []
    for kind, values in weights.items():
        v = values.detach().float().cpu()
        v = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v[None]
        rows.append(v)
        labels.append((kind, v.shape[0]))
    if not rows:
        return None
    width = max(r.shape[1] for r in rows)
    mat = torch.full((sum(r.shape[0] for r in rows), width), float("nan"))
    start = 0
    for r in rows:
        mat[start : start + r.shape[0], : r.shape[1]] = r
        start += r.shape[0]
    fig, ax = plt.subplots(figsize=(8, min(12, 2 + 0.04 * mat.shape[0])))
    finite = mat[torch.isfinite(mat)]
    lim = float(finite.abs().max()) if finite.numel() else 1.0
    im = ax.imshow(mat.numpy(), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
    start = 0
    for kind, n in labels:
        ax.axhline(start - 0.5, color="k", lw=0.5)
        ax.text(-0.5, start + n / 2, kind, ha="right", va="center", fontsize=8)
        start += n
    ax.set_xlabel("component (sorted by explained variance)")
    ax.set_ylabel("unit")
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, label="λ")
    fig.tight_layout()
    return fig


def spectra_figure(bases) -> plt.Figure:
    """Explained-variance ratio spectra of the heads (one line each) and of the MLPs."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (kind, basis) in zip(axes, (("heads", bases.heads), ("MLPs", bases.mlps))):
        ratio = (
            basis.explained_variance_ratio.detach()
            .cpu()
            .reshape(-1, basis.explained_variance_ratio.shape[-1])
        )
        for r in ratio:
            ax.semilogy(np.arange(1, len(r) + 1), r.clamp_min(1e-8).numpy(), lw=0.5, alpha=0.5)
        ax.set_title(f"{kind}: explained variance ratio")
        ax.set_xlabel("component")
    fig.tight_layout()
    return fig


def confusion_figure(matrix: torch.Tensor, class_names: list[str]) -> plt.Figure:
    """Row-normalised confusion matrix (true class in rows)."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.35 * n), min(14, 2 + 0.35 * n)))
    im = ax.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


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
        exp.add_figure("spectra/explained_variance", spectra_figure(dm.bases()), global_step=0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        """λ heatmap (units x components) of this epoch."""
        exp = _experiment(trainer)
        if exp is None or pl_module.adapter is None or not trainer.is_global_zero:
            return
        fig = lambda_figure(pl_module.adapter.unit_weights())
        if fig is not None:
            exp.add_figure("adapter/lambda", fig, global_step=trainer.current_epoch)

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        """The test confusion matrix."""
        exp = _experiment(trainer)
        matrix = getattr(pl_module, "confusion_matrix", None)
        if exp is None or matrix is None or not trainer.is_global_zero:
            return
        exp.add_figure(
            "test/confusion_matrix",
            confusion_figure(matrix, pl_module.class_names),
            global_step=trainer.global_step,
        )


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
        exp.add_figure("lr_finder/curve", finder.plot(suggest=True), global_step=0)
        exp.add_scalar("lr_finder/suggestion", model.lr, 0)
    return model.lr

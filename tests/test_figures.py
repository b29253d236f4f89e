"""Figures: drawing without pyplot or a backend switch, and `log_figure` on every kind of logger."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from residual_lightning.plots import (
    class_accuracy_figure,
    confusion_figure,
    figure_image,
    lambda_figure,
    log_figure,
    spectra_figure,
)


def small_figure() -> Figure:
    fig = Figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


# -------------------- log_figure ---------------------------------------------------------


class ImageOnlyLogger:
    """A logger with ``log_image`` (as W&B's) and no ``experiment.add_figure``."""

    def __init__(self) -> None:
        self.calls = []

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append((key, images, step))


class FakeMlflowClient:
    def __init__(self) -> None:
        self.calls = []

    def log_figure(self, run_id, figure, artifact_file):
        self.calls.append((run_id, figure, artifact_file))


class FakeMlflowLogger:
    """MLflow-like: ``experiment`` is a client with ``log_figure(run_id, figure, artifact_file)``."""

    def __init__(self) -> None:
        self.experiment = FakeMlflowClient()
        self.run_id = "run-1"


class FakeWriter:
    def __init__(self) -> None:
        self.calls = []

    def add_figure(self, tag, figure, global_step=None, close=True):
        self.calls.append((tag, figure, global_step, close))


def test_log_figure_uses_log_image_of_a_logger_without_experiment():
    logger, fig = ImageOnlyLogger(), small_figure()
    assert log_figure(logger, "test/confusion_matrix", fig, step=3)
    ((key, images, step),) = logger.calls
    assert key == "test/confusion_matrix" and step == 3 and len(images) == 1
    image = images[0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == (150, 200)  # 2 x 1.5 inches at the figure's 100 dpi


def test_log_figure_uses_mlflow_log_figure_with_the_run_id():
    logger, fig = FakeMlflowLogger(), small_figure()
    assert log_figure(logger, "adapter/lambda", fig, step=2)
    ((run_id, figure, artifact),) = logger.experiment.calls
    assert run_id == "run-1" and figure is fig and artifact == "adapter/lambda/step_000002.png"


def test_log_figure_uses_tensorboard_add_figure_without_closing():
    writer = FakeWriter()
    logger = SimpleNamespace(experiment=writer)
    fig = small_figure()
    assert log_figure(logger, "spectra", fig, step=0)
    assert writer.calls == [("spectra", fig, 0, False)]


def test_log_figure_skips_loggers_without_image_support(caplog):
    csv_like = SimpleNamespace(experiment=SimpleNamespace(log_metrics=lambda *a: None))
    with caplog.at_level("DEBUG", logger="residual_lightning.plots"):
        assert not log_figure(csv_like, "x", small_figure())
        assert not log_figure(None, "x", small_figure())
    assert "no image support" in caplog.text
    image_only, csv_only = ImageOnlyLogger(), SimpleNamespace()
    assert log_figure([csv_only, image_only], "x", small_figure())
    assert len(image_only.calls) == 1


def test_log_figure_reaches_a_real_tensorboard_logger(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    assert log_figure(logger, "test/class_accuracy", small_figure(), step=1)
    logger.experiment.flush()
    tags = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload().Tags()
    assert "test/class_accuracy" in tags["images"]


# -------------------- the figures --------------------------------------------------------


def texts(fig: Figure) -> str:
    """Every text of a figure (titles, labels, tick labels) once drawn."""
    figure_image(fig)
    found = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return " | ".join(t for t in found if t)


def test_lambda_figure_ticks_layers_and_has_a_title():
    weights = {"heads": torch.randn(12, 12, 16), "mlps": torch.randn(12, 64), "emb": torch.randn(64)}
    weights["heads"][..., 10:] = float("nan")
    fig = lambda_figure(weights)
    text = texts(fig)
    assert "L0" in text and "L11" in text and "heads" in text and "mlps" in text and "Learned λ" in text
    assert lambda_figure({}) is None


def test_spectra_are_coloured_by_layer_with_a_colour_bar():
    ratio = torch.softmax(torch.randn(12, 12, 16), -1).sort(-1, descending=True).values
    mlp = torch.softmax(torch.randn(12, 64), -1).sort(-1, descending=True).values
    bases = SimpleNamespace(
        heads=SimpleNamespace(explained_variance_ratio=ratio),
        mlps=SimpleNamespace(explained_variance_ratio=mlp),
    )
    fig = spectra_figure(bases)
    text = texts(fig)
    assert "layer (depth)" in text and "explained variance ratio" in text and "principal component" in text
    lines = fig.axes[0].get_lines()
    assert len(lines) == 144
    assert lines[0].get_color() != lines[-1].get_color()  # first and last layer differ
    assert lines[0].get_color() == lines[11].get_color()  # the heads of a layer share one


def test_confusion_matrix_and_top_pairs_beyond_30_classes():
    small = torch.eye(5) * 0.8 + 0.04
    text = texts(confusion_figure(small, [f"c{i}" for i in range(5)]))
    assert "confusion matrix" in text and "fraction of the true class" in text
    big = torch.eye(40)
    big[3, 3], big[3, 7] = 0.4, 0.6
    text = texts(confusion_figure(big, [f"class{i}" for i in range(40)]))
    assert "Most confused pairs" in text and "class3 → class7" in text


def test_class_accuracy_is_one_bar_chart():
    for n in (10, 200):
        acc = torch.rand(n)
        fig = class_accuracy_figure(acc, [f"k{i}" for i in range(n)])
        assert len(fig.axes) == 1 and len(fig.axes[0].patches) == n
        assert "Per-class test accuracy" in texts(fig)


# -------------------- no backend switch at import ----------------------------------------


@pytest.mark.parametrize("module", ["residual_lightning.plots", "residual_lightning"])
def test_import_does_not_change_the_matplotlib_backend(module):
    code = (
        "import matplotlib; before = matplotlib.get_backend()\n"
        f"import {module}, residual_lightning.callbacks, residual_lightning.analysis.report\n"
        "print(before, matplotlib.get_backend())"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["svg", "svg"], out.stdout + out.stderr


# -------------------- the end-of-fit summary ---------------------------------------------


def test_summary_is_a_markdown_table_with_the_finder_lr(capsys):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from residual_lightning.callbacks import ResidualPlots
    from residual_lightning.recipe import print_summary

    ckpt = ModelCheckpoint(monitor="val/accuracy", mode="max")
    ckpt.best_model_score = torch.tensor(0.625)
    timer = ResidualPlots()
    timer.fit_seconds = 125.0
    model = SimpleNamespace(method="residual", lr=0.0123, hparams={"lr": "auto"}, num_learned=lambda: 1536)
    trainer = SimpleNamespace(
        global_step=40,
        max_epochs=5,
        current_epoch=5,
        logger=None,
        checkpoint_callback=ckpt,
        callbacks=[ckpt, timer],
    )
    print_summary(model, {"test/accuracy": 0.75, "test/zeroshot_accuracy": 0.5}, "best.ckpt", trainer)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert all(line.startswith("|") and line.endswith("|") for line in lines), lines
    cells = [[c.strip() for c in line[1:-1].split("|")] for line in lines]
    assert cells[0] == ["summary", "value"] and all(set(c) == {"-"} for c in cells[1])
    rows = dict(cells[2:])
    assert rows["learning rate"] == "0.0123 (LR finder)"
    assert rows["best validation accuracy"] == "0.6250" and rows["epochs run"] == "5"
    assert rows["wall time (fit)"] == "2 min 05 s" and rows["gain (points)"] == "+25.0"


def test_the_report_reaches_a_logger_with_only_log_image(tmp_path):
    """`log_report` sends each report PNG through ``log_image`` when there is no TensorBoard."""
    import matplotlib.image
    import numpy as np

    from residual_lightning.analysis.report import log_report

    (tmp_path / "report.md").write_text("# report")
    matplotlib.image.imsave(tmp_path / "a.png", np.zeros((4, 4, 3)))

    class ImageOnly:
        def __init__(self):
            self.keys = []

        def log_image(self, key, images, step=None):
            self.keys.append((key, images[0].shape))

    logger = ImageOnly()
    log_report([logger], tmp_path)
    assert logger.keys == [("report/a", (4, 4, 3))]

"""The residual-lightning CLI end to end: fit/test from YAML, TensorBoard, LR finder, predict, resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import QUICK, ROOT, quick_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from residual_lightning.cli import main


@pytest.fixture
def cache(digits_cache):
    """Digits caches for the quickstart config (built once per session, see conftest)."""
    return digits_cache


def tags(logdir: Path) -> dict[str, list[str]]:
    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0}).Reload().Tags()
    return events


def markdown_table(out: str) -> dict[str, str]:
    """The summary printed by fit, checked to be a markdown table (header, separator, rows)."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, out
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    header, separator, rows = cells[0], cells[1], cells[2:]
    assert header == ["summary", "value"], header
    assert len(separator) == 2 and all(set(c) == {"-"} and len(c) >= 3 for c in separator), lines[1]
    assert all(len(r) == 2 for r in rows), rows
    return dict(rows)


def test_fit_writes_scalars_images_and_summary(tmp_path, cache, capsys):
    main(["fit", *quick_args(tmp_path, cache, "--trainer.max_epochs", "3")])
    out = capsys.readouterr().out
    assert "zero-shot test accuracy" in out and "learned parameters" in out and "1,536" in out
    summary = markdown_table(out)
    assert summary["learning rate"] == "0.8" and summary["epochs run"] == "3"
    assert 0 <= float(summary["best validation accuracy"]) <= 1 and summary["wall time (fit)"].endswith("s")
    logdir = next((tmp_path / "runs").glob("quickstart/version_*"))
    t = tags(logdir)
    for scalar in ("train/loss", "val/accuracy", "val/zeroshot_accuracy", "test/accuracy", "params/learned"):
        assert scalar in t["scalars"], (scalar, t["scalars"])
    assert not any(s.startswith("test/class_accuracy") for s in t["scalars"])  # one figure, not C scalars
    for image in (
        "adapter/lambda",
        "spectra/explained_variance",
        "test/confusion_matrix",
        "test/class_accuracy",
    ):
        assert image in t["images"], (image, t["images"])
    with open(logdir / "test_per_class_accuracy.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "accuracy"] and len(rows) == 11
    report = (logdir / "report" / "report.md").read_text()
    assert (
        "learned parameters" in report and (logdir / "report" / "lambda_movement.png").stat().st_size > 1000
    )
    ckpts = sorted(p.name for p in (logdir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(c.startswith("best-epoch") for c in ckpts)
    assert all("/" not in c for c in ckpts)


def test_lr_auto_runs_the_finder_and_logs_its_curve(tmp_path, cache):
    main(["fit", *quick_args(tmp_path, cache, "--trainer.max_epochs", "1", "--model.lr", "auto")])
    logdir = next((tmp_path / "runs").glob("quickstart/version_*"))
    t = tags(logdir)
    assert "lr_finder/curve" in t["images"] and "lr_finder/suggestion" in t["scalars"]
    ckpt = torch.load(next((logdir / "checkpoints").glob("last.ckpt")), weights_only=True)
    assert isinstance(ckpt["hyper_parameters"]["lr"], str)  # the config said auto ...
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] >= 1e-3  # ... the finder chose a number


def test_validate_test_and_predict_from_yaml(tmp_path, cache):
    main(["fit", *quick_args(tmp_path, cache, "--trainer.max_epochs", "1")])
    ckpt = next((tmp_path / "runs").glob("quickstart/version_*/checkpoints/last.ckpt"))
    main(["validate", *quick_args(tmp_path, cache), "--ckpt_path", str(ckpt)])
    main(["test", *quick_args(tmp_path, cache), "--ckpt_path", str(ckpt)])
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (30, 30), (80 * i, 10, 200)).save(images / f"x{i}.png")
    out = tmp_path / "pred.csv"
    main(
        [
            "predict",
            *quick_args(tmp_path, cache),
            "--ckpt_path",
            str(ckpt),
            "--data.predict_path",
            str(images),
            "--trainer.callbacks",
            "residual_lightning.callbacks.PredictionCSV",
            "--trainer.callbacks.output",
            str(out),
        ]
    )
    rows = list(csv.DictReader(open(out)))
    assert [Path(r["file"]).name for r in rows] == ["x0.png", "x1.png", "x2.png"]
    assert all(
        r["predicted_class"] in [str(d) for d in range(10)] and 0 < float(r["probability"]) <= 1 for r in rows
    )


def test_predict_without_checkpoint_is_refused(tmp_path, cache):
    with pytest.raises(ValueError, match="--ckpt_path"):
        main(["predict", *quick_args(tmp_path, cache)])


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    # The console script itself: DDP's launcher re-runs sys.argv in each process, so no `-c`.
    cmd = [str(Path(sys.executable).parent / "residual-lightning"), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def best_val(tmp: Path) -> float:
    ckpt = next(tmp.glob("runs/quickstart/version_*/checkpoints/best-*.ckpt"))
    return float(ckpt.stem.split("acc")[-1])


@pytest.mark.slow
def test_two_process_ddp_extracts_one_cache_and_matches_one_process(tmp_path):
    from residual_lightning.data.cache import ActivationCache

    cache = tmp_path / "cache"
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")
    run_cli(
        "extract",
        "--config",
        QUICK,
        "--data.cache_dir",
        str(cache),
        "--data.chunk_size",
        "256",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),  # where the CLI saves config.yaml when there is no logger
        *ddp,
    )
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 3
    for folder in folders:
        c = ActivationCache.open(folder)  # complete and every chunk checksum verified
        assert len(c) in (1078, 360, 359)
    epochs = ("--trainer.max_epochs", "2")
    run_cli("fit", *quick_args(tmp_path / "two", cache, *epochs, *ddp))
    run_cli("fit", *quick_args(tmp_path / "one", cache, *epochs))
    assert abs(best_val(tmp_path / "two") - best_val(tmp_path / "one")) <= 0.05


def test_bf16_mixed_extraction_and_training(tmp_path):
    cache = tmp_path / "bf16-cache"
    main(
        [
            "fit",
            *quick_args(
                tmp_path,
                cache,
                "--trainer.max_epochs",
                "2",
                "--trainer.precision",
                "bf16-mixed",
                "--report",
                "false",
            ),
        ]
    )
    metas = [json.loads(p.read_text()) for p in cache.glob("*/meta.json")]
    assert len(metas) == 3 and all("autocast-bfloat16" in m["key"]["preprocessing"] for m in metas)
    best = next(tmp_path.glob("runs/quickstart/version_*/checkpoints/best-*.ckpt"))
    assert float(best.stem.split("acc")[-1]) > 0.2  # learned under bf16 autocast (zero-shot is ~0.1)

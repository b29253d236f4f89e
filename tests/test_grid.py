"""`residual-lightning grid`: the reproduction grid at its smallest (tiny random ViT x digits,
zero-shot and ResiDual, 2 seeds), its options, and the deprecated `benchmarks/paper_grid.py` shim."""

from __future__ import annotations

import csv
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import residual_lightning
from residual_lightning import cli, grid, grid_report
from residual_lightning.units import layout_from_config

SHIM = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_grid.py"


def test_mean_std_format():
    assert grid_report.mean_std([0.5, 0.7]) == "60.0 ± 14.1"  # sample std: 0.1414
    assert grid_report.mean_std([0.5]) == "50.0"
    assert grid_report.mean_std([]) == "—"


def test_cli_grid_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["grid", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: residual-lightning grid")
    assert "--configs" in out and "--preset {offline,paper}" in out and "results.csv" in out


def test_paper_grid_shim_is_deprecated(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SHIM), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "benchmarks/paper_grid.py is deprecated and will be removed in the next release: "
        "use `residual-lightning grid ...`"
    ) in proc.stderr
    assert proc.stdout.startswith("usage: residual-lightning grid")


def test_configs_folder(tmp_path, capsys):
    # The tests run in a scratch folder without configs/: the source checkout's are found.
    checkout = Path(residual_lightning.__file__).resolve().parents[1] / "configs"
    assert grid.find_configs() == checkout
    assert grid.parse_args([]).configs == checkout
    # ./configs wins over the checkout's, and --configs over both.
    local = tmp_path / "configs" / "methods"
    local.mkdir(parents=True)
    (local / "mine.yaml").write_text("model:\n  method: residual\n")
    assert grid.find_configs() == tmp_path / "configs"
    assert grid.method_name("mine", grid.find_configs()) == "residual"
    assert grid.parse_args(["--configs", str(checkout)]).configs == checkout
    with pytest.raises(FileNotFoundError, match="no methods config 'mine'"):
        grid.method_name("mine", checkout)
    # A missing folder: a usage error that names where the grid looked.
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as exc:
        grid.parse_args(["--configs", str(missing)])
    assert exc.value.code == 2
    assert f"no configs folder (looked in {missing})" in capsys.readouterr().err


@pytest.mark.slow
def test_offline_grid(tmp_path):
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    argv = [
        "--out", str(out), "--cache_dir", cache,
        "--backbones", "tiny", "--datasets", "digits", "--methods", "zeroshot", "residual",
        "--seeds", "0", "1", "--max_epochs", "2",
        "--", "--trainer.accelerator", "cpu",
    ]  # fmt: skip
    grid.grid(grid.parse_args(argv))

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Zero-shot is seed-independent: one run; ResiDual once per seed.
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("zeroshot", "0"),
        ("residual", "0"),
        ("residual", "1"),
    ]
    assert all(r["status"] == "ok" and r["backbone"] == "tiny" and r["dataset"] == "digits" for r in rows)
    zs, res = rows[0], rows[1:]
    layers, heads, d, dim = layout_from_config("RL-Tiny-ViT-64").shape
    assert int(zs["learned_params"]) == 0 and zs["best_checkpoint"] == ""
    for r in res:
        assert int(r["learned_params"]) == layers * heads * d + layers * dim  # every head and MLP component
        assert int(r["epochs"]) == 2
        assert Path(r["best_checkpoint"]).is_file() and "best-epoch" in r["best_checkpoint"]
        assert 0.0 <= float(r["best_val_accuracy"]) <= 1.0
    # Every run measures the same frozen zero-shot accuracy; caches are built once, then reused.
    assert len({r["zeroshot_accuracy"] for r in rows}) == 1
    assert float(zs["test_accuracy"]) == float(zs["zeroshot_accuracy"])
    assert all(float(r["prepare_s"]) < float(zs["prepare_s"]) for r in res)
    assert not (Path.cwd() / "runs" / "tiny").exists()

    # results.md: mean ± sample std over the two seeds, in %, next to the zero-shot accuracy.
    table = (out / "results.md").read_text()
    line = re.search(r"^\| tiny \| digits \| ([\d.]+) \| ([\d.]+) ± ([\d.]+) \|$", table, re.M)
    assert line, table
    acc = [float(r["test_accuracy"]) for r in res]
    assert line.group(1) == f"{100 * float(zs['zeroshot_accuracy']):.1f}"
    assert line.group(2) == f"{100 * statistics.fmean(acc):.1f}"
    assert line.group(3) == f"{100 * statistics.stdev(acc):.1f}"
    assert float(line.group(2)) > float(line.group(1)) + 5  # ResiDual beats zero-shot, by > 5 points

    # Started again, the grid skips what is done.
    before = (out / "results.csv").read_text()
    grid.grid(grid.parse_args(argv))
    assert (out / "results.csv").read_text() == before

    # A run in a fresh process (the paper preset's launcher) reads the same caches and agrees.
    sub = tmp_path / "sub"
    grid.grid(
        grid.parse_args(
            [*argv[:-3], "--methods", "zeroshot", "--out", str(sub), "--launcher", "subprocess", *argv[-3:]]
        )
    )
    with open(sub / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok" and row["test_accuracy"] == zs["test_accuracy"]
    assert float(row["prepare_s"]) < float(zs["prepare_s"])

"""`residual-lightning ablate`: the paper's ablations as sweeps (tiny random ViT x digits).

The fast tests check the harness without training (names, variants, the ImageNet refusal, the CLI
spelling of each variant, reading curves back from logs, the statistics); the slow ones run 8
short fits (components 1/4/all x 2 seeds, coarse vs ResiDual) and the selection curve.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import pytest

from residual_lightning import ablations, cli, grid
from residual_lightning.ablation_report import summarise
from residual_lightning.units import layout_from_config

CPU = ["--", "--trainer.accelerator", "cpu"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_unknown_ablation_lists_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["ablate", "componets"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'componets'" in err
    for name in ("components", "units", "reference", "coarse_vs_residual", "selection", "all"):
        assert f"'{name}'" in err


def test_unknown_variant_lists_the_ablations_variants(tmp_path):
    args = ablations.parse_args(["units", "--variants", "heads", "attn", "--out", str(tmp_path)])
    with pytest.raises(
        ablations.AblationError, match=r"no variant\(s\) \['attn'\]; its variants: heads, mlps, both"
    ):
        ablations.ablate(args)
    assert not (tmp_path / "units" / "results.csv").exists()


def test_variants_pick_by_label():
    args = ablations.parse_args(["components", "--variants", "all", "1"])
    assert [v.label for v in ablations.variants("components", args)] == ["1", "all"]  # the ablation's order
    with pytest.raises(SystemExit):
        ablations.parse_args(["all", "--variants", "1"])


def test_reference_refuses_without_imagenet(tmp_path, capsys, monkeypatch):
    def no_run(*_, **__):
        raise AssertionError("nothing may train when the imagenet arm cannot run")

    monkeypatch.setattr(grid, "run_one", no_run)
    missing = tmp_path / "no-imagenet"
    for name in ("reference", "all"):
        with pytest.raises(SystemExit) as exc:
            ablations.main([name, "--imagenet_root", str(missing), "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"needs ImageNet-1k train images in {missing / 'train'}" in err and "--variants train" in err
    assert not (tmp_path / "out").exists()
    # With the folder there, the arm is in the sweep and points the runs at it.
    (missing / "train").mkdir(parents=True)
    args = ablations.parse_args(["reference", "--imagenet_root", str(missing)])
    arms = {v.label: v.args for v in ablations.variants("reference", args)}
    assert arms["train"] == ("--data.reference", "train")
    assert arms["imagenet"] == ("--data.reference", "imagenet", "--data.reference_root", str(missing))


def _parsed_adapter(variant: ablations.Variant) -> dict:
    """The adapter options the real CLI parses from a variant's arguments."""
    from residual_lightning.data.datamodule import ResidualDataModule
    from residual_lightning.model import ResidualModel
    from residual_lightning.recipe import ResidualCLI, ResidualTrainer

    class ParseOnly(ResidualCLI):
        def instantiate_classes(self) -> None:
            pass

    configs = grid.find_configs()
    run = grid.Run("tiny", "digits", variant.method, 0)
    argv = grid.cli_args(run, Path("out"), 1, None, list(variant.args), configs)
    parsed = ParseOnly(ResidualModel, ResidualDataModule, trainer_class=ResidualTrainer, run=False, args=argv)
    return dict(parsed.config.model.init_args.adapter.init_args)


def test_variants_mean_what_they_say_to_the_real_cli():
    args = ablations.parse_args(["components"])
    parsed = [_parsed_adapter(v)["components"] for v in ablations.variants("components", args)]
    assert parsed == [1, 4, 16, 0.9, "all"]
    assert [type(p) for p in parsed] == [int, int, int, float, str]  # K, never the string "4"
    units = {v.label: _parsed_adapter(v)["transform"] for v in ablations.variants("units", args)}
    assert units == {"heads": "heads", "mlps": "mlps", "both": "all"}


def test_val_curve_reads_tensorboard_and_csv_logs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    values = [0.25, 0.5, 0.375]
    for logger in (TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")):
        for epoch, v in reversed(list(enumerate(values))):  # written out of order: sorted by step
            logger.log_metrics({"val/accuracy": v, "train/loss": 1.0}, step=10 * (epoch + 1))
        logger.log_metrics({"test/accuracy": 0.9}, step=40)
        logger.save()
        logger.finalize("success")
        got = ablations.val_curve(logger.log_dir)
        assert got == (values if isinstance(logger, TensorBoardLogger) else values[::-1])
    assert ablations.val_curve(tmp_path / "nothing") == []


def test_summary_statistics_are_over_seeds():
    rows = [
        {"variant": "a", "method": "residual", "seed": "1", "status": "ok", "test_accuracy": "0.5",
         "learned_params": "20", "val_curve": "[0.1, 0.2]"},
        {"variant": "a", "method": "residual", "seed": "0", "status": "ok", "test_accuracy": "0.7",
         "learned_params": "20", "val_curve": "[0.3]"},
        {"variant": "a", "method": "residual", "seed": "2", "status": "error", "test_accuracy": "",
         "learned_params": "", "val_curve": ""},
        {"variant": "b", "method": "coarse", "seed": "0", "status": "ok", "test_accuracy": "0.4",
         "learned_params": "16", "val_curve": ""},
    ]  # fmt: skip
    a, b, c = summarise(rows, ["a", "b", "c"])
    assert a["seeds"] == [0, 1] and a["accuracies"] == [0.7, 0.5]  # failed seed left out, seed order
    assert a["mean"] == pytest.approx(0.6) and a["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert a["curves"] == [[0.3], [0.1, 0.2]] and a["learned_params"] == [20]
    assert b["std"] == 0.0 and b["learned_params"] == [16]
    assert c["seeds"] == [] and c["mean"] is None


# ------------------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One cache folder for every sweep of this file (digits is extracted once)."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_components_sweep_table_figure_and_resume(tmp_path, cache, monkeypatch):
    out = tmp_path / "out"
    argv = ["components", "--variants", "1", "4", "all", "--seeds", "0", "1", "--max_epochs", "2",
            "--out", str(out), "--cache_dir", cache, *CPU]  # fmt: skip
    ablations.main(argv)
    folder = out / "components"
    rows = _rows(folder / "results.csv")
    assert [(r["variant"], r["seed"]) for r in rows] == [
        (v, s) for v in ("1", "4", "all") for s in ("0", "1")
    ]
    assert all(r["status"] == "ok" and r["ablation"] == "components" for r in rows)
    layers, heads, d, dim = layout_from_config("RL-Tiny-ViT-64").shape
    units = layers * heads + layers  # every head and every MLP learns K scales
    expected = {"1": units, "4": 4 * units, "all": layers * heads * d + layers * dim}
    assert {r["variant"]: int(r["learned_params"]) for r in rows} == expected
    for r in rows:
        curve = json.loads(r["val_curve"])
        assert len(curve) == int(r["epochs"]) == 2  # one point per epoch
        assert max(curve) == pytest.approx(float(r["best_val_accuracy"]))  # the checkpointed epoch

    table = (folder / "summary.md").read_text()
    for variant in expected:
        acc = [float(r["test_accuracy"]) for r in rows if r["variant"] == variant]
        mean, std = 100 * statistics.fmean(acc), 100 * statistics.stdev(acc)
        line = rf"^\| {variant} \| residual \| {mean:.1f} ± {std:.1f} \| 2 \| {expected[variant]:,} \|"
        assert re.search(line, table, re.M), table
    assert (folder / "components.png").stat().st_size > 5_000
    assert "## Ablation `components`" in (out / "report.md").read_text()
    assert "![components](components/components.png)" in (out / "report.md").read_text()

    # Started again, finished cells are skipped: nothing trains, results.csv is unchanged.
    def no_run(*_, **__):
        raise AssertionError("a finished cell ran again")

    before = (folder / "results.csv").read_text()
    monkeypatch.setattr(grid, "run_one", no_run)
    ablations.main(argv)
    assert (folder / "results.csv").read_text() == before


@pytest.mark.slow
def test_coarse_vs_residual_curves_and_the_selection_curve(tmp_path, cache):
    out = tmp_path / "out"
    common = ["--seeds", "0", "--max_epochs", "2", "--out", str(out), "--cache_dir", cache]
    ablations.main(["coarse_vs_residual", *common, *CPU])
    folder = out / "coarse_vs_residual"
    rows = {r["variant"]: r for r in _rows(folder / "results.csv")}
    assert [rows[v]["method"] for v in ("coarse", "residual")] == ["coarse", "residual"]
    layers, heads, d, dim = layout_from_config("RL-Tiny-ViT-64").shape
    assert int(rows["coarse"]["learned_params"]) == layers * heads
    assert int(rows["residual"]["learned_params"]) == layers * heads * d + layers * dim
    assert all(len(json.loads(r["val_curve"])) == 2 for r in rows.values())
    assert json.loads(rows["coarse"]["val_curve"]) != json.loads(rows["residual"]["val_curve"])
    assert (folder / "coarse_vs_residual.png").stat().st_size > 5_000

    # The selection curve from the same harness: on the data config the training runs resolve to.
    ablations.main(["selection", "--selection_seeds", "3", *common, *CPU])
    sel = out / "selection"
    config = (sel / "config.yaml").read_text()
    assert "RL-Tiny-ViT-64" in config and "digits" in config and cache in config
    curve = _rows(sel / "selection.csv")
    assert {r["score"] for r in curve} == {"full", "zeroshot", "text_corr", "output_corr", "random"}
    assert all(int(r["seeds"]) == 3 for r in curve if r["score"] == "random")
    full = next(r for r in curve if r["score"] == "full")
    # Every head kept is the frozen model: its zero-shot accuracy on the same test split.
    assert float(full["test_accuracy"]) == pytest.approx(float(rows["coarse"]["zeroshot_accuracy"]), abs=1e-6)
    summary = (sel / "summary.md").read_text()
    assert (
        f"All heads: {100 * float(full['test_accuracy']):.1f}%." in summary
        and (sel / "selection.png").is_file()
    )
    report = (out / "report.md").read_text()
    assert report.index("coarse vs ResiDual") < report.index("head top-k selection curve")

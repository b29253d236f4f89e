"""`residual-lightning analyze ...` end to end, offline, on the quickstart digits data.

One module-scoped fit (2 epochs) builds the caches and a checkpoint; every subcommand then runs
in-process through the console script's `main` on that cache.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from residual_lightning.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
L, H = 4, 4  # RL-Tiny-ViT-64
HEADS = [f"l{i}.h{h}" for i in range(L) for h in range(H)]
UNITS = ["emb", *(f"l{i}.mlp" for i in range(L)), *HEADS]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def png_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 5_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Fit the quickstart for 2 epochs (this builds the caches), return the folders and best checkpoint."""
    root = tmp_path_factory.mktemp("analyze")
    cache, runs = root / "cache", root / "runs"
    main(
        [
            "fit", "--config", CONFIG, "--trainer.max_epochs", "2",
            "--data.cache_dir", str(cache), "--data.extract_batch_size", "256",
            "--trainer.logger.init_args.save_dir", str(runs), "--trainer.default_root_dir", str(runs),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        ]
    )  # fmt: skip
    best = sorted(runs.rglob("best-*.ckpt"))
    assert len(best) == 1
    return {"root": root, "cache": cache, "ckpt": best[0], "run_dir": best[0].parent.parent}


def analyze(run, command: str, out: str, *args: str) -> Path:
    out_dir = run["root"] / out
    main(
        [
            "analyze",
            command,
            "--config",
            CONFIG,
            "--data.cache_dir",
            str(run["cache"]),
            "--out_dir",
            str(out_dir),
            *args,
        ]
    )
    return out_dir


def test_intrinsic_dim(run):
    out = analyze(run, "intrinsic-dim", "id", "--max_samples", "400")
    units = read_csv(out / "intrinsic_dim_units.csv")
    assert [r["unit"] for r in units] == UNITS
    for r in units:
        assert 1 <= int(r["linear_id"]) <= 128 and int(r["n_points"]) == 400
        assert 0 < float(r["twonn_id"]) < 128
    layers = read_csv(out / "intrinsic_dim_layers.csv")
    assert {(int(r["layer"]), r["kind"]) for r in layers} == {(-1, "emb")} | {
        (i, k) for i in range(L) for k in ("heads", "mlp")
    }
    heads0 = next(r for r in layers if r["layer"] == "0" and r["kind"] == "heads")
    assert float(heads0["linear_id"]) == pytest.approx(
        sum(int(r["linear_id"]) for r in units if r["unit"].startswith("l0.h")) / H
    )
    assert png_ok(out / "intrinsic_dim.png")
    assert json.loads((out / "intrinsic_dim.json").read_text())["samples"] == 400


def test_similarity_one_and_two_configs(run):
    out = analyze(run, "similarity", "sim")
    rows = read_csv(out / "similarity.csv")
    assert len(rows) == len(HEADS) ** 2
    s = {(r["unit_a"], r["unit_b"]): float(r["similarity"]) for r in rows}
    for a in HEADS:
        assert s[(a, a)] == pytest.approx(1.0, abs=1e-6)  # float32 bases
        for b in HEADS:
            assert 0.0 <= s[(a, b)] <= 1.0 + 1e-6 and s[(a, b)] == pytest.approx(s[(b, a)])
    assert png_ok(out / "similarity.png") and png_ok(out / "similarity_layers.png")
    assert len(read_csv(out / "similarity_layers.csv")) == L * L
    # The same data as a second config: every unit matches itself exactly.
    out2 = analyze(
        run,
        "similarity",
        "sim2",
        "--config2",
        CONFIG,
        "--data2.cache_dir",
        str(run["cache"]),
        "--units",
        "l0.mlp,l3.h1",
    )
    same = read_csv(out2 / "similarity_same_unit.csv")
    assert [r["unit"] for r in same] == ["l0.mlp", "l3.h1"]
    assert all(float(r["similarity"]) == pytest.approx(1.0, abs=1e-6) for r in same)


def test_textspan_and_somp(run, tmp_path):
    out = analyze(run, "textspan", "ts", "--units", "l3.h1,l0.mlp", "--k", "3")
    rows = read_csv(out / "textspan.csv")
    assert [(r["unit"], int(r["rank"])) for r in rows] == [
        (u, i) for u in ("l3.h1", "l0.mlp") for i in (1, 2, 3)
    ]
    for r in rows:
        assert 0.0 < float(r["share"]) <= float(r["cumulative"]) <= 1.0 and r["description"]
    assert png_ok(out / "textspan.png")
    assert json.loads((out / "textspan.json").read_text())["bank_size"] > 500
    bank = tmp_path / "bank.txt"
    bank.write_text("\n".join(["a red object", "a blue object", "a cat", "a dog", "handwriting", "a number"]))
    out = analyze(
        run,
        "textspan",
        "somp",
        "--units",
        "l1.h0",
        "--k",
        "4",
        "--bank",
        str(bank),
        "--method",
        "somp",
        "--max_samples",
        "300",
    )
    rows = read_csv(out / "textspan.csv")
    assert len(rows) == 4 and len({r["index"] for r in rows}) == 4
    allowed = set(bank.read_text().splitlines()) | {f'a photo of the number: "{i}".' for i in range(10)}
    assert {r["description"] for r in rows} <= allowed
    cumulative = [float(r["cumulative"]) for r in rows]
    assert cumulative == sorted(cumulative) and cumulative[-1] <= 1.0


def test_selection(run):
    out = analyze(run, "selection", "sel", "--seeds", "3")
    rows = read_csv(out / "selection.csv")
    assert len(rows) == 1 + 2 * 4 * 7  # full + replace x score x fraction
    assert {r["score"] for r in rows} == {"full", "zeroshot", "text_corr", "output_corr", "random"}
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0 and 1 <= int(r["k"]) <= L * H
    one = [r for r in rows if r["score"] == "zeroshot" and int(r["k"]) == 1]
    assert all(r["heads"] in HEADS for r in one)
    assert png_ok(out / "selection.png")
    run["selection_full"] = float(next(r for r in rows if r["score"] == "full")["test_accuracy"])


def test_report(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run["root"] / "report"
    # No --config: the data module is rebuilt from the run's config.yaml.
    main(
        [
            "analyze",
            "report",
            "--ckpt",
            str(run["ckpt"]),
            "--out_dir",
            str(out),
            "--id_samples",
            "300",
            "--top_units",
            "3",
        ]
    )
    md = (out / "report.md").read_text()
    summary = json.loads((out / "report.json").read_text())
    assert "accuracy" in md and "learned parameters" in md
    assert summary["learned_parameters"] == L * H * 64 + L * 128
    assert f"{summary['learned_parameters']:,}" in md
    for name in ("accuracy", "lambda_movement", "id_profile", "lambda_heatmap"):
        assert png_ok(out / f"{name}.png") and f"({name}.png)" in md
    assert summary["movement_from_init"] is True
    assert len({s["unit"] for s in summary["textspan"]}) == 3
    # The report's accuracies are those of Lightning's test loop on the best checkpoint.
    events = EventAccumulator(str(run["run_dir"]))
    events.Reload()
    test = summary["accuracy"]["test"]
    assert test["adapted"] == pytest.approx(events.Scalars("test/accuracy")[-1].value, abs=1e-6)
    assert test["zeroshot"] == pytest.approx(events.Scalars("test/zeroshot_accuracy")[-1].value, abs=1e-6)
    if "selection_full" in run:  # the unablated selection row is the zero-shot model
        assert run["selection_full"] == pytest.approx(test["zeroshot"], abs=1e-9)


def test_report_rebuilds_initial_lambdas_and_logs_to_tensorboard(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from residual_lightning.adapters import build_adapter
    from residual_lightning.analysis.lambdas import initial_unit_weights
    from residual_lightning.analysis.report import log_report_to_tensorboard, write_report
    from residual_lightning.data.datamodule import ResidualDataModule
    from residual_lightning.model import ResidualModel

    dm = ResidualDataModule.from_config(CONFIG, cache_dir=str(run["cache"]))
    dm.prepare_data()
    dm.setup()
    model = ResidualModel.load_from_checkpoint(str(run["ckpt"]), map_location="cpu", weights_only=True)
    fresh = build_adapter("residual", dm.bases(), dm.head_maps)
    init = initial_unit_weights(model)
    assert torch.allclose(init["heads"], fresh.head_lambdas.detach().float())
    assert torch.allclose(init["mlps"], fresh.mlp_lambdas.detach().float())

    lonely = tmp_path / "lonely.ckpt"
    shutil.copy(run["ckpt"], lonely)
    with pytest.raises(FileNotFoundError, match="--config"):
        write_report(lonely, tmp_path / "nope")

    out = run["root"] / "report"
    if not (out / "report.md").exists():
        write_report(run["ckpt"], out, dm, top_units=1, id_samples=200)
    writer = SummaryWriter(str(tmp_path / "tb"))
    log_report_to_tensorboard(writer, out)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"report/accuracy", "report/lambda_heatmap"} <= set(tags["images"])
    assert any(t.startswith("report") for t in tags["tensors"])  # the markdown text
    assert not math.isnan(events.Images("report/accuracy")[0].width)


def test_report_and_textspan_under_the_paper_recipe(run):
    """`--recipe paper` reaches the report's TextSpan and ID profile (the authors' definitions)."""
    out = run["root"] / "report-paper"
    args = ["--ckpt", str(run["ckpt"]), "--out_dir", str(out), "--id_samples", "300", "--top_units", "2"]
    main(["analyze", "report", *args, "--recipe", "paper"])
    summary = json.loads((out / "report.json").read_text())
    assert summary["recipe"] == "paper" and "`paper` recipe" in (out / "report.md").read_text()
    layer = next(r for r in summary["intrinsic_dim"]["layers"] if r["layer"] == 2 and r["kind"] == "heads")
    heads = [u for u in summary["intrinsic_dim"]["units"] if u["unit"].startswith("l2.h")]
    mean = sum(u["linear_id"] for u in heads) / sum(u["twonn_id"] for u in heads)
    assert layer["ratio"] == pytest.approx(mean)  # the ratio of the layer means
    assert len({s["unit"] for s in summary["textspan"]}) == 2
    paper = analyze(run, "textspan", "ts-paper", "--units", "l3.h1,l0.mlp", "--k", "3", "--recipe", "paper")
    picks = [(r["unit"], r["index"]) for r in read_csv(paper / "textspan.csv")]
    assert len(picks) == 6 and json.loads((paper / "textspan.json").read_text())["recipe"] == "paper"
    default = run["root"] / "ts" / "textspan.csv"  # written by test_textspan_and_somp
    if default.exists():
        assert picks != [(r["unit"], r["index"]) for r in read_csv(default)]

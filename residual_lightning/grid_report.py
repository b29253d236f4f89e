"""The grid's results on disk: ``results.csv`` (one row per run) and ``results.md`` (tables).

Pure Python (csv, statistics): `residual_lightning.grid` runs the grid and calls these after every
run; nothing here imports torch or reads configs.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from residual_lightning.files import atomic_path

FIELDS = [
    "backbone",
    "dataset",
    "method",
    "seed",
    "status",
    "test_accuracy",
    "zeroshot_accuracy",
    "test_top5",
    "best_val_accuracy",
    "learned_params",
    "epochs",
    "prepare_s",
    "wall_s",
    "best_checkpoint",
    "log_dir",
    "error",
]
KEY = ("backbone", "dataset", "method", "seed")


def read_rows(path: Path) -> list[dict]:
    """Rows of an existing results.csv (empty if absent)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Rewrite results.csv atomically (a killed grid never leaves a torn file).

    Args:
        path: the CSV file.
        rows: its rows.
        fields: its columns (default: the grid's `FIELDS`; the ablations add their own).
    """
    fields = FIELDS if fields is None else fields
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:  # a unique temporary name
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})


def _floats(rows: list[dict], field: str) -> list[float]:
    """The non-empty values of `field` in the successful rows."""
    return [float(r[field]) for r in rows if r.get("status") == "ok" and r.get(field) not in (None, "")]


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"m ± s"`` (sample std, ddof 1) of `values` times `scale`; just ``"m"`` for one value.

    Args:
        values: the per-seed values.
        scale: 100 for accuracies in %.
        digits: decimals.
    """
    if not values:
        return "—"
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def markdown(
    rows: list[dict],
    backbones: list[str],
    datasets: list[str],
    methods: list[str],
    names: dict[str, str],
) -> str:
    """results.md: accuracy table (mean ± std over seeds) and a parameters/time table.

    Args:
        rows: the rows of results.csv.
        backbones: the grid's backbones, in table order (rows of other backbones are left out).
        datasets: the grid's datasets, likewise.
        methods: the grid's methods (config names), likewise.
        names: each method's `model.method` (``"zeroshot"`` marks the methods that learn nothing).
    """
    rows = [
        r for r in rows if r["backbone"] in backbones and r["dataset"] in datasets and r["method"] in methods
    ]
    trained = [m for m in methods if names[m] != "zeroshot"]
    seeds = sorted(
        {int(r["seed"]) for r in rows if r.get("status") == "ok" and names[r["method"]] != "zeroshot"}
    )
    errors = [r for r in rows if r.get("status") != "ok"]

    def cell(b: str, d: str, m: str | None) -> list[dict]:
        return [
            r for r in rows if r["backbone"] == b and r["dataset"] == d and (m is None or r["method"] == m)
        ]

    lines = [
        "# ResiDual grid: test accuracy (%)",
        "",
        f"Mean ± sample std over seeds {', '.join(map(str, seeds)) or '—'}; each run tests its best-validation "
        "checkpoint (model selection on validation only). `zero-shot` is the frozen backbone on the same test "
        "set (deterministic, measured in every run). `—`: no successful run.",
        "",
        "| backbone | dataset | zero-shot | " + " | ".join(trained) + " |",
        "|---|---|---:|" + "---:|" * len(trained),
    ]
    for b in backbones:
        per_method: dict[str, list[float]] = {m: [] for m in ["zero-shot", *trained]}
        for d in datasets:
            zs = _floats(cell(b, d, None), "zeroshot_accuracy")
            values = [mean_std(zs[:1])] + [mean_std(_floats(cell(b, d, m), "test_accuracy")) for m in trained]
            lines.append(f"| {b} | {d} | " + " | ".join(values) + " |")
            if zs:
                per_method["zero-shot"].append(zs[0])
            for m in trained:
                acc = _floats(cell(b, d, m), "test_accuracy")
                if acc:
                    per_method[m].append(statistics.fmean(acc))
        if len(datasets) > 1:
            avg = [
                f"{100 * statistics.fmean(v):.1f}" if len(v) == len(datasets) else "—"
                for v in per_method.values()
            ]
            lines.append(f"| {b} | **average** | " + " | ".join(avg) + " |")
    lines += [
        "",
        "## Learned parameters and time per run",
        "",
        "Wall time: fit + test of one run, mean over its runs; cache building is apart (`prepare_s` in "
        "results.csv, paid once per backbone and dataset).",
        "",
        "| backbone | method | learned parameters | epochs (mean) | wall time, s (mean) |",
        "|---|---|---:|---:|---:|",
    ]
    for b in backbones:
        for m in methods:
            ok = [r for r in rows if r["backbone"] == b and r["method"] == m and r.get("status") == "ok"]
            if not ok:
                lines.append(f"| {b} | {m} | — | — | — |")
                continue
            params = sorted({int(r["learned_params"]) for r in ok})
            epochs = statistics.fmean(_floats(ok, "epochs"))
            wall = statistics.fmean(_floats(ok, "wall_s"))
            lines.append(
                f"| {b} | {m} | {' / '.join(f'{p:,}' for p in params)} | {epochs:.1f} | {wall:.1f} |"
            )
    if errors:
        lines += [
            "",
            "## Failed runs",
            "",
            "| backbone | dataset | method | seed | error |",
            "|---|---|---|---|---|",
        ]
        for r in errors:
            error = str(r.get("error", "")).replace("|", "\\|")
            lines.append(f"| {r['backbone']} | {r['dataset']} | {r['method']} | {r['seed']} | {error} |")
    return "\n".join(lines) + "\n"

"""The ablations' results on disk: per-ablation ``results.csv``, ``summary.md``, a PNG figure, and
the index ``report.md`` of an ablation folder (written by `residual_lightning.ablations`).

Rows are the grid's (`residual_lightning.grid_report.FIELDS`) plus the ablation, the variant and
``val_curve``: the validation accuracy after each epoch, as a JSON list read back from the run's
logs. Summaries are mean ± sample std (ddof 1) over seeds, like the grid's table. Nothing here
imports torch or runs anything.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from residual_lightning.grid_report import FIELDS, mean_std
from residual_lightning.plots import new_figure, save_png

__all__ = [
    "FIELDS_ABLATION",
    "KEY_ABLATION",
    "curve_of",
    "plot_curves",
    "plot_variants",
    "report_markdown",
    "selection_markdown",
    "summarise",
    "summary_markdown",
]

FIELDS_ABLATION = ["ablation", "variant", *FIELDS, "val_curve"]
KEY_ABLATION = ("ablation", "variant", "backbone", "dataset", "method", "seed")


def curve_of(row: dict) -> list[float]:
    """The per-epoch validation accuracies of a results row (empty when none were read)."""
    text = row.get("val_curve") or ""
    return [float(v) for v in json.loads(text)] if text else []


def summarise(rows: Sequence[dict], variants: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per variant, in `variants` order: its successful seeds and their statistics.

    Args:
        rows: rows of one ablation's results.csv.
        variants: the variant labels, in table order.

    Returns:
        Dicts with ``variant``, ``method``, ``seeds`` (sorted ints), ``accuracies`` (per seed, in
        seed order), ``mean``, ``std`` (sample std over seeds; 0 for a single seed; None with no
        seed), ``learned_params`` (sorted distinct counts) and ``curves`` (per seed).
    """
    out = []
    for variant in variants:
        ok = sorted(
            (r for r in rows if r["variant"] == variant and r.get("status") == "ok"),
            key=lambda r: int(r["seed"]),
        )
        acc = [float(r["test_accuracy"]) for r in ok]
        out.append(
            {
                "variant": variant,
                "method": ok[0]["method"] if ok else "",
                "seeds": [int(r["seed"]) for r in ok],
                "accuracies": acc,
                "mean": statistics.fmean(acc) if acc else None,
                "std": (statistics.stdev(acc) if len(acc) > 1 else 0.0) if acc else None,
                "learned_params": sorted({int(r["learned_params"]) for r in ok}),
                "curves": [curve_of(r) for r in ok],
            }
        )
    return out


def summary_markdown(
    ablation: str, title: str, summary: Sequence[dict], rows: Sequence[dict], figure: str
) -> str:
    """``summary.md`` of one ablation: the table (variant, test accuracy mean ± std, seeds, learned
    parameters, best validation accuracy), the figure and the failed runs.

    Args:
        ablation: the ablation's name.
        title: what it varies, for the heading.
        summary: `summarise` of its rows.
        rows: its results.csv rows (for the failed runs and the validation accuracies).
        figure: the figure's file name, next to summary.md.
    """
    lines = [
        f"# Ablation `{ablation}`: {title}",
        "",
        "Test accuracy (%) of the best-validation checkpoint, mean ± sample std over seeds.",
        "",
        "| variant | method | test accuracy (%) | seeds | learned parameters | best val accuracy (%) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        val = [
            float(r["best_val_accuracy"])
            for r in rows
            if r["variant"] == s["variant"] and r.get("status") == "ok" and r.get("best_val_accuracy")
        ]
        params = " / ".join(f"{p:,}" for p in s["learned_params"]) or "—"
        lines.append(
            f"| {s['variant']} | {s['method'] or '—'} | {mean_std(s['accuracies'])} | {len(s['seeds'])} "
            f"| {params} | {mean_std(val)} |"
        )
    lines += ["", f"![{ablation}]({figure})", ""]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["## Failed runs", "", "| variant | seed | error |", "|---|---|---|"]
        lines += [
            f"| {r['variant']} | {r['seed']} | {str(r.get('error', '')).replace('|', '/')} |" for r in failed
        ]
        lines.append("")
    return "\n".join(lines)


def plot_variants(summary: Sequence[dict], path: str | Path, title: str, dpi: int = 120) -> Path:
    """Bars of mean test accuracy per variant with ± std error bars, every seed as a dot, and the
    learned parameters under each bar.

    Args:
        summary: `summarise` of the ablation's rows.
        path: PNG file to write.
        title: axes title.
        dpi: resolution.
    """
    fig = new_figure(1.6 + 1.1 * max(len(summary), 2), 3.8)
    ax = fig.subplots()
    x = np.arange(len(summary))
    means = [s["mean"] if s["mean"] is not None else 0.0 for s in summary]
    stds = [s["std"] or 0.0 for s in summary]
    bars = ax.bar(x, means, 0.6, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.bar_label(
        bars, [f"{m:.3f}" if s["mean"] is not None else "—" for m, s in zip(means, summary)], fontsize=8
    )
    for i, s in enumerate(summary):
        ax.plot([i] * len(s["accuracies"]), s["accuracies"], "o", color="k", markersize=3)
    labels = [
        f"{s['variant']}\n{' / '.join(f'{p:,}' for p in s['learned_params']) or '—'} params" for s in summary
    ]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1.1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return save_png(fig, path, dpi)


def plot_curves(summary: Sequence[dict], path: str | Path, title: str, dpi: int = 120) -> Path:
    """Training curves side by side: validation accuracy per epoch (each seed thin, the mean over
    the seeds that reached an epoch thick), and test accuracy with learned parameters per variant.

    Args:
        summary: `summarise` of the ablation's rows.
        path: PNG file to write.
        title: figure title.
        dpi: resolution.
    """
    fig = new_figure(10, 3.8)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    for i, s in enumerate(summary):
        colour = f"C{i}"
        for curve in s["curves"]:
            left.plot(range(1, len(curve) + 1), curve, color=colour, lw=0.8, alpha=0.4)
        longest = max((len(c) for c in s["curves"]), default=0)
        mean = [statistics.fmean(c[e] for c in s["curves"] if len(c) > e) for e in range(longest)]
        params = " / ".join(f"{p:,}" for p in s["learned_params"]) or "—"
        left.plot(range(1, longest + 1), mean, color=colour, lw=2, marker="o", markersize=3.5,
                  label=f"{s['variant']} ({params} learned)")  # fmt: skip
    left.set_xlabel("epoch")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("validation accuracy")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    x = np.arange(len(summary))
    means = [s["mean"] if s["mean"] is not None else 0.0 for s in summary]
    bars = right.bar(x, means, 0.6, yerr=[s["std"] or 0.0 for s in summary], capsize=4,
                     color=[f"C{i}" for i in range(len(summary))], alpha=0.8)  # fmt: skip
    right.bar_label(bars, [f"{m:.3f}" for m in means], fontsize=8)
    right.set_xticks(x, [s["variant"] for s in summary], fontsize=8)
    right.set_ylabel("test accuracy (mean ± std over seeds)")
    right.set_ylim(0, 1.1)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return save_png(fig, path, dpi)


def selection_markdown(rows: Sequence[dict], figure: str) -> str:
    """``summary.md`` of the head-selection curve: test accuracy per score and replacement (rows)
    and fraction of heads kept (columns); the random score as mean ± std over its seeds.

    Args:
        rows: rows of `residual_lightning.analysis.selection.selection_curve` (as read from
            selection.csv: strings or numbers).
        figure: the figure's file name, next to summary.md.
    """
    curve = [r for r in rows if r["score"] != "full"]
    ks = sorted({(float(r["fraction"]), int(float(r["k"]))) for r in curve})
    lines = [
        "# Ablation `selection`: head top-k selection curve",
        "",
        "Heads scored on validation, test accuracy (%) with the top-k heads kept (`analyze selection`).",
        "",
        "| score | others → | " + " | ".join(f"k={k} ({100 * f:.3g}%)" for f, k in ks) + " |",
        "|---|---|" + "---:|" * len(ks),
    ]
    for key in dict.fromkeys((r["score"], r["replace"]) for r in curve):
        cells = []
        for _, k in ks:
            hit = [r for r in curve if (r["score"], r["replace"]) == key and int(float(r["k"])) == k]
            if not hit:
                cells.append("—")
                continue
            acc, std = 100 * float(hit[0]["test_accuracy"]), 100 * float(hit[0]["std"])
            cells.append(f"{acc:.1f} ± {std:.1f}" if int(float(hit[0]["seeds"])) > 1 else f"{acc:.1f}")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    full = [r for r in rows if r["score"] == "full"]
    if full:
        lines += ["", f"All heads: {100 * float(full[0]['test_accuracy']):.1f}%."]
    lines += ["", f"![selection]({figure})", ""]
    return "\n".join(lines)


def report_markdown(out: Path, order: Sequence[str]) -> str:
    """``report.md`` of an ablation folder: every finished ablation's summary, in `order`, with the
    figures' paths made relative to the folder.

    Args:
        out: the ablations' folder (``--out``).
        order: the ablation names, in report order.
    """
    parts = ["# ResiDual ablations", ""]
    for name in order:
        summary = out / name / "summary.md"
        if not summary.exists():
            continue
        text = summary.read_text().replace("](", f"]({name}/").replace("# Ablation", "## Ablation", 1)
        parts += [text, ""]
    return "\n".join(parts)

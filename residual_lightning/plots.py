"""Every figure of the package: training pictures for TensorBoard and the analyses' PNGs.

One idiom throughout: a figure is a `matplotlib.figure.Figure` on its own Agg canvas
(`new_figure`), never pyplot state, so drawing works headless, in worker processes and in a
notebook without switching its backend. `save_png` writes a figure to disk and `log_figure` hands
it to a logger. Functions named ``*_figure`` return the figure; ``plot_*`` draw and save a PNG
and return its path.

Letters: L layers, H heads per layer, K components, C classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

__all__ = [
    "confusion_figure",
    "lambda_figure",
    "log_figure",
    "lr_finder_figure",
    "new_figure",
    "plot_accuracy",
    "plot_id_profile",
    "plot_lambda_heatmap",
    "plot_lambda_movement",
    "plot_selection_curve",
    "plot_similarity_heatmap",
    "plot_textspan",
    "save_png",
    "spectra_figure",
]

UNIT_COLOURS = {"head": "tab:blue", "mlp": "tab:orange", "emb": "tab:green", "output": "tab:purple"}
SCORE_STYLES = {  # head score of the selection curve -> (colour, legend label)
    "zeroshot": ("tab:blue", "zero-shot accuracy"),
    "text_corr": ("tab:orange", "text-subspace corr."),
    "output_corr": ("tab:green", "output corr."),
    "random": ("tab:gray", "random (mean ± std)"),
}


# -------------------- The idiom ------------------------------------------------------------


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """An empty figure of ``width x height`` inches on its own Agg canvas.

    Args:
        width: inches.
        height: inches.
        layout: matplotlib layout engine (``constrained``, ``tight``, None), applied at every draw.
    """
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure as a PNG (parent folders created) and return the path.

    Args:
        fig: the figure.
        path: PNG file to write.
        dpi: resolution.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def log_figure(experiment: Any, tag: str, fig: Figure, step: int = 0) -> None:
    """Hand a figure to a logger: drawn here to RGB, then ``experiment.add_image`` (TensorBoard).

    Args:
        experiment: a ``SummaryWriter`` (``trainer.logger.experiment`` of a TensorBoard logger).
        tag: image tag.
        fig: the figure.
        step: global step.
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3) uint8
    experiment.add_image(tag, image, step, dataformats="HWC")


# -------------------- Training pictures (returned as figures, logged by the callbacks) -----


def lambda_figure(weights: dict[str, torch.Tensor], title: str | None = None) -> Figure | None:
    """Heatmap of learned weights: one row per unit (heads, then MLPs), one column per component.

    Args:
        weights: ``adapter.unit_weights()`` (kind -> (..., K) values; NaN where not learned).
        title: axes title; with one, the rows' kind labels stand alone (no "unit" axis label).

    Returns:
        The figure, or None when there are no weights.
    """
    rows, labels = [], []
    for kind, values in weights.items():
        v = values.detach().float().cpu()
        v = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v[None]  # (units, K)
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
    fig = new_figure(8, min(12, 2 + 0.04 * mat.shape[0]), layout="tight")
    ax = fig.subplots()
    finite = mat[torch.isfinite(mat)]
    lim = float(finite.abs().max()) if finite.numel() else 1.0
    im = ax.imshow(mat.numpy(), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
    start = 0
    for kind, n in labels:
        ax.axhline(start - 0.5, color="k", lw=0.5)
        ax.text(-0.5, start + n / 2, kind, ha="right", va="center", fontsize=8)
        start += n
    ax.set_xlabel("component (sorted by explained variance)")
    ax.set_ylabel("" if title else "unit")
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, label="λ")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def spectra_figure(bases: Any) -> Figure:
    """Explained-variance ratio spectra of the heads (one line each) and of the MLPs.

    Args:
        bases: `UnitBases` (its ``heads`` and ``mlps`` bases).
    """
    fig = new_figure(10, 3.5, layout="tight")
    axes = fig.subplots(1, 2)
    for ax, (kind, basis) in zip(axes, (("heads", bases.heads), ("MLPs", bases.mlps))):
        ratio = basis.explained_variance_ratio.detach().cpu()
        for r in ratio.reshape(-1, ratio.shape[-1]):  # (units, K)
            ax.semilogy(np.arange(1, len(r) + 1), r.clamp_min(1e-8).numpy(), lw=0.5, alpha=0.5)
        ax.set_title(f"{kind}: explained variance ratio")
        ax.set_xlabel("component")
    return fig


def confusion_figure(matrix: torch.Tensor, class_names: list[str]) -> Figure:
    """Row-normalised confusion matrix (true class in rows).

    Args:
        matrix: (C, C) rates.
        class_names: the C names (tick labels up to 40 classes).
    """
    n = len(class_names)
    side = min(14, 2 + 0.35 * n)
    fig = new_figure(side, side, layout="tight")
    ax = fig.subplots()
    im = ax.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax)
    return fig


def lr_finder_figure(
    lrs: Sequence[float], losses: Sequence[float], suggested: int | None = None, log_x: bool = True
) -> Figure:
    """Loss against learning rate of an LR-finder run, the suggested point in red.

    Args:
        lrs: learning rates tried.
        losses: the (smoothed) loss at each.
        suggested: index of the suggestion, or None.
        log_x: logarithmic learning-rate axis (the finder's exponential mode).
    """
    fig = new_figure(6.4, 4.8, layout="tight")
    ax = fig.subplots()
    ax.plot(lrs, losses)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("Learning rate")
    ax.set_ylabel("Loss")
    if suggested is not None:
        ax.plot(lrs[suggested], losses[suggested], markersize=10, marker="o", color="red")
    return fig


# -------------------- Analysis pictures (saved as PNG) -------------------------------------


def plot_id_profile(
    rows: Iterable[Mapping[str, Any]], path: str | Path, title: str | None = None, dpi: int = 120
) -> Path:
    """Plot linear ID, TwoNN ID and their ratio against depth, one line per unit kind.

    Args:
        rows: per-layer rows from `layer_profile` (keys layer, kind, linear_id, twonn_id, ratio);
            "emb" is drawn as a single marker at layer -1.
        path: PNG file to write; parent folders are created.
        title: figure title.
        dpi: resolution.
    """
    rows = list(rows)
    fig = new_figure(11, 3.6)
    axes = fig.subplots(1, 3)
    panels = [
        ("linear_id", "linear ID (99% variance)"),
        ("twonn_id", "TwoNN ID"),
        ("ratio", "linear / TwoNN"),
    ]
    styles = {"heads": ("o-", "heads (mean)"), "mlp": ("s--", "MLP"), "emb": ("*", "emb")}
    for ax, (key, label) in zip(axes, panels):
        for kind, (fmt, name) in styles.items():
            sel = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["layer"])
            if sel:
                ax.plot([r["layer"] for r in sel], [r[key] for r in sel], fmt, label=name, markersize=4)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_png(fig, path, dpi)


def plot_similarity_heatmap(
    matrix: torch.Tensor | np.ndarray,
    path: str | Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    dpi: int = 120,
) -> Path:
    """Draw a (n, n) similarity matrix (e.g. from `similarity_matrix`) as a heatmap.

    Args:
        matrix: (n, n) or (n, m) scores.
        path: PNG file to write; parent folders are created.
        labels: tick labels (rows, and columns when square); omitted when None or longer than 64.
        title: axes title.
        vmin: lower end of the colour scale.
        vmax: upper end of the colour scale.
        dpi: resolution.
    """
    values = torch.as_tensor(matrix).detach().cpu().double().numpy()
    if values.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {values.shape}")
    side = min(12.0, 3.0 + 0.25 * max(values.shape))
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="spectral cosine similarity")
    if labels is not None and len(labels) <= 64:
        ax.set_yticks(range(values.shape[0]), labels[: values.shape[0]], fontsize=7)
        if values.shape[0] == values.shape[1]:
            ax.set_xticks(range(values.shape[1]), labels[: values.shape[1]], fontsize=7, rotation=90)
    if title:
        ax.set_title(title)
    return save_png(fig, path, dpi)


def plot_selection_curve(
    rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None, dpi: int = 120
) -> Path:
    """Test accuracy against the fraction of heads kept: one colour per score, one line style per
    replacement (solid: zero, dashed: mean), the random band at +-1 std, the full model dotted.

    Args:
        rows: rows of `selection_curve`.
        path: PNG file to write; parent folders are created.
        title: figure title.
        dpi: resolution.
    """
    rows = list(rows)
    fig = new_figure(7.5, 4.6)
    ax = fig.subplots()
    styles = {"zero": "-", "mean": "--"}
    scores = [s for s in dict.fromkeys(r["score"] for r in rows) if s != "full"]
    for score in scores:
        for rep, style in styles.items():
            sel = sorted(
                (r for r in rows if r["score"] == score and r["replace"] == rep), key=lambda r: r["fraction"]
            )
            if not sel:
                continue
            x = np.array([r["fraction"] for r in sel])
            y = np.array([r["test_accuracy"] for r in sel])
            colour = SCORE_STYLES.get(score, (None, score))[0]
            ax.plot(x, y, style, marker="o", markersize=3.5, color=colour, lw=1.6)
            if score == "random":
                s = np.array([r["std"] for r in sel])
                ax.fill_between(x, y - s, y + s, color=colour, alpha=0.15, lw=0)
    full = [r for r in rows if r["score"] == "full"]
    if full:
        ax.axhline(full[0]["test_accuracy"], color="k", ls=":", lw=1.2)
    ax.set_xscale("log")
    fractions = sorted({r["fraction"] for r in rows if r["score"] != "full"})
    if fractions:
        ax.set_xticks(fractions, [f"{100 * f:.3g}%" for f in fractions], fontsize=8)
        ax.minorticks_off()
    ax.set_xlabel("heads kept (fraction of all heads, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    colour_label = [SCORE_STYLES.get(s, ("k", s)) for s in scores]
    handles = [Line2D([], [], color=colour, lw=2, label=label) for colour, label in colour_label]
    reps = sorted({r["replace"] for r in rows if r["score"] != "full"})
    handles += [Line2D([], [], color="k", ls=styles[r], label=f"others → {r}") for r in reps if r in styles]
    if full:
        handles.append(Line2D([], [], color="k", ls=":", label=f"all heads ({full[0]['test_accuracy']:.3f})"))
    ax.legend(handles=handles, fontsize=8, loc="lower right", framealpha=0.9)
    ax.set_title(title or "Head selection: scores on validation, accuracy on test", fontsize=10)
    return save_png(fig, path, dpi)


def plot_textspan(
    rows: Sequence[dict[str, Any]], path: str | Path, title: str, limit: int = 40, dpi: int = 120
) -> Path:
    """Horizontal bars: variance explained per unit by its picks, split by pick, top-1 description written.

    Args:
        rows: rows of `head_descriptions` / `somp_descriptions` (unit, rank, description, share,
            cumulative).
        path: PNG file to write.
        title: axes title.
        limit: units shown (those explained most).
        dpi: resolution.
    """
    units = list(dict.fromkeys(r["unit"] for r in rows))
    totals = {u: max(r["cumulative"] for r in rows if r["unit"] == u) for u in units}
    shown = sorted(units, key=lambda u: -totals[u])[:limit][::-1]
    fig = new_figure(9.5, 1.3 + 0.3 * max(len(shown), 3))
    ax = fig.subplots()
    for y, unit in enumerate(shown):
        left = 0.0
        picks = sorted((r for r in rows if r["unit"] == unit), key=lambda r: r["rank"])
        for r in picks:
            colour = f"C{(r['rank'] - 1) % 10}"
            ax.barh(y, r["share"], left=left, color=colour, alpha=0.85, edgecolor="white", lw=0.5)
            left += r["share"]
        text = picks[0]["description"] if picks else ""
        ax.text(left + 0.01, y, text if len(text) <= 45 else text[:44] + "…", va="center", fontsize=7)
    ax.set_yticks(range(len(shown)), shown, fontsize=8)
    ax.set_xlim(0, 1.45)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel(
        "share of the unit's variance explained (segments: 1st, 2nd, ... description; text: the 1st)"
    )
    ax.grid(axis="x", alpha=0.3)
    note = f" (top {len(shown)} of {len(units)} units)" if len(units) > len(shown) else ""
    ax.set_title(title + note, fontsize=10)
    return save_png(fig, path, dpi)


def plot_accuracy(acc: dict[str, dict[str, float]], method: str, path: str | Path, dpi: int = 120) -> Path:
    """Zero-shot vs adapted accuracy per cached part, bars labelled with their value.

    Args:
        acc: ``{part: {"zeroshot": acc, "adapted": acc, "samples": n}}`` (`evaluate_caches`).
        method: legend label of the adapted bars.
        path: PNG file to write.
        dpi: resolution.
    """
    fig = new_figure(5.6, 3.4)
    ax = fig.subplots()
    parts = list(acc)
    x = np.arange(len(parts))
    width = 0.36
    for i, (key, label, colour) in enumerate(
        (("zeroshot", "zero-shot", "tab:gray"), ("adapted", method, "tab:blue"))
    ):
        values = [acc[p][key] for p in parts]
        bars = ax.bar(x + (i - 0.5) * width, values, width, label=label, color=colour)
        ax.bar_label(bars, [f"{v:.3f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, [f"{p} ({acc[p]['samples']:,})" for p in parts])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.1)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.set_title("Accuracy on the cached parts (samples in brackets)", fontsize=10)
    return save_png(fig, path, dpi)


def plot_lambda_movement(
    rows: list[dict[str, Any]], from_init: bool, path: str | Path, limit: int = 20, dpi: int = 120
) -> Path:
    """Bars of the units whose λ moved most, coloured by kind.

    Args:
        rows: rows of `lambda_movement`, sorted by decreasing movement.
        from_init: whether movement is measured from the initial λ (else from 1).
        path: PNG file to write.
        limit: units shown.
        dpi: resolution.
    """
    shown = rows[:limit][::-1]
    fig = new_figure(6.4, 1.2 + 0.26 * max(len(shown), 3))
    ax = fig.subplots()
    ax.barh(
        [r["unit"] for r in shown],
        [r["moved"] for r in shown],
        color=[UNIT_COLOURS.get(r["kind"], "k") for r in shown],
    )
    ax.set_xlabel(
        "Σ |λ − λ_init| over learned components" if from_init else "Σ |λ − 1| over learned components"
    )
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    kinds = list(dict.fromkeys(r["kind"] for r in shown))
    handles = [Patch(color=UNIT_COLOURS.get(k, "k"), label=k) for k in kinds]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_title(f"Units whose λ moved most (top {len(shown)} of {len(rows)})", fontsize=10)
    return save_png(fig, path, dpi)


def plot_lambda_heatmap(weights: dict[str, torch.Tensor], path: str | Path, dpi: int = 120) -> Path | None:
    """`lambda_figure` of learned λs, titled for a report, saved as a PNG (None without weights).

    Args:
        weights: ``adapter.unit_weights()``.
        path: PNG file to write.
        dpi: resolution.
    """
    title = "Learned λ: one row per unit, one column per principal component (blank: not learned)"
    fig = lambda_figure(weights, title=title)
    return None if fig is None else save_png(fig, path, dpi)

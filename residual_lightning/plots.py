"""Every figure of the package: training pictures for TensorBoard and the analyses' PNGs.

One idiom throughout: a figure is a `matplotlib.figure.Figure` on its own Agg canvas
(`new_figure`), never pyplot state, so drawing works headless, in worker processes and in a
notebook without switching its backend (nothing here calls ``matplotlib.use``). `save_png` writes a
figure to disk and `log_figure` hands it to any logger with image support, through that logger's
own API. Functions named ``*_figure`` return the figure; ``plot_*`` draw and save a PNG and return
its path.

Letters: L layers, H heads per layer, K components, C classes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

log = logging.getLogger(__name__)

__all__ = [
    "class_accuracy_figure",
    "confusion_figure",
    "figure_image",
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
    "top_confusions_figure",
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


def figure_image(fig: Figure) -> np.ndarray:
    """The figure drawn on an Agg canvas, as an (H, W, 3) uint8 RGB array.

    Args:
        fig: the figure.
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _artifact_name(tag: str, step: int) -> str:
    """A file name for a tagged figure: ``<tag>/step_000012.png``, odd characters replaced."""
    parts = [re.sub(r"[^\w.-]+", "_", p) for p in tag.split("/") if p]
    return "/".join(parts or ["figure"]) + f"/step_{int(step):06d}.png"


def log_figure(logger: Any, tag: str, fig: Figure, step: int = 0) -> bool:
    """Hand a figure to a logger through that logger's own image API.

    Tried in order: a TensorBoard ``SummaryWriter`` (``logger.experiment.add_figure``, or
    ``add_image`` of the drawn RGB array), an MLflow client (``logger.experiment.log_figure(run_id,
    figure, artifact_file)``, the file ``<tag>/step_<step>.png``), then the logger's own
    ``log_image(key, images=[...], step=...)`` (W&B and other loggers), given the RGB array. A logger
    with none of these is skipped (a debug message). Also accepted: a bare ``SummaryWriter``, a list
    of loggers (``trainer.loggers``), or None.

    Args:
        logger: a Lightning logger (``trainer.logger``), a list of them, a SummaryWriter, or None.
        tag: image tag (key).
        fig: the figure.
        step: global step.

    Returns:
        Whether some logger took the figure.
    """
    if logger is None:
        return False
    if isinstance(logger, (list, tuple)):
        return any([log_figure(one, tag, fig, step) for one in logger])
    exp = logger if hasattr(logger, "add_figure") or hasattr(logger, "add_image") else None
    if exp is None and not hasattr(logger, "log_image"):
        exp = getattr(logger, "experiment", None)
    if exp is not None and callable(getattr(exp, "add_figure", None)):
        exp.add_figure(tag, fig, step, close=False)
        return True
    if exp is not None and callable(getattr(exp, "add_image", None)):
        exp.add_image(tag, figure_image(fig), step, dataformats="HWC")
        return True
    run_id = getattr(logger, "run_id", None)
    if exp is not None and callable(getattr(exp, "log_figure", None)) and run_id is not None:
        exp.log_figure(run_id, fig, _artifact_name(tag, step))
        return True
    if callable(getattr(logger, "log_image", None)):
        logger.log_image(key=tag, images=[figure_image(fig)], step=step)
        return True
    log.debug("figure %r not logged: %s has no image support", tag, type(logger).__name__)
    return False


# -------------------- Training pictures (returned as figures, logged by the callbacks) -----


def _layer_ticks(
    ax: Any, layers: int, per_layer: int, axis: str = "y", label: bool = True, most: int = 16
) -> None:
    """Ticks at the middle of each layer's block of ``per_layer`` rows (at most ``most``
    labelled), thin separators between the blocks."""
    every = max(1, math.ceil(layers / max(most, 1)))
    shown = list(range(0, layers, every))
    centres = [i * per_layer + (per_layer - 1) / 2 for i in shown]
    set_ticks = ax.set_yticks if axis == "y" else ax.set_xticks
    set_ticks(centres, [f"L{i}" for i in shown] if label else [], fontsize=7)
    if per_layer > 1:
        line = ax.axhline if axis == "y" else ax.axvline
        for i in range(1, layers):
            line(i * per_layer - 0.5, color="white", lw=0.6)


def lambda_figure(weights: dict[str, torch.Tensor], title: str | None = None) -> Figure | None:
    """Heatmap of learned weights: one panel per kind of unit (heads, MLPs, ...), one row per unit,
    one column per component; layers ticked (``L0``, ``L1``, ...) and separated by thin lines.

    Args:
        weights: ``adapter.unit_weights()`` (kind -> (..., K) values; NaN where not learned):
            (L, H, K) heads give L blocks of H rows, (L, K) one row per layer, (K,) one row.
        title: figure title (default: a generic one).

    Returns:
        The figure, or None when there are no weights.
    """
    panels = []  # (kind, (rows, K) matrix, layers, rows per layer)
    for kind, values in weights.items():
        v = values.detach().float().cpu()
        if v.ndim == 0 or v.numel() == 0:
            continue
        if v.ndim == 1:
            panels.append((kind, v[None], 0, 1))
        else:
            layers = v.shape[0]
            mat = v.reshape(-1, v.shape[-1])
            panels.append((kind, mat, layers, mat.shape[0] // layers))
    if not panels:
        return None
    finite = torch.cat([m[torch.isfinite(m)] for _, m, _, _ in panels])
    lim = float(finite.abs().max()) if finite.numel() else 1.0
    lim = lim if lim > 0 else 1.0
    rows = sum(m.shape[0] for _, m, _, _ in panels)
    ratios = [max(m.shape[0], 0.06 * rows, 1) for _, m, _, _ in panels]
    height = min(12.0, 2.2 + 0.045 * rows + 0.35 * len(panels))
    fig = new_figure(8.5, height)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False, height_ratios=ratios)[:, 0]
    width = max(m.shape[1] for _, m, _, _ in panels)
    for ax, ratio, (kind, mat, layers, per_layer) in zip(axes, ratios, panels):
        ax.patch.set(facecolor="white", edgecolor="0.75", hatch="////")  # shows through NaN cells
        im = ax.imshow(
            mat.numpy(), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest"
        )
        ax.set_xlim(-0.5, width - 0.5)
        if layers:  # 7-point labels need ~0.11 inch each
            _layer_ticks(
                ax, layers, per_layer, most=min(16, int((height - 1.5) * ratio / sum(ratios) / 0.11))
            )
        else:
            ax.set_yticks([])
        unit = f"{kind}\n({per_layer}/layer)" if per_layer > 1 else kind
        ax.set_ylabel(unit, rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel("principal component (sorted by explained variance)")
    fig.colorbar(im, ax=list(axes), label="λ", shrink=0.9)
    fig.suptitle(title or "Learned λ per unit and component (hatched: not learned)", fontsize=10)
    return fig


def spectra_figure(bases: Any) -> Figure:
    """Explained-variance ratio spectra of the heads and of the MLPs, one line per unit, coloured by
    depth (colour bar: layer).

    Args:
        bases: `UnitBases` (its ``heads`` and ``mlps`` bases).
    """
    kinds = [(k, b) for k, b in (("heads", bases.heads), ("MLPs", bases.mlps)) if b is not None]
    fig = new_figure(11, 3.8)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    layers = max(b.explained_variance_ratio.shape[0] for _, b in kinds)
    cmap = colormaps["viridis"]
    norm = BoundaryNorm(np.arange(-0.5, layers + 0.5), cmap.N)
    for ax, (kind, basis) in zip(axes, kinds):
        ratio = basis.explained_variance_ratio.detach().float().cpu()
        ratio = ratio[:, None] if ratio.ndim == 2 else ratio  # (L, units per layer, K)
        per_layer = ratio.shape[1]
        x = np.arange(1, ratio.shape[-1] + 1)
        for layer in range(ratio.shape[0]):
            for r in ratio[layer]:
                ax.semilogy(x, r.clamp_min(1e-8).numpy(), color=cmap(norm(layer)), lw=0.7, alpha=0.6)
        unit = f"{per_layer} heads/layer" if per_layer > 1 else "one per layer"
        ax.set_title(f"{kind}: explained variance ratio ({ratio.shape[0]} layers, {unit})", fontsize=9)
        ax.set_xlabel("principal component")
        ax.set_ylabel("explained variance ratio (log)")
        ax.grid(alpha=0.3, which="major")
    ticks = list(range(0, layers, max(1, math.ceil(layers / 12))))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="layer (depth)", ticks=ticks)
    return fig


def confusion_figure(matrix: torch.Tensor, class_names: list[str], max_classes: int = 30) -> Figure:
    """Row-normalised confusion matrix (true class in rows); with more than ``max_classes`` classes,
    `top_confusions_figure` instead (a matrix that large is unreadable).

    Args:
        matrix: (C, C) rates, each row summing to 1 (0 for a class absent from the data).
        class_names: the C names.
        max_classes: the most classes drawn as a matrix.
    """
    n = len(class_names)
    if n > max_classes:
        return top_confusions_figure(matrix, class_names)
    side = min(14, 3 + 0.35 * n)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    values = torch.as_tensor(matrix).detach().float().cpu().numpy()
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), class_names, rotation=_rotation(class_names), fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    if n <= 15:
        for (i, j), v in np.ndenumerate(values):
            if v >= 0.005:
                colour = "white" if v > 0.5 else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, label="fraction of the true class", shrink=0.8)
    ax.set_title(f"Test confusion matrix ({n} classes, rows normalised)", fontsize=10)
    return fig


def top_confusions_figure(matrix: torch.Tensor, class_names: list[str], top: int = 25) -> Figure:
    """Horizontal bars of the most confused (true → predicted) pairs of a row-normalised confusion
    matrix, the largest at the top.

    Args:
        matrix: (C, C) rates (true class in rows).
        class_names: the C names.
        top: pairs shown.
    """
    values = torch.as_tensor(matrix).detach().float().cpu().clone()
    values.fill_diagonal_(0)
    values = torch.nan_to_num(values, nan=0.0)
    k = min(top, values.numel())
    rates, flat = values.flatten().topk(k)
    keep = rates > 0
    rates, flat = rates[keep], flat[keep]
    n = len(class_names)
    pairs = [(class_names[i // n], class_names[i % n]) for i in flat.tolist()]
    fig = new_figure(8, 1.4 + 0.26 * max(len(pairs), 3))
    ax = fig.subplots()
    y = np.arange(len(pairs))[::-1]
    ax.barh(y, rates.numpy(), color="tab:red", alpha=0.8)
    ax.set_yticks(y, [f"{_short(t)} → {_short(p)}" for t, p in pairs], fontsize=7)
    ax.set_xlabel("fraction of the true class predicted as the other")
    ax.set_xlim(0, max(float(rates.max()) * 1.1, 0.05) if len(rates) else 1)
    ax.grid(axis="x", alpha=0.3)
    if not pairs:
        ax.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Most confused pairs, true → predicted (top {len(pairs)}, {n} classes)", fontsize=10)
    return fig


def _rotation(names: Sequence[str]) -> int:
    """Vertical tick labels unless every name is short."""
    return 0 if max((len(str(n)) for n in names), default=0) <= 3 else 90


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def class_accuracy_figure(accuracy: torch.Tensor | Sequence[float], class_names: list[str]) -> Figure:
    """Per-class test accuracy as one bar chart: every class named up to 60 classes (in class
    order), beyond that sorted with the 15 worst named.

    Args:
        accuracy: (C,) accuracies (NaN for classes absent from the test set).
        class_names: the C names.
    """
    acc = torch.as_tensor(accuracy).detach().float().cpu().numpy()
    n = len(class_names)
    mean = float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")
    if n <= 60:
        fig = new_figure(min(16, 3 + 0.28 * n), 4.2)
        ax = fig.subplots()
        ax.bar(np.arange(n), np.nan_to_num(acc), color="tab:blue")
        labels = [_short(c, 20) for c in class_names]
        ax.set_xticks(np.arange(n), labels, rotation=_rotation(labels), fontsize=7)
        ax.set_xlabel("class")
    else:
        order = np.argsort(np.nan_to_num(acc, nan=-1.0))
        fig = new_figure(11, 4.2)
        ax = fig.subplots()
        ax.bar(np.arange(n), np.nan_to_num(acc[order]), width=1.0, color="tab:blue")
        ax.set_xlim(-0.5, n - 0.5)
        worst = order[:15]
        ax.set_xticks(
            np.arange(len(worst)), [_short(class_names[i], 20) for i in worst], rotation=90, fontsize=7
        )
        ax.set_xlabel(f"classes sorted by accuracy (the {len(worst)} worst named)")
    note = ""
    if np.isfinite(mean):
        ax.axhline(mean, color="k", ls="--", lw=1)
        note = f"; dashed: mean over classes, {mean:.3f}"
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Per-class test accuracy ({n} classes{note})", fontsize=10)
    return fig


def lr_finder_figure(
    lrs: Sequence[float],
    losses: Sequence[float],
    suggested: int | None = None,
    log_x: bool = True,
    suggested_lr: float | None = None,
    ylabel: str = "training loss (smoothed)",
) -> Figure:
    """Loss against learning rate of an LR-finder run, the suggestion marked in red.

    Args:
        lrs: learning rates tried.
        losses: the (smoothed) loss at each.
        suggested: index of the point the rule picked (with ``suggested_lr``: the loss minimum), or None.
        log_x: logarithmic learning-rate axis (the finder's exponential mode).
        suggested_lr: the chosen rate when it is not one of ``lrs`` (the minimum divided by a
            factor): a dashed red line at it, and the point ``suggested`` marked as the minimum.
        ylabel: what the losses are.
    """
    fig = new_figure(6.4, 4.8)
    ax = fig.subplots()
    n = min(len(lrs), len(losses))
    ax.plot(lrs[:n], losses[:n], label="loss")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("learning rate" + (" (log scale)" if log_x else ""))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if suggested is not None:  # the curve's pick: the chosen rate itself unless one is given
        chosen = suggested_lr is None
        ax.plot(
            lrs[suggested],
            losses[suggested],
            markersize=10 if chosen else 8,
            marker="o",
            color="red" if chosen else "gray",
            ls="",
            label=f"{'suggested lr' if chosen else 'loss minimum'} {lrs[suggested]:.3g}",
        )
    if suggested_lr is not None:
        ax.axvline(suggested_lr, color="red", ls="--", label=f"chosen lr {suggested_lr:.3g}")
    if suggested is not None or suggested_lr is not None:
        ax.legend(fontsize=8)
    ax.set_title("LR finder", fontsize=10)
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
    title = "Learned λ: one row per unit, one column per principal component (hatched: not learned)"
    fig = lambda_figure(weights, title=title)
    return None if fig is None else save_png(fig, path, dpi)

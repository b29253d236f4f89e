"""Matplotlib figures of the analyses, saved as PNG: ID-vs-depth profile and similarity heatmap.

Figures are drawn on an explicit Agg canvas (`matplotlib.figure.Figure` + `FigureCanvasAgg`), so
these helpers work headless and never switch the pyplot backend of the calling notebook.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_id_profile", "plot_similarity_heatmap"]


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_id_profile(
    rows: Iterable[Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Plot linear ID, TwoNN ID and their ratio against depth, one line per unit kind.

    Args:
        rows: per-layer rows from `layer_profile` (keys layer, kind, linear_id, twonn_id, ratio);
            "emb" is drawn as a single marker at layer -1.
        path: PNG file to write; parent folders are created.
        title: figure title.
        dpi: resolution.

    Returns:
        The path written.
    """
    rows = list(rows)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
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
    return _save(fig, path, dpi)


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

    Returns:
        The path written.
    """
    values = torch.as_tensor(matrix).detach().cpu().double().numpy()
    if values.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {values.shape}")
    side = min(12.0, 3.0 + 0.25 * max(values.shape))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="spectral cosine similarity")
    if labels is not None and len(labels) <= 64:
        ax.set_yticks(range(values.shape[0]), labels[: values.shape[0]], fontsize=7)
        if values.shape[0] == values.shape[1]:
            ax.set_xticks(range(values.shape[1]), labels[: values.shape[1]], fontsize=7, rotation=90)
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)

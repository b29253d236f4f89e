"""Analyses of residual units (method.md §4): intrinsic dimension, spectral similarity, head
specialisation (TextSpan, SOMP), the unit-selection ablation, and the report of a checkpoint.

The library functions are torch/numpy (matplotlib only for plots), usable from a notebook on cached
contributions; `report` reads checkpoints; `cli` is `residual-lightning analyze`.
"""

from residual_lightning.analysis.intrinsic_dim import (
    id_profile,
    layer_profile,
    linear_id,
    pca_spectrum,
    twonn,
)
from residual_lightning.analysis.plots import plot_id_profile, plot_similarity_heatmap
from residual_lightning.analysis.selection import ablate, head_scores, plot_selection_curve, selection_curve
from residual_lightning.analysis.similarity import (
    greedy_matching,
    similarity_matrix,
    spectral_cosine_similarity,
    truncate_basis,
)
from residual_lightning.analysis.textspan import encode_bank, head_descriptions, load_bank, somp, textspan

__all__ = [
    "ablate",
    "encode_bank",
    "head_descriptions",
    "head_scores",
    "load_bank",
    "plot_selection_curve",
    "selection_curve",
    "somp",
    "textspan",
    "greedy_matching",
    "id_profile",
    "layer_profile",
    "linear_id",
    "pca_spectrum",
    "plot_id_profile",
    "plot_similarity_heatmap",
    "similarity_matrix",
    "spectral_cosine_similarity",
    "truncate_basis",
    "twonn",
]

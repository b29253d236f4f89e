"""Analyses of residual units (method.md §4): intrinsic dimension, spectral similarity, plots.

Pure torch/numpy (matplotlib only in `plots`), no Lightning: usable from a notebook on cached
contributions.
"""

from residual_lightning.analysis.intrinsic_dim import (
    id_profile,
    layer_profile,
    linear_id,
    pca_spectrum,
    twonn,
)
from residual_lightning.analysis.plots import plot_id_profile, plot_similarity_heatmap
from residual_lightning.analysis.similarity import (
    greedy_matching,
    similarity_matrix,
    spectral_cosine_similarity,
    truncate_basis,
)

__all__ = [
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

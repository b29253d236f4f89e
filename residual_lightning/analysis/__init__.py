"""Analyses of residual units (method.md §4): intrinsic dimension, spectral similarity, head
specialisation (TextSpan, SOMP), the unit-selection ablation, and the report of a checkpoint.

The library functions are torch/numpy, usable from a notebook on cached contributions; their
figures are drawn by `residual_lightning.plots` (re-exported here); `report` reads checkpoints;
`cli` is `residual-lightning analyze` and nothing imports it. `recipes` names the project's
(``default``) and the ResiDual authors' (``paper``) definitions of each analysis.
"""

from residual_lightning.analysis.bank import encode_bank, load_bank
from residual_lightning.analysis.contributions import unit_contributions, unit_names
from residual_lightning.analysis.intrinsic_dim import (
    id_profile,
    layer_profile,
    linear_id,
    pca_spectrum,
    twonn,
)
from residual_lightning.analysis.lambdas import lambda_movement
from residual_lightning.analysis.recipes import RECIPES, recipe_options
from residual_lightning.analysis.selection import ablate, head_scores, selection_curve
from residual_lightning.analysis.similarity import (
    greedy_matching,
    layer_similarity,
    similarity_matrix,
    spectral_cosine_similarity,
    truncate_basis,
    unit_similarity,
)
from residual_lightning.analysis.textspan import head_descriptions, somp, somp_descriptions, textspan
from residual_lightning.plots import plot_id_profile, plot_selection_curve, plot_similarity_heatmap

__all__ = [
    "RECIPES",
    "ablate",
    "encode_bank",
    "head_descriptions",
    "head_scores",
    "lambda_movement",
    "load_bank",
    "plot_selection_curve",
    "selection_curve",
    "somp",
    "somp_descriptions",
    "textspan",
    "greedy_matching",
    "id_profile",
    "layer_profile",
    "layer_similarity",
    "linear_id",
    "pca_spectrum",
    "recipe_options",
    "plot_id_profile",
    "plot_similarity_heatmap",
    "similarity_matrix",
    "spectral_cosine_similarity",
    "truncate_basis",
    "twonn",
    "unit_contributions",
    "unit_names",
    "unit_similarity",
]

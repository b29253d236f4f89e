"""Analysis recipes: the project's definitions (``default``) or the ResiDual authors' (``paper``).

`residual-lightning analyze ... --recipe paper` and the report under the paper recipe compute
the analyses as the authors' released code does (Flegyas/ResiDual; docs/reproducing.md,
"Analyses"); ``default`` keeps the project's variants. Each entry names the keyword arguments of
the library function it is passed to, so a notebook can use the same switches.
"""

from __future__ import annotations

from typing import Any, Literal

from residual_lightning.analysis.intrinsic_dim import PAPER_ID
from residual_lightning.analysis.selection import PAPER_SELECTION
from residual_lightning.analysis.textspan import PAPER_TEXTSPAN

__all__ = ["RECIPES", "Recipe", "recipe_options"]

Recipe = Literal["default", "paper"]

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "textspan": {"center_bank": True, "span": "centred", "rank": None},
        "selection": {"correlation": "project", "keep_rest": True, "k_rule": "round", "random": "uniform"},
        "twonn": {"ties": "collapse"},
        "layer_ratio": {"ratio": "mean_of_ratios"},
        "similarity": {"bases_from": "reference"},
    },
    "paper": {
        "textspan": dict(PAPER_TEXTSPAN),
        "selection": dict(PAPER_SELECTION),
        "twonn": {"ties": PAPER_ID["ties"]},
        "layer_ratio": {"ratio": PAPER_ID["ratio"]},
        # The authors compare bases fitted on each dataset's own split (experiment2.heads2pca).
        "similarity": {"bases_from": "train"},
    },
}


def recipe_options(recipe: str, analysis: str) -> dict[str, Any]:
    """Keyword arguments of one analysis under a recipe.

    Args:
        recipe: ``default`` or ``paper``.
        analysis: ``textspan``, ``selection``, ``twonn``, ``layer_ratio`` or ``similarity``.

    Returns:
        A fresh dict of keyword arguments.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown analysis recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    options = RECIPES[recipe]
    if analysis not in options:
        raise ValueError(f"unknown analysis {analysis!r}; valid: {', '.join(options)}")
    return dict(options[analysis])

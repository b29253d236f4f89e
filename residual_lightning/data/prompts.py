"""Prompt sets of zero-shot text classifiers: ``clip`` (the default) and ``clip_benchmark``.

``clip`` is the class names and templates of `residual_lightning.data.templates` (the CLIP paper's
lists; whatever ``class_names_file``/``templates_file`` give). ``clip_benchmark`` replaces them by
CLIP_benchmark's (https://github.com/LAION-AI/CLIP_benchmark, MIT licence), so that zero-shot
numbers can be compared with its tables. Its prompts are carried as data in
``residual_lightning/resources/clip_benchmark_prompts.json`` (source files, commit and licence in
the file); where CLIP_benchmark derives a dataset's names from the raw labels at run time the file
holds what it would produce and says so. They differ from ``clip`` for SVHN (``"zero"`` ..
``"nine"``, 6 templates), RESISC45 (TFDS names with underscores, 4 templates) and CIFAR-100
(``"aquarium_fish"``); the other datasets' lists are equal.

The names and templates selected are what the text classifier's cache key is made of, so the two
sets never share a classifier file where they differ.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Literal

__all__ = ["PROMPT_SETS", "PromptSet", "clip_benchmark_prompts", "select_prompts"]

PromptSet = Literal["clip", "clip_benchmark"]
PROMPT_SETS: tuple[str, ...] = ("clip", "clip_benchmark")
CLIP_BENCHMARK_FILE = "clip_benchmark_prompts.json"


@functools.cache
def _clip_benchmark_data() -> dict:
    text = importlib.resources.files("residual_lightning").joinpath("resources", CLIP_BENCHMARK_FILE)
    return json.loads(text.read_text("utf-8"))


def clip_benchmark_prompts(dataset: str) -> tuple[list[str], list[str]]:
    """CLIP_benchmark's class names and templates (with ``{}``) for a registry dataset.

    Args:
        dataset: registry dataset name (``cifar100``, ``svhn``, ...).

    Raises:
        ValueError: CLIP_benchmark has no prompt set for the dataset (``digits``, ``imagefolder``,
            ``csv``); the message names it and lists those it has.
    """
    datasets = _clip_benchmark_data()["datasets"]
    if dataset not in datasets:
        raise ValueError(
            f"data.prompts: clip_benchmark has no prompt set for dataset {dataset!r} (CLIP_benchmark does not "
            f"evaluate it); datasets with one: {', '.join(sorted(datasets))}. Use data.prompts: clip, or "
            "pass class_names_file/templates_file (data.dataset_options) with prompts: clip."
        )
    entry = datasets[dataset]
    return list(entry["class_names"]), [t.replace("{c}", "{}") for t in entry["templates"]]


def select_prompts(
    dataset: str, prompts: str, class_names: list[str] | None, templates: list[str]
) -> tuple[list[str] | None, list[str]]:
    """The class names and templates of prompt set `prompts` for a dataset.

    Args:
        dataset: registry dataset name.
        prompts: ``clip`` (returns `class_names` and `templates` unchanged) or ``clip_benchmark``.
        class_names: the names of the ``clip`` set (from the registry or the data; None while
            unknown).
        templates: the templates of the ``clip`` set.

    Raises:
        ValueError: an unknown prompt set; a dataset without a CLIP_benchmark set; or data whose
            number of classes differs from CLIP_benchmark's list.
    """
    if prompts not in PROMPT_SETS:
        raise ValueError(f"data.prompts must be one of {', '.join(PROMPT_SETS)}, got {prompts!r}")
    if prompts == "clip":
        return class_names, templates
    names, cb_templates = clip_benchmark_prompts(dataset)
    if class_names is not None and len(class_names) != len(names):
        raise ValueError(
            f"data.prompts: clip_benchmark: {dataset} has {len(class_names)} classes, CLIP_benchmark's list "
            f"{len(names)}"
        )
    return names, cb_templates

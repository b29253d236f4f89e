"""`residual-lightning analyze`: the analyses of method.md §4 from the command line.

Every subcommand reads the data of a fit config (its ``data:`` section; ``model:`` and
``trainer:`` are ignored), builds the caches if they are missing, and writes CSV/JSON tables and
PNG figures into ``--out_dir``::

    residual-lightning analyze intrinsic-dim --config configs/quickstart.yaml [--part train] [--max_samples 5000]
    residual-lightning analyze similarity --config A.yaml [--config2 B.yaml] [--units heads]
    residual-lightning analyze textspan --config configs/quickstart.yaml [--units l3.h1,l3.h2] [--k 5] [--bank my_bank.txt]
    residual-lightning analyze selection --config configs/quickstart.yaml [--seeds 10]
    residual-lightning analyze report --ckpt runs/.../best.ckpt [--config the_fit.yaml]

Every subcommand takes ``--recipe default|paper``: ``default`` computes the project's variants,
``paper`` the ResiDual authors' definitions (`residual_lightning.analysis.recipes`,
docs/reproducing.md "Analyses"); the recipe is recorded in each JSON summary.

Any data option given on the command line overrides the ``--config`` file's, like in ``fit``:
``--data.cache_dir /tmp/c`` (``--data2.*`` for the second config of ``similarity``). The data
module is `ResidualDataModule.from_config`; the computations are the library functions of
`residual_lightning.analysis` and the figures those of `residual_lightning.plots`; this module
only parses, calls them and writes their tables.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

from jsonargparse import ArgumentError, ArgumentParser

from residual_lightning.analysis.bank import encode_bank, load_bank
from residual_lightning.analysis.contributions import unit_contributions, unit_names
from residual_lightning.analysis.intrinsic_dim import id_profile, layer_profile
from residual_lightning.analysis.recipes import Recipe, recipe_options
from residual_lightning.analysis.report import write_report
from residual_lightning.analysis.selection import selection_curve
from residual_lightning.analysis.similarity import layer_similarity, similarity_bases, unit_similarity
from residual_lightning.analysis.somp import somp_descriptions
from residual_lightning.analysis.textspan import head_descriptions
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.plots import (
    plot_id_profile,
    plot_selection_curve,
    plot_similarity_heatmap,
    plot_textspan,
)

Score = Literal["zeroshot", "text_corr", "output_corr", "random"]

__all__ = ["intrinsic_dim", "main", "report", "selection", "similarity", "textspan"]


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _prepared(dm):
    dm.prepare_data()
    dm.setup()
    return dm


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")
    return path


def _describe(dm) -> dict[str, Any]:
    return {
        "dataset": dm.dataset,
        "backbone": {"model_name": dm.backbone.model_name, "pretrained": dm.backbone.pretrained},
        "convention": dm.convention,
        "cache_dir": str(dm.cache_dir),
    }


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------


def intrinsic_dim(
    datamodule,
    out_dir: str = "analysis",
    part: Literal["train", "val", "test"] = "train",
    max_samples: int | None = 5000,
    seed: int = 0,
    threshold: float = 0.99,
    fraction: float = 0.9,
    recipe: Recipe = "default",
) -> dict[str, Path]:
    """Linear and TwoNN intrinsic dimension of every unit, and its profile over depth.

    Writes intrinsic_dim_units.csv, intrinsic_dim_layers.csv, intrinsic_dim.png and intrinsic_dim.json.

    Args:
        datamodule: the data module (from --config).
        out_dir: output folder.
        part: cache part the units are read from.
        max_samples: seeded subsample of the part (TwoNN is quadratic in it); null uses all.
        seed: seed of the subsample.
        threshold: explained variance of the linear ID.
        fraction: fraction of neighbour ratios TwoNN keeps.
        recipe: ``default`` (duplicates collapsed, mean of per-head ratios) or ``paper`` (tied and
            duplicated points dropped, ratio of the layer means).
    """
    dm = _prepared(datamodule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = id_profile(
        unit_contributions(dm.caches[part], max_samples, seed),
        threshold=threshold,
        fraction=fraction,
        **recipe_options(recipe, "twonn"),
    )
    layers = layer_profile(rows, **recipe_options(recipe, "layer_ratio"))
    n = rows[0]["n_points"]
    files = {
        "units": _write_csv(out / "intrinsic_dim_units.csv", rows),
        "layers": _write_csv(out / "intrinsic_dim_layers.csv", layers),
        "figure": plot_id_profile(
            layers,
            out / "intrinsic_dim.png",
            title=f"{dm.backbone.model_name} on {dm.dataset}/{part}: intrinsic dimension ({n:,} samples)",
        ),
    }
    files["summary"] = _write_json(
        out / "intrinsic_dim.json",
        {
            **_describe(dm),
            "part": part,
            "recipe": recipe,
            "samples": n,
            "threshold": threshold,
            "fraction": fraction,
            "seconds": time.time() - started,
            "units": rows,
            "layers": layers,
        },
    )
    return files


def similarity(
    datamodule,
    datamodule2=None,
    out_dir: str = "analysis",
    units: str = "heads",
    threshold: float = 0.9,
    recipe: Recipe = "default",
) -> dict[str, Path]:
    """Spectral cosine similarity of the units' PCA bases: within one config, or between two.

    With one config: every pair of units of that model (and the per-layer mean over head pairs).
    With --config2: each unit of the first config against each unit of the second (the diagonal
    compares the same unit across datasets). Bases are cut at `threshold` explained variance.
    Writes similarity.csv (long form), similarity.png, similarity_layers.csv/.png, similarity.json
    and, with two configs, similarity_same_unit.csv.

    Args:
        datamodule: the data module (from --config).
        datamodule2: the second data module (from --config2), or None.
        out_dir: output folder.
        units: ``heads``, ``mlps``, ``all`` or comma-separated unit names (``l3.h1,l3.mlp``).
        threshold: cumulative explained variance each basis is cut at.
        recipe: ``default`` (bases of each config's PCA reference set; two datasets sharing one
            reference set are refused) or ``paper`` (each dataset's bases fitted on its own train
            split, as the authors).
    """
    dm = _prepared(datamodule)
    dm2 = _prepared(datamodule2) if datamodule2 is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers, heads = dm.head_maps.shape[:2]
    names = unit_names(units, layers, heads)
    if dm2 is not None and tuple(dm2.head_maps.shape[:3]) != tuple(dm.head_maps.shape[:3]):
        raise ValueError(
            "the two configs' backbones have different unit layouts; compare same-architecture models"
        )
    bases_from = recipe_options(recipe, "similarity")["bases_from"]
    bases, bases2 = similarity_bases(dm, dm2, bases_from)
    matrix, components = unit_similarity(bases, names, threshold, bases2=bases2)
    n = len(names)
    rows = [
        {"unit_a": names[i], "unit_b": names[j], "similarity": float(matrix[i, j])}
        for i in range(n)
        for j in range(n)
    ]
    second = f" vs {dm2.dataset}" if dm2 is not None else ""
    files = {
        "pairs": _write_csv(out / "similarity.csv", rows),
        "figure": plot_similarity_heatmap(
            matrix,
            out / "similarity.png",
            labels=names,
            title=f"{dm.dataset}{second}: spectral cosine similarity ({threshold:.0%} variance)",
        ),
    }
    # Per-layer mean over pairs of heads (self-pairs excluded within one config).
    layer_ids, layer_matrix, layer_rows = layer_similarity(matrix, names, cross=dm2 is not None)
    if layer_rows:
        files["layers"] = _write_csv(out / "similarity_layers.csv", layer_rows)
        files["layers_figure"] = plot_similarity_heatmap(
            layer_matrix.nan_to_num(0.0),
            out / "similarity_layers.png",
            labels=[f"layer {i}" for i in layer_ids],
            title=f"{dm.dataset}{second}: mean head similarity per layer pair",
        )
    same = None
    if dm2 is not None:
        same = [{"unit": u, "similarity": float(matrix[i, i])} for i, u in enumerate(names)]
        files["same_unit"] = _write_csv(out / "similarity_same_unit.csv", same)
    files["summary"] = _write_json(
        out / "similarity.json",
        {
            "a": _describe(dm),
            "b": _describe(dm2) if dm2 is not None else None,
            "threshold": threshold,
            "recipe": recipe,
            "bases_from": bases_from,
            "units": names,
            "components": components,
            "same_unit": same,
        },
    )
    return files


def textspan(
    datamodule,
    out_dir: str = "analysis",
    units: str | None = None,
    k: int = 5,
    bank: str | None = None,
    class_prompts: bool = True,
    method: Literal["textspan", "somp"] = "textspan",
    part: Literal["train", "val", "test"] = "train",
    max_samples: int | None = None,
    recipe: Recipe = "default",
) -> dict[str, Path]:
    """Text descriptions of units: TextSpan (or SOMP) over a description bank.

    Writes textspan.csv (unit, rank, index, description, share, cumulative), textspan.png and
    textspan.json.

    Args:
        datamodule: the data module (from --config).
        out_dir: output folder.
        units: ``heads`` (default), ``mlps``, ``all`` or comma-separated unit names (``l3.h1,l3.h2``).
        k: descriptions per unit.
        bank: description file (one per line, or a YAML list); null uses the shipped bank.
        class_prompts: append the dataset's class prompts to the bank.
        method: ``textspan`` (from streamed second moments: any number of samples) or ``somp``
            (on the samples themselves; bounded by max_samples, default 5000).
        part: cache part the units are read from.
        max_samples: samples used (null: all for textspan, 5000 for somp).
        recipe: ``default`` (centred bank, span of the centred data, every non-negligible
            direction) or ``paper`` (normalised bank only, span of the uncentred data, rank 80).
    """
    dm = _prepared(datamodule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers, heads = dm.head_maps.shape[:2]
    names = unit_names(units, layers, heads)
    templates = dm.templates
    descriptions = load_bank(
        bank, dm.class_names if class_prompts else None, templates[0] if templates else "a photo of a {}."
    )
    embeddings = encode_bank(dm.backbone, descriptions, cache_dir=dm.cache_dir)
    cache = dm.caches[part]
    started = time.time()
    if method == "textspan":
        rows = head_descriptions(
            cache,
            embeddings,
            descriptions,
            k=k,
            units=names,
            max_samples=max_samples,
            **recipe_options(recipe, "textspan"),
        )
    else:
        rows = somp_descriptions(
            cache, embeddings, descriptions, k=k, units=names, max_samples=max_samples or 5000
        )
    files = {"table": _write_csv(out / "textspan.csv", rows)}
    files["figure"] = plot_textspan(
        rows, out / "textspan.png", f"{method} on {dm.dataset}/{part}: variance explained by {k} descriptions"
    )
    files["summary"] = _write_json(
        out / "textspan.json",
        {
            **_describe(dm),
            "part": part,
            "method": method,
            "recipe": recipe,
            "k": k,
            "bank_size": len(descriptions),
            "bank": bank or "shipped",
            "seconds": time.time() - started,
            "units": names,
        },
    )
    return files


def selection(
    datamodule,
    out_dir: str = "analysis",
    fractions: tuple[Union[int, float], ...] = (1, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75),
    scores: tuple[Score, ...] = ("zeroshot", "text_corr", "output_corr", "random"),
    replace: tuple[Literal["zero", "mean"], ...] = ("zero", "mean"),
    seeds: int = 10,
    recipe: Recipe = "default",
) -> dict[str, Path]:
    """Head-selection ablation: keep the top-k heads by a score (on validation), test accuracy.

    Writes selection.csv, selection.png and selection.json.

    Args:
        datamodule: the data module (from --config).
        out_dir: output folder.
        fractions: heads kept: an int is a count (1 = one head), a float a share of all heads.
        scores: head scores (see residual_lightning.analysis.selection).
        replace: what replaces the removed heads: zero and/or their validation mean.
        seeds: seeds of the random score.
        recipe: ``default`` (emb and MLPs always kept, correlations with the full output, k
            rounded) or ``paper`` (only the kept heads survive, correlations with the sum of
            the heads, U on the QR basis of the outputs, k truncated, at least 2 at 1%). Removed
            units are replaced by their validation means under both.
    """
    dm = _prepared(datamodule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    weights, scale = dm.classifier()
    rows = selection_curve(
        dm.caches["val"],
        dm.caches["test"],
        weights,
        scale,
        fractions=fractions,
        scores=scores,
        replace=replace,
        seeds=seeds,
        **recipe_options(recipe, "selection"),
    )
    files = {
        "table": _write_csv(out / "selection.csv", rows),
        "figure": plot_selection_curve(
            rows,
            out / "selection.png",
            title=f"{dm.backbone.model_name} on {dm.dataset}: heads scored on val, accuracy on test",
        ),
    }
    files["summary"] = _write_json(
        out / "selection.json",
        {**_describe(dm), "recipe": recipe, "seconds": time.time() - started, "rows": rows},
    )
    return files


def report(
    ckpt: str,
    datamodule=None,
    out_dir: str = "analysis",
    top_units: int = 8,
    bank: str | None = None,
    descriptions_per_unit: int = 5,
    id_samples: int = 2000,
    recipe: Recipe = "default",
) -> dict[str, Path]:
    """A markdown report of a checkpoint (accuracy, units that moved, TextSpan, ID, lambdas).

    Args:
        ckpt: checkpoint written by `residual-lightning fit`.
        datamodule: the data module (from --config); null rebuilds it from the run's config.yaml.
        out_dir: output folder (report.md, report.json and PNGs).
        top_units: units whose descriptions are listed.
        bank: description file for TextSpan; null uses the shipped bank.
        descriptions_per_unit: TextSpan picks per unit.
        id_samples: train samples of the intrinsic-dimension profile.
        recipe: ``default`` or ``paper``: the TextSpan and intrinsic-dimension definitions used.
    """
    path = write_report(
        ckpt,
        out_dir,
        datamodule,
        top_units=top_units,
        bank=bank,
        descriptions_per_unit=descriptions_per_unit,
        id_samples=id_samples,
        recipe=recipe,
    )
    return {"report": path, "summary": path.with_name("report.json")}


COMMANDS = {
    "intrinsic-dim": (intrinsic_dim, ("data",)),
    "similarity": (similarity, ("data", "data2")),
    "textspan": (textspan, ("data",)),
    "selection": (selection, ("data",)),
    "report": (report, ("data",)),
}
_OPTIONAL_DATA = {"similarity": {"data2"}, "report": {"data"}}
_CONFIG_FLAG = {"data": "config", "data2": "config2"}  # the YAML each data group starts from
_ARGUMENT = {"data": "datamodule", "data2": "datamodule2"}


def _parser():

    parser = ArgumentParser(
        prog="residual-lightning analyze",
        description="Analyses of residual units (docs/analysis.md); each writes CSV/JSON and PNG into --out_dir.",
    )
    subcommands = parser.add_subcommands(dest="command")
    for name, (fn, groups) in COMMANDS.items():
        sub = ArgumentParser(description=(fn.__doc__ or "").strip().splitlines()[0])
        for group in groups:
            flag = f"--{_CONFIG_FLAG[group]}"
            sub.add_argument(
                flag,
                type=str | None,
                default=None,
                help=f"a `residual-lightning fit` YAML; only its data: section is read (into --{group}.*)",
            )
            sub.add_class_arguments(
                ResidualDataModule, group, help=f"data options (override the {flag} file)"
            )
        sub.add_function_arguments(fn, skip={"datamodule", "datamodule2"}, as_group=False)
        subcommands.add_subcommand(name, sub, help=sub.description)
    return parser


def main(argv: list[str]) -> None:
    """Entry point of ``residual-lightning analyze <subcommand> ...``.

    Each data module is `ResidualDataModule.from_config` of its ``--config`` file with the
    ``--data.*`` options given on the command line (``--config2``, ``--data2.*``) on top.

    Args:
        argv: the arguments after ``analyze``.
    """
    parser = _parser()
    cfg = parser.parse_args(argv)
    name = cfg.command
    fn, groups = COMMANDS[name]
    args = cfg[name]
    typed = parser.parse_args(argv, defaults=False)[name]  # only the options on the command line
    skip = {"__path__", *groups, *(_CONFIG_FLAG[g] for g in groups)}
    kwargs = {k: v for k, v in vars(args).items() if k not in skip}
    for group in groups:
        config = args[_CONFIG_FLAG[group]]
        overrides = dict(typed[group].items()) if typed.get(group) is not None else {}
        if config is None and not overrides and group in _OPTIONAL_DATA.get(name, set()):
            kwargs[_ARGUMENT[group]] = None
            continue
        try:
            kwargs[_ARGUMENT[group]] = ResidualDataModule.from_config(config, **overrides)
        except (ArgumentError, FileNotFoundError, ValueError) as err:
            parser.error(f"--{_CONFIG_FLAG[group]} {config}: {err}")
    files = fn(**kwargs)
    width = max(len(k) for k in files)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in files.items()))

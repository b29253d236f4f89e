"""`residual-lightning analyze`: the analyses of method.md §4 from the command line.

Every subcommand reads the data of a fit config (its ``data:`` section; ``model:`` and
``trainer:`` are ignored), builds the caches if they are missing, and writes CSV/JSON tables and
PNG figures into ``--out_dir``::

    residual-lightning analyze intrinsic-dim --config configs/quickstart.yaml [--part train] [--max_samples 5000]
    residual-lightning analyze similarity --config A.yaml [--config2 B.yaml] [--units heads]
    residual-lightning analyze textspan --config configs/quickstart.yaml [--units l3.h1,l3.h2] [--k 5] [--bank my_bank.txt]
    residual-lightning analyze selection --config configs/quickstart.yaml [--seeds 10]
    residual-lightning analyze report --ckpt runs/.../best.ckpt [--config the_fit.yaml]

Any data option can be overridden after ``--config`` like in ``fit``: ``--data.cache_dir /tmp/c``
(``--data2.*`` for the second config of ``similarity``).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

Score = Literal["zeroshot", "text_corr", "output_corr", "random"]

__all__ = [
    "datamodule_from_config",
    "intrinsic_dim",
    "main",
    "report",
    "selection",
    "similarity",
    "textspan",
]


# --------------------------------------------------------------------------------------------
# Config plumbing
# --------------------------------------------------------------------------------------------


def _data_section(path: str | Path) -> dict[str, Any]:
    """The ``data:`` section of a fit YAML (its ``init_args`` when written with a class_path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if data is None:
        raise ValueError(f"{path} has no data: section (expected a `residual-lightning fit` config)")
    if isinstance(data, dict) and "init_args" in data:
        data = data["init_args"] or {}
    return data


def _data_parser(groups: Sequence[str] = ("data",)):
    from jsonargparse import ArgumentParser

    from residual_lightning.data.datamodule import ResidualDataModule

    parser = ArgumentParser(exit_on_error=False)
    for group in groups:
        parser.add_class_arguments(ResidualDataModule, group)
    return parser


def _instantiate(parser, cfg):
    """`parser.instantiate` (jsonargparse >= 4.49) or `instantiate_classes` before it."""
    return parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)


def datamodule_from_config(config: str | Path | Sequence[str | Path], **overrides: Any):
    """Build the `ResidualDataModule` of one or more fit configs (later files override earlier).

    Args:
        config: fit YAML(s) with a ``data:`` section; other sections are ignored.
        **overrides: data options replacing the configs' (e.g. ``cache_dir="/tmp/c"``).

    Returns:
        The data module (not yet prepared nor set up).
    """
    configs = [config] if isinstance(config, str | Path) else list(config)
    parser = _data_parser()
    args: list[str] = []
    for path in configs:
        args += ["--data", yaml.safe_dump(_data_section(path))]
    for key, value in overrides.items():
        args += [f"--data.{key}", json.dumps(value) if not isinstance(value, str) else value]
    return _instantiate(parser, parser.parse_args(args)).data


_CONFIG_FLAGS = {"--config": "data", "--config2": "data2"}


def _expand_configs(argv: Sequence[str]) -> tuple[list[str], set[str]]:
    """Insert ``--data <the config's data section>`` after every ``--config PATH`` (``--data2`` for
    ``--config2``), so later ``--data.*`` flags override it; also report which groups were given."""
    out: list[str] = []
    given: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, _, value = arg.partition("=")
        if flag in _CONFIG_FLAGS:
            if not value:
                if i + 1 >= len(argv):
                    raise SystemExit(f"error: {flag} needs a path")
                i += 1
                value = argv[i]
            group = _CONFIG_FLAGS[flag]
            out += [flag, value, f"--{group}", yaml.safe_dump(_data_section(value))]
            given.add(group)
        else:
            if arg.startswith("--data2"):
                given.add("data2")
            elif arg.startswith("--data"):
                given.add("data")
            out.append(arg)
        i += 1
    return out, given


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


def _resolve_units(spec: str | None, layers: int, heads: int) -> list[str]:
    """Unit names from ``heads``, ``mlps``, ``all`` or a comma-separated list of names."""
    head_names = [f"l{i}.h{h}" for i in range(layers) for h in range(heads)]
    mlp_names = [f"l{i}.mlp" for i in range(layers)]
    if spec in (None, "", "heads"):
        return head_names
    if spec == "mlps":
        return mlp_names
    if spec == "all":
        return ["emb", *mlp_names, *head_names]
    names = [u.strip() for u in spec.split(",") if u.strip()]
    valid = {"emb", *mlp_names, *head_names}
    bad = [u for u in names if u not in valid]
    if bad:
        raise ValueError(
            f"unknown unit(s) {bad}; valid: emb, l<0..{layers - 1}>.mlp, l<l>.h<0..{heads - 1}>, heads, mlps, all"
        )
    return names


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
    """
    from residual_lightning.analysis.intrinsic_dim import id_profile, layer_profile
    from residual_lightning.analysis.plots import plot_id_profile
    from residual_lightning.analysis.report import unit_contributions

    dm = _prepared(datamodule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = id_profile(
        unit_contributions(dm.caches[part], max_samples, seed), threshold=threshold, fraction=fraction
    )
    layers = layer_profile(rows)
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
    """
    import torch

    from residual_lightning.analysis.plots import plot_similarity_heatmap
    from residual_lightning.analysis.similarity import spectral_cosine_similarity, truncate_basis

    dm = _prepared(datamodule)
    dm2 = _prepared(datamodule2) if datamodule2 is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers, heads = dm.head_maps.shape[:2]
    names = _resolve_units(units, layers, heads)

    def cut(bases, name):
        b = bases.unit(name)
        m = b.mask
        return truncate_basis(
            b.components[m],
            b.explained_variance[m],
            threshold,
            explained_variance_ratio=b.explained_variance_ratio[m],
        )

    bases_a = dm.bases()
    cut_a = [cut(bases_a, u) for u in names]
    if dm2 is None:
        cut_b = cut_a
    else:
        if (
            tuple(dm2.head_maps.shape[:2]) != (layers, heads)
            or dm2.head_maps.shape[2] != dm.head_maps.shape[2]
        ):
            raise ValueError(
                "the two configs' backbones have different unit layouts; compare same-architecture models"
            )
        bases_b = dm2.bases()
        cut_b = [cut(bases_b, u) for u in names]
    n = len(names)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i if dm2 is None else 0, n):
            s = spectral_cosine_similarity(cut_a[i][0], cut_b[j][0], cut_a[i][1], cut_b[j][1])
            matrix[i, j] = s
            if dm2 is None:
                matrix[j, i] = s
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
    head_idx = [(i, int(u[1:].split(".")[0])) for i, u in enumerate(names) if ".h" in u]
    layer_ids = sorted({layer for _, layer in head_idx})
    layer_rows, layer_matrix = (
        [],
        torch.full((len(layer_ids), len(layer_ids)), float("nan"), dtype=torch.float64),
    )
    for a, la in enumerate(layer_ids):
        for b, lb in enumerate(layer_ids):
            vals = [
                float(matrix[i, j])
                for i, li in head_idx
                if li == la
                for j, lj in head_idx
                if lj == lb and (dm2 is not None or i != j)
            ]
            if vals:
                layer_matrix[a, b] = sum(vals) / len(vals)
                layer_rows.append(
                    {
                        "layer_a": la,
                        "layer_b": lb,
                        "pairs": len(vals),
                        "mean_similarity": layer_matrix[a, b].item(),
                    }
                )
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
            "units": names,
            "components": [int(c[0].shape[0]) for c in cut_a],
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
    """
    from residual_lightning.analysis.report import unit_contributions
    from residual_lightning.analysis.textspan import encode_bank, head_descriptions, load_bank, somp

    dm = _prepared(datamodule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers, heads = dm.head_maps.shape[:2]
    names = _resolve_units(units, layers, heads)
    templates = dm.templates
    descriptions = load_bank(
        bank, dm.class_names if class_prompts else None, templates[0] if templates else "a photo of a {}."
    )
    embeddings = encode_bank(dm.backbone, descriptions, cache_dir=dm.cache_dir)
    cache = dm.caches[part]
    started = time.time()
    if method == "textspan":
        rows = head_descriptions(cache, embeddings, descriptions, k=k, units=names, max_samples=max_samples)
    else:
        rows = []
        for unit, x in unit_contributions(cache, max_samples or 5000, units=names):
            previous = 0.0
            for r, (index, explained) in enumerate(somp(x, embeddings, k=k)):
                rows.append(
                    {
                        "unit": unit,
                        "rank": r + 1,
                        "index": index,
                        "description": descriptions[index],
                        "share": explained - previous,
                        "cumulative": explained,
                    }
                )
                previous = explained
    files = {"table": _write_csv(out / "textspan.csv", rows)}
    files["figure"] = _plot_textspan(
        rows, out / "textspan.png", f"{method} on {dm.dataset}/{part}: variance explained by {k} descriptions"
    )
    files["summary"] = _write_json(
        out / "textspan.json",
        {
            **_describe(dm),
            "part": part,
            "method": method,
            "k": k,
            "bank_size": len(descriptions),
            "bank": bank or "shipped",
            "seconds": time.time() - started,
            "units": names,
        },
    )
    return files


def _plot_textspan(rows: Sequence[dict[str, Any]], path: Path, title: str, limit: int = 40) -> Path:
    """Horizontal bars: variance explained per unit by its picks, split by pick, top-1 description written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    units = list(dict.fromkeys(r["unit"] for r in rows))
    totals = {u: max(r["cumulative"] for r in rows if r["unit"] == u) for u in units}
    shown = sorted(units, key=lambda u: -totals[u])[:limit][::-1]
    fig = Figure(figsize=(9.5, 1.3 + 0.3 * max(len(shown), 3)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for y, unit in enumerate(shown):
        left = 0.0
        picks = sorted((r for r in rows if r["unit"] == unit), key=lambda r: r["rank"])
        for r in picks:
            ax.barh(
                y,
                r["share"],
                left=left,
                color=f"C{(r['rank'] - 1) % 10}",
                alpha=0.85,
                edgecolor="white",
                lw=0.5,
            )
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
    fig.savefig(path, dpi=120)
    return path


def selection(
    datamodule,
    out_dir: str = "analysis",
    fractions: tuple[Union[int, float], ...] = (1, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75),
    scores: tuple[Score, ...] = ("zeroshot", "text_corr", "output_corr", "random"),
    replace: tuple[Literal["zero", "mean"], ...] = ("zero", "mean"),
    seeds: int = 10,
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
    """
    from residual_lightning.analysis.selection import plot_selection_curve, selection_curve

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
        out / "selection.json", {**_describe(dm), "seconds": time.time() - started, "rows": rows}
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
    """
    from residual_lightning.analysis.report import write_report

    path = write_report(
        ckpt,
        out_dir,
        datamodule,
        top_units=top_units,
        bank=bank,
        descriptions_per_unit=descriptions_per_unit,
        id_samples=id_samples,
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


def _parser():
    from jsonargparse import ArgumentParser

    from residual_lightning.data.datamodule import ResidualDataModule

    parser = ArgumentParser(
        prog="residual-lightning analyze",
        description="Analyses of residual units (method.md §4); each writes CSV/JSON and PNG into --out_dir.",
    )
    subcommands = parser.add_subcommands(dest="command")
    for name, (fn, groups) in COMMANDS.items():
        sub = ArgumentParser(description=(fn.__doc__ or "").strip().splitlines()[0])
        for group in groups:
            flag = "--config" if group == "data" else "--config2"
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

    Args:
        argv: the arguments after ``analyze``.
    """
    argv, given = _expand_configs(list(argv))
    parser = _parser()
    cfg = parser.parse_args(argv)
    name = cfg.command
    fn, groups = COMMANDS[name]
    init = _instantiate(parser, cfg)[name]
    kwargs = {
        k: v for k, v in vars(init).items() if k not in ("config", "config2", "data", "data2", "__path__")
    }
    for group in groups:
        key = "datamodule" if group == "data" else "datamodule2"
        optional = group in _OPTIONAL_DATA.get(name, set())
        kwargs[key] = init[group] if (group in given or not optional) else None
    files = fn(**kwargs)
    width = max(len(k) for k in files)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in files.items()))

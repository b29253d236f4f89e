"""A readable report of a trained checkpoint: accuracy, the units that moved, what they encode.

`write_report(ckpt, out_dir)` writes ``report.md`` (plus ``report.json`` with the numbers) and
its PNGs into one folder:

- ``accuracy.png``: zero-shot vs adapted accuracy on the validation and test caches;
- ``lambda_movement.png``: the units whose lambdas moved most;
- ``id_profile.png``: linear and TwoNN intrinsic dimension of the units against depth;
- ``lambda_heatmap.png``: every learned lambda (units x components).

"Moved" is measured from the lambdas the adapter started from: ResiDual's default init is
``1 + N(0, 1)`` (seeded), so the distance to the identity (lambda = 1) mostly reflects the random
init. The init is rebuilt exactly from the checkpoint's adapter options (method preset, init and
seed) for the ``ones`` and ``normal`` inits; for the others the distance to 1 is used and the
report says so. `log_report_to_tensorboard` adds the markdown and the PNGs to a TensorBoard run.

Letters: N samples, L layers, H heads per layer, K components, D embedding size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "datamodule_from_checkpoint",
    "evaluate_caches",
    "initial_unit_weights",
    "lambda_movement",
    "log_report_to_tensorboard",
    "unit_contributions",
    "write_report",
]

_KIND = {"heads": "head", "mlps": "mlp", "emb": "emb", "output": "output"}
_COLOURS = {"head": "tab:blue", "mlp": "tab:orange", "emb": "tab:green", "output": "tab:purple"}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def datamodule_from_checkpoint(ckpt_path: str | Path):
    """Rebuild the `ResidualDataModule` a checkpoint was trained with.

    Looks for the data module's saved hyperparameters in the checkpoint, then for the
    ``config.yaml`` that `residual-lightning fit` saves in the run folder (next to the checkpoint
    or one folder up, as TensorBoard runs lay it out).

    Args:
        ckpt_path: the checkpoint file.

    Raises:
        FileNotFoundError: no data configuration could be found (pass the fit config instead).
    """
    from residual_lightning.data.datamodule import ResidualDataModule

    ckpt_path = Path(ckpt_path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a checkpoint with pickled extras: fall back to the run config
        ckpt = {}
    hparams = ckpt.get("datamodule_hyper_parameters")
    if hparams:
        return ResidualDataModule(**hparams)
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        config = folder / "config.yaml"
        if config.is_file():
            from residual_lightning.analysis.cli import datamodule_from_config

            return datamodule_from_config(config)
    raise FileNotFoundError(
        f"cannot tell which data {ckpt_path} was trained on: the checkpoint holds no data-module "
        "hyperparameters and no config.yaml sits next to it or in its run folder; pass the fit "
        "config: residual-lightning analyze report --ckpt <ckpt> --config <the fit YAML>"
    )


def unit_contributions(
    cache: Any, max_samples: int | None = None, seed: int = 0, units: Sequence[str] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """(name, (n, D) contributions) of every unit of a seeded subsample of a cache, one at a time.

    Only the subsample's compact coordinates are held; each head is expanded (``y @ A^T``) when
    its turn comes, so memory stays O(n * (L*k + L*D)).

    Args:
        cache: an `ActivationCache`.
        max_samples: subsample size (seeded, sorted indices); None uses every sample.
        seed: seed of the subsample.
        units: unit names to yield, in this order; None yields emb, the MLPs, then the heads.
    """
    n = len(cache)
    if max_samples is not None and max_samples < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
        batch = cache.batch(np.sort(idx.numpy()))
    else:
        batch = cache.batch(slice(0, n))
    maps = cache.head_maps.float()  # (L, H, D, k)
    layers, heads = maps.shape[:2]
    if units is None:
        units = ["emb", *(f"l{i}.mlp" for i in range(layers))]
        units += [f"l{i}.h{h}" for i in range(layers) for h in range(heads)]
    for name in units:
        if name == "emb":
            yield name, batch.emb.float()
            continue
        layer, _, rest = name.partition(".")
        layer = int(layer[1:])
        if rest == "mlp":
            yield name, batch.mlps[:, layer].float()  # (n, D)
        else:
            yield name, batch.heads[:, layer, int(rest[1:])].float() @ maps[layer, int(rest[1:])].T  # (n, D)


@torch.no_grad()
def evaluate_caches(
    model: Any, caches: dict[str, Any], parts: Sequence[str] = ("val", "test"), batch_size: int = 1024
) -> dict[str, dict[str, float]]:
    """Zero-shot and adapted accuracy of a `ResidualModel` on cached parts.

    Args:
        model: a `ResidualModel` with its adapter and frozen tensors filled in.
        caches: ``{part: ActivationCache}``.
        parts: parts to evaluate (missing ones are skipped).
        batch_size: samples per cache read.

    Returns:
        ``{part: {"zeroshot": acc, "adapted": acc, "samples": n}}``.
    """
    from residual_lightning.data.batch import embedding

    out = {}
    for part in parts:
        if part not in caches:
            continue
        correct_zs = correct = n = 0
        for batch in caches[part].iter_batches(batch_size):
            batch = batch.float()
            logits = model(batch)
            zs = model.logits_from_embedding(embedding(batch, model.head_maps))
            correct += int((logits.argmax(-1) == batch.label).sum())
            correct_zs += int((zs.argmax(-1) == batch.label).sum())
            n += len(batch)
        out[part] = {"zeroshot": correct_zs / max(n, 1), "adapted": correct / max(n, 1), "samples": n}
    return out


# --------------------------------------------------------------------------------------------
# Lambdas
# --------------------------------------------------------------------------------------------


def initial_unit_weights(model: Any) -> dict[str, Tensor] | None:
    """The adapter's lambdas at initialisation, keyed like ``adapter.unit_weights()``.

    Rebuilt from the method preset and the checkpoint's adapter options, drawing exactly what the
    adapter drew: ``ones`` and ``normal`` inits of `ResidualAdapter` and `CoarseAdapter`.

    Args:
        model: a `ResidualModel`.

    Returns:
        The initial weights, or None when they cannot be rebuilt (``eigen``/``singular`` inits,
        which depend on the PCA spectra, and the other adapters).
    """
    from residual_lightning.adapters import PRESETS, CoarseAdapter, ResidualAdapter, init_lambdas
    from residual_lightning.model import placeholder_bases
    from residual_lightning.units import EQUAL_SHARE_EXTRA

    adapter = getattr(model, "adapter", None)
    options = {**PRESETS.get(model.method, {}), **(model.adapter_options or {})}
    init, seed = options.get("init", "normal"), int(options.get("seed", 0))
    if init not in ("ones", "normal"):
        return None
    layers, heads, k, dim = model.hparams.shape
    gen = torch.Generator().manual_seed(seed)
    if isinstance(adapter, CoarseAdapter):
        if init == "ones":
            return {"heads": torch.ones(layers, heads)}
        return {"heads": (1.0 + torch.randn(layers, heads, generator=gen, dtype=torch.float64)).float()}
    if not isinstance(adapter, ResidualAdapter):
        return None
    d = k - EQUAL_SHARE_EXTRA if model.hparams.convention == "equal_share" else k
    if hasattr(adapter, "head_select"):
        d = adapter.head_select.shape[-1]
    bases = placeholder_bases(layers, heads, k, dim, d)
    out = {}
    # Same order and generator as ResidualAdapter.__init__: every kind draws, transformed or not.
    for prefix, kind, basis in (
        ("head", "heads", bases.heads),
        ("mlp", "mlps", bases.mlps),
        ("emb", "emb", bases.emb),
    ):
        lam = init_lambdas(init, basis, bases.n_samples, gen)
        if hasattr(adapter, f"{prefix}_lambdas"):
            out[kind] = lam.float()
    return out


def _unit_slices(kind: str, values: Tensor) -> Iterator[tuple[str, Tensor, tuple]]:
    """(unit name, its entries, index) of one kind of ``unit_weights()``."""
    if kind == "heads":
        layers, heads = values.shape[:2]
        for layer in range(layers):
            for h in range(heads):
                yield f"l{layer}.h{h}", values[layer, h].reshape(-1), (layer, h)
    elif kind == "mlps":
        for layer in range(values.shape[0]):
            yield f"l{layer}.mlp", values[layer].reshape(-1), (layer,)
    else:
        yield kind, values.reshape(-1), ()


def lambda_movement(model: Any) -> tuple[list[dict[str, Any]], bool]:
    """Per unit, how far its learned lambdas moved, sorted by decreasing movement.

    Args:
        model: a `ResidualModel`.

    Returns:
        ``(rows, from_init)``: one dict per unit with keys unit, kind, learned (number of learned
        lambdas), moved (sum over learned entries of ``|lambda - lambda_init|``, or of
        ``|lambda - 1|`` when the init cannot be rebuilt), from_identity (sum of ``|lambda - 1|``)
        and mean_from_identity; `from_init` tells which of the two `moved` is.
    """
    adapter = getattr(model, "adapter", None)
    weights = adapter.unit_weights() if adapter is not None else {}
    init = initial_unit_weights(model)
    from_init = init is not None and all(k in init for k in weights)
    rows = []
    for kind, values in weights.items():
        values = values.detach().double().cpu()
        start = init[kind].double() if from_init else None
        for name, v, index in _unit_slices(kind, values):
            learned = torch.isfinite(v)
            count = int(learned.sum())
            if not count:
                continue
            dist = float((v[learned] - 1.0).abs().sum())
            moved = float((v[learned] - start[index].reshape(-1)[learned]).abs().sum()) if from_init else dist
            rows.append(
                {
                    "unit": name,
                    "kind": _KIND.get(kind, kind),
                    "learned": count,
                    "moved": moved,
                    "from_identity": dist,
                    "mean_from_identity": dist / count,
                }
            )
    rows.sort(key=lambda r: -r["moved"])
    return rows, from_init


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_accuracy(acc: dict[str, dict[str, float]], method: str, path: Path) -> Path:
    fig = _figure(5.6, 3.4)
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
    fig.savefig(path, dpi=120)
    return path


def _plot_movement(rows: list[dict[str, Any]], from_init: bool, path: Path, limit: int = 20) -> Path:
    from matplotlib.patches import Patch

    shown = rows[:limit][::-1]
    fig = _figure(6.4, 1.2 + 0.26 * max(len(shown), 3))
    ax = fig.subplots()
    ax.barh(
        [r["unit"] for r in shown],
        [r["moved"] for r in shown],
        color=[_COLOURS.get(r["kind"], "k") for r in shown],
    )
    ax.set_xlabel(
        "Σ |λ − λ_init| over learned components" if from_init else "Σ |λ − 1| over learned components"
    )
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    kinds = list(dict.fromkeys(r["kind"] for r in shown))
    ax.legend(
        handles=[Patch(color=_COLOURS.get(k, "k"), label=k) for k in kinds], fontsize=8, loc="lower right"
    )
    ax.set_title(f"Units whose λ moved most (top {len(shown)} of {len(rows)})", fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def _save_lambda_heatmap(weights: dict[str, Tensor], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    from residual_lightning.callbacks import lambda_figure

    fig = lambda_figure(weights)
    if fig is None:
        return None
    ax = fig.axes[0]
    ax.set_ylabel("")  # the kind labels (heads, mlps) already name the row blocks
    ax.set_title(
        "Learned λ: one row per unit, one column per principal component (blank: not learned)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _check_compatible(model: Any, dm: Any) -> None:
    if list(model.class_names) != list(dm.class_names):
        raise ValueError(
            f"the checkpoint's classes ({len(model.class_names)}: {model.class_names[:5]}...) differ from the data "
            f"module's ({dm.num_classes}: {dm.class_names[:5]}...): pass the config the model was trained with"
        )
    maps = dm.head_maps.float()
    if tuple(model.head_maps.shape) != tuple(maps.shape) or not torch.allclose(
        model.head_maps.float(), maps, atol=1e-5
    ):
        raise ValueError(
            "the checkpoint's head maps differ from the data module's caches (another backbone, convention or "
            "random initialisation): pass the config and cache_dir the model was trained with"
        )


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    ckpt_path: str | Path,
    out_dir: str | Path,
    datamodule: Any = None,
    top_units: int = 8,
    bank: str | Path | Sequence[str] | None = None,
    descriptions_per_unit: int = 5,
    id_samples: int = 2000,
    seed: int = 0,
) -> Path:
    """Write ``report.md`` (and ``report.json`` and PNGs) about a `residual-lightning fit` checkpoint.

    Args:
        ckpt_path: the checkpoint (loaded with ``weights_only=True``).
        out_dir: folder of the report (created).
        datamodule: the `ResidualDataModule` the model was trained with; None rebuilds it from the
            checkpoint or its run's ``config.yaml`` (`datamodule_from_checkpoint`). Missing caches
            are built.
        top_units: units (by lambda movement) whose TextSpan descriptions are listed.
        bank: descriptions for TextSpan: a file (see `load_bank`), a list of strings, or None for
            the shipped bank; the dataset's class prompts are appended.
        descriptions_per_unit: TextSpan picks per unit.
        id_samples: train samples (seeded subsample) of the intrinsic-dimension profile.
        seed: seed of that subsample.

    Returns:
        The path of ``report.md``.
    """
    from residual_lightning.analysis.intrinsic_dim import id_profile, layer_profile
    from residual_lightning.analysis.plots import plot_id_profile
    from residual_lightning.analysis.textspan import encode_bank, head_descriptions, load_bank
    from residual_lightning.model import ResidualModel

    started = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = ResidualModel.load_from_checkpoint(str(ckpt_path), map_location="cpu", weights_only=True).eval()
    if model.method == "finetune" or model.adapter is None:
        raise ValueError(
            f"the report reads cached contributions; a {model.method!r} checkpoint has no adapter on them"
        )
    dm = datamodule if datamodule is not None else datamodule_from_checkpoint(ckpt_path)
    dm.prepare_data()
    dm.setup()
    _check_compatible(model, dm)

    acc = evaluate_caches(model, dm.caches)
    movement, from_init = lambda_movement(model)
    figures = {"accuracy": _plot_accuracy(acc, model.method, out / "accuracy.png")}
    if movement:
        figures["lambda_movement"] = _plot_movement(movement, from_init, out / "lambda_movement.png")
    heatmap = _save_lambda_heatmap(model.adapter.unit_weights(), out / "lambda_heatmap.png")
    if heatmap is not None:
        figures["lambda_heatmap"] = heatmap

    # TextSpan of the units that moved most.
    described = [r["unit"] for r in movement if r["kind"] in ("head", "mlp", "emb")][:top_units]
    descriptions: list[str] = []
    spans: list[dict[str, Any]] = []
    if described:
        templates = dm.templates
        if bank is None or isinstance(bank, str | Path):
            descriptions = load_bank(bank, dm.class_names, templates[0] if templates else "a photo of a {}.")
        else:
            descriptions = list(
                dict.fromkeys([*bank, *(t.format(c) for t in templates[:1] for c in dm.class_names)])
            )
        embeddings = encode_bank(dm.backbone, descriptions, cache_dir=dm.cache_dir)
        spans = head_descriptions(
            dm.reference_cache(), embeddings, descriptions, k=descriptions_per_unit, units=described
        )

    # Intrinsic dimension over depth, on a seeded subsample of the train part.
    ids = id_profile(unit_contributions(dm.caches["train"], id_samples, seed))
    layers = layer_profile(ids)
    figures["id_profile"] = plot_id_profile(
        layers,
        out / "id_profile.png",
        title=f"Intrinsic dimension of the units ({ids[0]['n_points']:,} train samples)",
    )

    # ---------------------------------------------------------------- markdown
    test = acc.get("test", {})
    gain = 100 * (test.get("adapted", 0.0) - test.get("zeroshot", 0.0))
    backbone = dm.backbone
    summary_rows = [
        ("method", f"`{model.method}`"),
        ("backbone", f"`{backbone.model_name}` ({backbone.pretrained or 'random weights'})"),
        ("dataset", f"`{dm.dataset}`, {dm.num_classes} classes"),
        ("learned parameters", f"{model.num_learned():,}"),
    ]
    for part, a in acc.items():
        summary_rows.append(
            (
                f"{part} accuracy: zero-shot → {model.method}",
                f"{a['zeroshot']:.4f} → **{a['adapted']:.4f}** ({100 * (a['adapted'] - a['zeroshot']):+.1f} points, {a['samples']:,} samples)",
            )
        )
    md = [
        f"# ResiDual report: `{model.method}` on `{dm.dataset}`",
        "",
        f"Checkpoint `{Path(ckpt_path).resolve()}`, written {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"The adapted model reaches **{test.get('adapted', float('nan')):.4f}** test accuracy against "
        f"{test.get('zeroshot', float('nan')):.4f} zero-shot ({gain:+.1f} points) with "
        f"**{model.num_learned():,} learned parameters**.",
        "",
        "## Summary",
        "",
        _md_table(("", "value"), summary_rows),
        "",
        "![accuracy](accuracy.png)",
        "",
    ]
    if movement:
        what = (
            "|λ − λ_init| (distance from the initial λ, rebuilt from the adapter's seed)"
            if from_init
            else "|λ − 1| (distance from the identity; the initial λ could not be rebuilt)"
        )
        md += [
            "## Units whose λ moved most",
            "",
            f"Movement = sum over a unit's learned components of {what}. A head has up to d "
            "components, an MLP up to D, so MLPs can move more in total: the last column is per component.",
            "",
            _md_table(
                ("rank", "unit", "kind", "learned λ", "movement", "Σ abs(λ − 1)", "mean abs(λ − 1)"),
                [
                    (
                        i + 1,
                        f"`{r['unit']}`",
                        r["kind"],
                        r["learned"],
                        f"{r['moved']:.2f}",
                        f"{r['from_identity']:.2f}",
                        f"{r['mean_from_identity']:.3f}",
                    )
                    for i, r in enumerate(movement[: max(top_units, 10)])
                ],
            ),
            "",
            "![units whose λ moved most](lambda_movement.png)",
            "",
        ]
    if spans:
        md += [
            "## What the top units encode (TextSpan)",
            "",
            f"TextSpan (Gandelsman et al., 2024) over {len(descriptions):,} descriptions (the bank plus "
            f"the class prompts), on the PCA reference part: the descriptions that greedily explain "
            "most of each unit's variance, in picking order, with the share of the unit's variance along each "
            "(a pick is scored by the variance along its projected description, so shares need not decrease).",
            "",
        ]
        for unit in described:
            picks = [s for s in spans if s["unit"] == unit]
            total = picks[-1]["cumulative"] if picks else 0.0
            md.append(f"**`{unit}`** (together {100 * total:.1f}% of its variance)")
            md.append("")
            md += [f"{p['rank']}. {p['description']} — {100 * p['share']:.1f}%" for p in picks]
            md.append("")
    md += [
        "## Intrinsic dimension over depth",
        "",
        f"Linear ID (components for 99% of the variance) and TwoNN ID per unit on {ids[0]['n_points']:,} "
        "train samples; heads averaged per layer. The paper reports a profile that rises then falls.",
        "",
        "![ID profile](id_profile.png)",
        "",
        _md_table(
            ("layer", "kind", "units", "linear ID", "TwoNN ID", "linear / TwoNN"),
            [
                (
                    r["layer"],
                    r["kind"],
                    r["n_units"],
                    f"{r['linear_id']:.1f}",
                    f"{r['twonn_id']:.1f}",
                    f"{r['ratio']:.2f}",
                )
                for r in layers
            ],
        ),
        "",
    ]
    if heatmap is not None:
        md += [
            "## Learned λ",
            "",
            "Red: λ > 0 (a component kept, or amplified when λ > 1), blue: λ < 0 (flipped), white: λ ≈ 0 (removed).",
            "",
            "![learned lambdas](lambda_heatmap.png)",
            "",
        ]
    md += [f"_Report generated in {time.time() - started:.0f} s by `residual-lightning analyze report`._", ""]
    path = out / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")

    (out / "report.json").write_text(
        json.dumps(
            {
                "checkpoint": str(Path(ckpt_path).resolve()),
                "method": model.method,
                "dataset": dm.dataset,
                "backbone": {"model_name": backbone.model_name, "pretrained": backbone.pretrained},
                "learned_parameters": model.num_learned(),
                "accuracy": acc,
                "movement_from_init": from_init,
                "units": movement,
                "textspan": spans,
                "intrinsic_dim": {"units": ids, "layers": layers},
                "figures": {k: v.name for k, v in figures.items()},
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    return path


def log_report_to_tensorboard(
    writer: Any, report_dir: str | Path, tag: str = "report", global_step: int = 0
) -> None:
    """Add a report folder to TensorBoard: the markdown as text, every PNG as an image.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (e.g. ``trainer.logger.experiment``).
        report_dir: the folder `write_report` wrote.
        tag: tag prefix (``report`` for the text, ``report/<png stem>`` for images).
        global_step: step to log at.
    """
    import matplotlib.image

    report_dir = Path(report_dir)
    md = report_dir / "report.md"
    if not md.is_file():
        raise FileNotFoundError(f"no report.md in {report_dir}")
    writer.add_text(tag, md.read_text(encoding="utf-8"), global_step)
    for png in sorted(report_dir.glob("*.png")):
        image = matplotlib.image.imread(str(png))  # (H, W, 3 or 4) floats in [0, 1]
        writer.add_image(
            f"{tag}/{png.stem}", np.ascontiguousarray(image[..., :3]), global_step, dataformats="HWC"
        )
    writer.flush()

"""A readable report of a trained checkpoint: accuracy, the units that moved, what they encode.

`write_report(ckpt, out_dir)` writes ``report.md`` (plus ``report.json`` with the numbers) and
its PNGs into one folder:

- ``accuracy.png``: zero-shot vs adapted accuracy on the validation and test caches;
- ``lambda_movement.png``: the units whose lambdas moved most (`lambdas.lambda_movement`);
- ``id_profile.png``: linear and TwoNN intrinsic dimension of the units against depth;
- ``lambda_heatmap.png``: every learned lambda (units x components).

"Moved" is measured from the lambdas the adapter started from when they can be rebuilt, else from
the identity, and the report says which (see `residual_lightning.analysis.lambdas`). The figures
are drawn by `residual_lightning.plots`. `log_report_to_tensorboard` adds the markdown and the PNGs
to a TensorBoard run.

Letters: N samples, L layers, H heads per layer, K components, D embedding size.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from residual_lightning.analysis.bank import encode_bank, load_bank
from residual_lightning.analysis.contributions import unit_contributions
from residual_lightning.analysis.intrinsic_dim import id_profile, layer_profile
from residual_lightning.analysis.lambdas import lambda_movement
from residual_lightning.analysis.recipes import recipe_options
from residual_lightning.analysis.textspan import head_descriptions
from residual_lightning.plots import plot_accuracy, plot_id_profile, plot_lambda_heatmap, plot_lambda_movement

log = logging.getLogger(__name__)

__all__ = [
    "datamodule_from_checkpoint",
    "evaluate_caches",
    "log_report",
    "log_report_to_tensorboard",
    "write_report",
]


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
            return ResidualDataModule.from_config(config)
    raise FileNotFoundError(
        f"cannot tell which data {ckpt_path} was trained on: the checkpoint holds no data-module "
        "hyperparameters and no config.yaml sits next to it or in its run folder; pass the fit "
        "config: residual-lightning analyze report --ckpt <ckpt> --config <the fit YAML>"
    )


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
    out = {}
    for part in parts:
        if part not in caches:
            continue
        correct_zs = correct = n = 0
        for batch in caches[part].iter_batches(batch_size):
            batch = batch.float()
            logits = model(batch)
            zs = model.logits_from_embedding(batch.embedding(model.head_maps))
            correct += int((logits.argmax(-1) == batch.label).sum())
            correct_zs += int((zs.argmax(-1) == batch.label).sum())
            n += len(batch)
        out[part] = {"zeroshot": correct_zs / max(n, 1), "adapted": correct / max(n, 1), "samples": n}
    return out


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
    recipe: str = "default",
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
        recipe: ``default`` or ``paper`` (`recipes.RECIPES`): the TextSpan, TwoNN and per-layer
            ratio definitions used.

    Returns:
        The path of ``report.md``.
    """
    from residual_lightning.model import ResidualModel

    recipe_options(recipe, "textspan")  # an unknown recipe fails before any work
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
    figures = {"accuracy": plot_accuracy(acc, model.method, out / "accuracy.png")}
    if movement:
        figures["lambda_movement"] = plot_lambda_movement(movement, from_init, out / "lambda_movement.png")
    heatmap = plot_lambda_heatmap(model.adapter.unit_weights(), out / "lambda_heatmap.png")
    if heatmap is not None:
        figures["lambda_heatmap"] = heatmap

    # TextSpan of the units that moved most.
    described = [r["unit"] for r in movement if r["kind"] in ("head", "mlp", "emb")][:top_units]
    descriptions: list[str] = []
    spans: list[dict[str, Any]] = []
    if described and not dm.backbone.has_text:
        log.info("TextSpan skipped: the %s backbone has no text tower", dm.backbone.library)
    elif described:
        templates = dm.templates
        if bank is None or isinstance(bank, str | Path):
            descriptions = load_bank(bank, dm.class_names, templates[0] if templates else "a photo of a {}.")
        else:
            descriptions = list(
                dict.fromkeys([*bank, *(t.format(c) for t in templates[:1] for c in dm.class_names)])
            )
        embeddings = encode_bank(dm.backbone, descriptions, cache_dir=dm.cache_dir)
        spans = head_descriptions(
            dm.reference_cache(),
            embeddings,
            descriptions,
            k=descriptions_per_unit,
            units=described,
            **recipe_options(recipe, "textspan"),
        )

    # Intrinsic dimension over depth, on a seeded subsample of the train part.
    ids = id_profile(
        unit_contributions(dm.caches["train"], id_samples, seed), **recipe_options(recipe, "twonn")
    )
    layers = layer_profile(ids, **recipe_options(recipe, "layer_ratio"))
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
        f"Checkpoint `{Path(ckpt_path).resolve()}`, written {time.strftime('%Y-%m-%d %H:%M')}; "
        f"analyses under the `{recipe}` recipe.",
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
                "recipe": recipe,
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


def log_report(loggers: Any, report_dir: str | Path) -> None:
    """Hand a report folder to every logger through its own API.

    TensorBoard: the markdown as text and every PNG (`log_report_to_tensorboard`); MLflow: the
    folder as artifacts (``experiment.log_artifacts(run_id, dir, "report")``); loggers with a
    ``log_image`` method (W&B, ...): every PNG under ``report/<stem>``. Others are skipped.
    """
    import matplotlib.image

    for logger in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        exp = getattr(logger, "experiment", None)
        if callable(getattr(exp, "add_text", None)):
            log_report_to_tensorboard(exp, report_dir)
        elif callable(getattr(exp, "log_artifacts", None)) and getattr(logger, "run_id", None):
            exp.log_artifacts(logger.run_id, str(report_dir), "report")
        elif callable(getattr(logger, "log_image", None)):
            for png in sorted(Path(report_dir).glob("*.png")):
                image = np.ascontiguousarray(matplotlib.image.imread(str(png))[..., :3])
                logger.log_image(key=f"report/{png.stem}", images=[image])

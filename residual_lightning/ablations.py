"""`residual-lightning ablate`: the paper's ablations as sweeps, on the grid's runner.

Each ablation trains one backbone on one dataset, once per variant and seed, with the grid's
runner (`residual_lightning.grid.run_one`: caches, fit with checkpointing on the best
``val/accuracy``, test of that checkpoint), and writes into ``--out/<ablation>/``:

- ``results.csv``: one row per run (the grid's columns, plus ``ablation``, ``variant`` and
  ``val_curve``, the validation accuracy after each epoch read back from the run's TensorBoard
  events). Rewritten after every run; runs already ``ok`` are skipped when started again
  (``--rerun`` to redo them).
- ``summary.md``: per variant, test accuracy mean ± sample std over seeds, the number of seeds,
  the learned parameters and the best validation accuracy; and a PNG figure.
- ``runs/``: the runs' logs, ``config.yaml`` and checkpoints.

``report.md`` in ``--out`` gathers every finished ablation's table and figure.

| ablation | variants | what changes (CLI arguments after the method's config) |
|---|---|---|
| ``components`` | 1, 4, 16, 0.9, all | ``--model.adapter.components K`` (an explained-variance threshold for 0.9) |
| ``units`` | heads, mlps, both | ``--model.adapter.transform heads / mlps / all`` |
| ``reference`` | train, imagenet | ``--data.reference train`` / ``imagenet --data.reference_root --imagenet_root`` |
| ``coarse_vs_residual`` | coarse, residual | the method config; the figure shows their training curves |
| ``selection`` | — | ``analyze selection`` (head top-k curve) on the run's data config, no training |

``components``, ``units`` and ``reference`` vary ``--method`` (default ``residual``). The imagenet
arm of ``reference`` needs ImageNet-1k (``--imagenet_root``, a folder with ``train/``): without it
the command stops before training anything; ``--variants train`` runs the other arm alone, by name.

    residual-lightning ablate components --backbone tiny --dataset digits --seeds 0 1 --max_epochs 3
    residual-lightning ablate all --backbone openclip-vit-b-16 --dataset cifar10 --seeds 0 1 2 \\
        --out results/ablations --imagenet_root data/imagenet -- --config configs/recipes/paper.yaml

CLI arguments after ``--`` (or ``--extra``) go to every run after the grid's own; each variant's
own arguments come after them, so the variant is what it says.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from residual_lightning import grid
from residual_lightning.ablation_report import (
    FIELDS_ABLATION,
    KEY_ABLATION,
    plot_curves,
    plot_variants,
    report_markdown,
    selection_markdown,
    summarise,
    summary_markdown,
)
from residual_lightning.grid_report import read_rows, write_rows

__all__ = [
    "ABLATIONS",
    "AblationError",
    "Variant",
    "main",
    "parse_args",
    "run_ablation",
    "val_curve",
    "variants",
]


class AblationError(ValueError):
    """An ablation that cannot run as asked (an unknown variant, ImageNet missing)."""


@dataclass(frozen=True)
class Variant:
    """One arm of an ablation.

    Attributes:
        label: its name in tables, figures and ``--variants``.
        method: the method config it trains (configs/methods name or YAML path).
        args: CLI arguments that make it this variant (passed last).
    """

    label: str
    method: str
    args: tuple[str, ...] = field(default_factory=tuple)


#: Each ablation: (what it varies, for headings).
ABLATIONS: dict[str, str] = {
    "components": "components retained per unit",
    "units": "units transformed",
    "reference": "PCA reference set",
    "coarse_vs_residual": "coarse vs ResiDual: training curves and learned parameters",
    "selection": "head top-k selection curve",
}
CHOICES = (*ABLATIONS, "all")


def _components(args: argparse.Namespace) -> list[Variant]:
    return [
        Variant(k, args.method, ("--model.adapter.components", k)) for k in ("1", "4", "16", "0.9", "all")
    ]


def _units(args: argparse.Namespace) -> list[Variant]:
    kinds = {"heads": "heads", "mlps": "mlps", "both": "all"}
    return [Variant(label, args.method, ("--model.adapter.transform", t)) for label, t in kinds.items()]


def _reference(args: argparse.Namespace) -> list[Variant]:
    imagenet = ("--data.reference", "imagenet", "--data.reference_root", str(args.imagenet_root))
    return [
        Variant("train", args.method, ("--data.reference", "train")),
        Variant("imagenet", args.method, imagenet),
    ]


def _coarse_vs_residual(args: argparse.Namespace) -> list[Variant]:
    return [Variant("coarse", "coarse"), Variant("residual", "residual")]


_VARIANTS: dict[str, Callable[[argparse.Namespace], list[Variant]]] = {
    "components": _components,
    "units": _units,
    "reference": _reference,
    "coarse_vs_residual": _coarse_vs_residual,
}


def variants(name: str, args: argparse.Namespace) -> list[Variant]:
    """The variants of ablation `name`, cut to ``args.variants`` when given.

    Raises:
        AblationError: a ``--variants`` label the ablation does not have (listing its labels), or
            the imagenet arm without ImageNet under ``--imagenet_root``.
    """
    every = _VARIANTS[name](args)
    chosen = every
    if args.variants:
        labels = [v.label for v in every]
        wrong = [v for v in args.variants if v not in labels]
        if wrong:
            raise AblationError(
                f"ablation {name!r} has no variant(s) {wrong}; its variants: {', '.join(labels)}"
            )
        chosen = [v for v in every if v.label in args.variants]
    if any(v.label == "imagenet" for v in chosen if name == "reference"):
        train = Path(args.imagenet_root) / "train"
        if not train.is_dir():
            raise AblationError(
                f"ablation 'reference': its imagenet arm needs ImageNet-1k train images in {train} "
                f"(--imagenet_root {args.imagenet_root}: an ImageFolder root with train/<wnid>/*.JPEG); "
                "point --imagenet_root at it, or run only the other arm, by name: --variants train"
            )
    return chosen


# ------------------------------------------------------------------------------------------ logs


def val_curve(log_dir: str | Path) -> list[float]:
    """The validation accuracy after each epoch of a run, from its logs: ``metrics.csv`` (a
    CSVLogger) or else the TensorBoard event files of `log_dir`, ordered by step.

    Args:
        log_dir: the run's log folder (``trainer.log_dir``).
    """
    log_dir = Path(log_dir)
    if (log_dir / "metrics.csv").is_file():
        import csv

        with open(log_dir / "metrics.csv", newline="") as f:
            return [float(r["val/accuracy"]) for r in csv.DictReader(f) if r.get("val/accuracy")]
    if not any(log_dir.glob("events.out.tfevents.*")):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "val/accuracy" not in events.Tags().get("scalars", []):
        return []
    return [e.value for e in sorted(events.Scalars("val/accuracy"), key=lambda e: e.step)]


# ------------------------------------------------------------------------------------------ runs


def _stem(name: str) -> str:
    """A config name, or a YAML path's stem."""
    return Path(name).stem


def _check(argv: list[str], label: str) -> None:
    """Parse one run's arguments with the CLI's parser; name the run on failure."""
    try:
        grid.check_args(argv)
    except SystemExit:
        print(f"ablate: the CLI rejects the arguments of {label} (error above)", file=sys.stderr)
        raise


def _write_summary(name: str, folder: Path, rows: list[dict], chosen: list[Variant]) -> None:
    labels = [v.label for v in chosen]
    summary = summarise(rows, labels)
    title = ABLATIONS[name]
    figure = f"{name}.png"
    if name == "coarse_vs_residual":
        plot_curves(summary, folder / figure, title)
    else:
        plot_variants(summary, folder / figure, title)
    (folder / "summary.md").write_text(summary_markdown(name, title, summary, rows, figure))


def run_ablation(name: str, args: argparse.Namespace) -> list[dict]:
    """Run one training ablation (every variant x seed not yet done); returns its results rows."""
    folder: Path = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "results.csv"
    chosen = variants(name, args)
    cells = []
    for v in chosen:
        for seed in args.seeds:
            run = grid.Run(args.backbone, args.dataset, v.method, seed)
            name_args = [
                "--trainer.logger.init_args.name",
                f"{_stem(args.backbone)}/{_stem(args.dataset)}/{v.label}/seed{seed}",
            ]
            extra = [*args.extra, *v.args, *name_args]
            argv = grid.cli_args(run, folder, args.max_epochs, args.cache_dir, extra, args.configs)
            cells.append((v, run, argv))
    for v in chosen:  # fail before any training on a typo in a config or an argument
        _check(next(argv for w, _, argv in cells if w == v), f"{name}/{v.label}")

    rows = read_rows(csv_path)
    done = {tuple(r[k] for k in KEY_ABLATION) for r in rows if r.get("status") == "ok"}
    print(f"ablate {name}: {len(cells)} runs -> {folder}", flush=True)
    for i, (v, run, argv) in enumerate(cells, 1):
        key = (name, v.label, *run.key)
        if key in done and not args.rerun:
            continue
        start = time.perf_counter()
        try:
            fit = grid.method_name(v.method, args.configs) != "zeroshot"
            runner = grid.run_in_subprocess if args.launcher == "subprocess" else grid.run_one
            result = runner(argv, fit)
        except Exception as err:  # one failed run must not stop the sweep
            traceback.print_exc()
            result = {"status": "error", "error": grid.error_text(err)}
        curve = val_curve(result["log_dir"]) if result.get("log_dir") else []
        row = {**dict(zip(KEY_ABLATION, key)), **result, "val_curve": json.dumps(curve)}
        rows = [r for r in rows if tuple(r[k] for k in KEY_ABLATION) != key] + [row]
        write_rows(csv_path, rows, FIELDS_ABLATION)
        _write_summary(name, folder, rows, chosen)
        took = time.perf_counter() - start
        status = (
            f"test {100 * row['test_accuracy']:.1f}%, {row['learned_params']:,} learned"
            if row["status"] == "ok"
            else f"FAILED: {row['error']}"
        )
        print(f"[{i}/{len(cells)}] {name}/{v.label} seed {run.seed}: {status}, {took:.1f} s", flush=True)
    _write_summary(name, folder, rows, chosen)
    labels = {v.label for v in chosen}
    return [r for r in rows if r["variant"] in labels]


def data_config(argv: list[str]) -> dict:
    """The resolved ``data:`` section of one run's arguments, as the CLI's parser builds it."""
    from residual_lightning.data.datamodule import ResidualDataModule
    from residual_lightning.model import ResidualModel
    from residual_lightning.recipe import ResidualCLI, ResidualTrainer

    class ParseOnly(ResidualCLI):
        def instantiate_classes(self) -> None:
            pass

    cli = ParseOnly(ResidualModel, ResidualDataModule, trainer_class=ResidualTrainer, run=False, args=argv)
    return yaml.safe_load(cli.parser.dump(cli.config, skip_check=True))["data"]


def run_selection(args: argparse.Namespace) -> list[dict]:
    """The head top-k selection curve (what ``analyze selection`` computes: heads scored on
    validation, accuracy on test) on the data config the training runs resolve to."""
    from residual_lightning.analysis.selection import selection_curve
    from residual_lightning.data.datamodule import ResidualDataModule
    from residual_lightning.plots import plot_selection_curve

    folder: Path = args.out / "selection"
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "selection.csv"
    if args.rerun or not table.exists():
        run = grid.Run(args.backbone, args.dataset, args.method, args.seeds[0])
        argv = grid.cli_args(run, folder, args.max_epochs, args.cache_dir, args.extra, args.configs)
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump({"data": data_config(argv)}, sort_keys=False))
        dm = ResidualDataModule.from_config(config)
        dm.prepare_data()
        dm.setup()
        weights, scale = dm.classifier()
        rows = selection_curve(
            dm.caches["val"], dm.caches["test"], weights, scale, seeds=args.selection_seeds
        )
        title = f"{dm.backbone.model_name} on {dm.dataset}: heads scored on val, accuracy on test"
        plot_selection_curve(rows, folder / "selection.png", title=title)
        (folder / "selection.json").write_text(json.dumps({"config": str(config), "rows": rows}, indent=1))
        write_rows(table, rows, list(rows[0]))
    rows = read_rows(table)
    (folder / "summary.md").write_text(selection_markdown(rows, "selection.png"))
    return rows


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The ablations' arguments; CLI arguments after ``--`` land in ``extra``."""
    argv, passthrough = grid.split_passthrough(argv)
    parser = argparse.ArgumentParser(
        prog="residual-lightning ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ablation", choices=CHOICES, help="which ablation (all: each in turn)")
    parser.add_argument("--backbone", default="tiny", help="configs/backbones name or YAML path")
    parser.add_argument("--dataset", default="digits", help="configs/datasets name or YAML path")
    parser.add_argument("--method", default="residual", help="method of components/units/reference")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_epochs", type=int, help="trainer.max_epochs (default: the configs')")
    parser.add_argument("--out", type=Path, default=Path("results/ablations"), help="one folder per ablation")
    parser.add_argument("--variants", nargs="+", help="run only these variants of one ablation (by label)")
    parser.add_argument(
        "--imagenet_root", default="data/imagenet", help="ImageNet root of the reference ablation"
    )
    parser.add_argument(
        "--selection_seeds", type=int, default=10, help="seeds of the random score (selection)"
    )
    parser.add_argument(
        "--configs", type=Path, metavar="DIR", help="folder of backbones/, datasets/, methods/"
    )
    parser.add_argument("--cache_dir", help="data.cache_dir shared by every run (default: the configs')")
    parser.add_argument(
        "--extra", action="append", default=[], help="more CLI arguments, shell-split; repeatable"
    )
    parser.add_argument("--launcher", choices=["inprocess", "subprocess"], default="inprocess")
    parser.add_argument("--rerun", action="store_true", help="redo runs already ok in results.csv")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's info messages")
    args = parser.parse_args(argv)
    if args.variants and args.ablation in ("all", "selection"):
        parser.error(f"--variants picks variants of one training ablation, not of {args.ablation!r}")
    args.extra = [a for chunk in args.extra for a in shlex.split(chunk)] + passthrough
    try:
        args.configs = grid.find_configs(args.configs)
    except FileNotFoundError as err:
        parser.error(str(err))
    return args


def ablate(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Run the ablation(s) of `args`; returns each one's rows and rewrites report.md in ``--out``.

    Raises:
        AblationError: a variant that does not exist, or ImageNet missing for the reference
            ablation (checked for every ablation before any runs).
    """
    if not args.verbose:
        grid._quiet_lightning()
    names = list(ABLATIONS) if args.ablation == "all" else [args.ablation]
    for name in names:
        if name != "selection":
            variants(name, args)
    results = {}
    for name in names:
        results[name] = run_selection(args) if name == "selection" else run_ablation(name, args)
        (args.out / "report.md").write_text(report_markdown(args.out, list(ABLATIONS)))
    return results


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``residual-lightning ablate <ablation> [options] [-- CLI arguments]``.

    Args:
        argv: the arguments after ``ablate``; None for ``sys.argv[1:]``.
    """
    args = parse_args(argv)
    try:
        results = ablate(args)
    except AblationError as err:
        print(f"residual-lightning ablate: error: {err}", file=sys.stderr)
        sys.exit(2)
    for name in results:
        print("\n" + (args.out / name / "summary.md").read_text())
    failed = [r for rows in results.values() for r in rows if r.get("status", "ok") != "ok"]
    if failed:
        print(f"{len(failed)} run(s) failed; see the results.csv files under {args.out}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""`residual-lightning grid`: backbones x datasets x methods x seeds, run one after another from configs/.

Every run is the CLI's own recipe, built from three shipped YAMLs
(``configs/backbones/<b>.yaml``, ``configs/datasets/<d>.yaml``, ``configs/methods/<m>.yaml``) by the
real `ResidualCLI` parser, then: build the caches if missing (timed apart; they are keyed, so every
later run of the same backbone and dataset reuses them), fit with checkpointing on the best
``val/accuracy``, and test that best-validation checkpoint: model selection never sees the test
set. ``zeroshot`` learns nothing, so it is only tested, once per (backbone, dataset) since it does
not depend on the seed. A seed sets ``seed_everything``, the data module's batch order and the
adapter's initialisation (``model.adapter.seed``).

Writes into ``--out``:

- ``results.csv``: one row per run (test and zero-shot accuracy, best val accuracy, learned
  parameters, epochs, cache time, wall time, checkpoint, log dir, error). Rewritten after every
  run; runs already ``ok`` there are skipped when the grid is started again (``--rerun`` to redo).
- ``results.md``: test accuracy in %, mean ± sample std over seeds per (backbone, dataset, method),
  with the zero-shot accuracy alongside, and a table of learned parameters and time per run.
- ``runs/<backbone>/<dataset>/<method>/seed<s>/version_<n>/``: TensorBoard logs, the resolved
  ``config.yaml`` and checkpoints of each run.

    residual-lightning grid                     # offline: tiny x digits, 5 methods, 2 seeds, 3 epochs
    residual-lightning grid --preset paper --out results/paper   # + configs/recipes/paper.yaml
    residual-lightning grid --preset paper --recipes   # the same grid with the framework's defaults
    residual-lightning grid --methods residual linear --seeds 0 -- --trainer.accelerator cpu

The configs are read from ``--configs DIR``: by default ``./configs`` when it exists, else the
``configs/`` of the source checkout the package runs from.

CLI arguments after ``--`` (or in ``--extra``, shell-split) are passed to every run after the
grid's own, so they win. Each run uses one process and whatever devices its trainer config names;
for multi-node training use the console script directly (docs/cluster.md). ``--launcher
subprocess`` runs each grid cell in a fresh Python process (slower to start, but a crash or an
out-of-memory kill loses one run, not the grid), and is the default of ``--preset paper``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

import residual_lightning
from residual_lightning.grid_report import KEY, markdown, read_rows, write_rows

PRESETS: dict[str, dict] = {
    # Runs anywhere in a few minutes: random-weight tiny ViT on scikit-learn's bundled digits.
    "offline": dict(
        backbones=["tiny"],
        datasets=["digits"],
        methods=["zeroshot", "residual", "residual_star", "coarse", "linear"],
        seeds=[0, 1],
        max_epochs=3,
        launcher="inprocess",
        recipes=[],
    ),
    # The paper's four CLIP backbones, ten datasets and seven methods (method.md §3). `finetune`
    # trains the whole tower on images: by far the longest runs.
    "paper": dict(
        backbones=["openclip-vit-b-16", "openclip-vit-l-14", "openai-vit-b-16", "openai-vit-l-14"],
        datasets="cifar10 cifar100 mnist svhn gtsrb dtd eurosat resisc45 sun397 stanford_cars".split(),
        methods=["zeroshot", "residual", "residual_star", "coarse", "linear", "spectral", "finetune"],
        seeds=[0, 1, 2],
        max_epochs=30,
        launcher="subprocess",
        # configs/recipes/paper.yaml after each method file: raw logits, equal shares, ImageNet PCA
        # (under data/imagenet), the standard-basis spectral baseline, raw prototypes, K = 1 cut.
        recipes=["paper"],
    ),
}


@dataclass(frozen=True)
class Run:
    """One grid cell.

    Attributes:
        backbone: config name under configs/backbones (or a YAML path).
        dataset: config name under configs/datasets (or a YAML path).
        method: config name under configs/methods (or a YAML path).
        seed: seed of the batch order, the adapter init and `seed_everything`.
    """

    backbone: str
    dataset: str
    method: str
    seed: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The run's identity in results.csv (all strings, as read back from the file)."""
        return (self.backbone, self.dataset, self.method, str(self.seed))

    @property
    def label(self) -> str:
        """``backbone/dataset/method seed s``."""
        return f"{self.backbone}/{self.dataset}/{self.method} seed {self.seed}"


def find_configs(configs: Path | str | None = None) -> Path:
    """The configs folder (absolute): `configs` if given, else ``./configs``, else the one next to the
    package (a source checkout, as with an editable install; a wheel ships no configs).

    Args:
        configs: the ``--configs`` option; None for the defaults.

    Raises:
        FileNotFoundError: no such folder (the message names every place looked in).
    """
    if configs is not None:
        candidates = [Path(configs)]
    else:
        candidates = [Path("configs"), Path(residual_lightning.__file__).resolve().parents[1] / "configs"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise FileNotFoundError(
        f"no configs folder (looked in {looked}); pass --configs DIR, a folder with backbones/, "
        "datasets/ and methods/ (the repository's configs/)"
    )


def config_path(kind: str, name: str, configs: Path) -> Path:
    """``<configs>/<kind>/<name>.yaml``, or `name` itself when it is a YAML file path.

    Args:
        kind: ``backbones``, ``datasets``, ``methods`` or ``recipes``.
        name: a config name, or a YAML path.
        configs: the configs folder (see `find_configs`).

    Raises:
        FileNotFoundError: no such config (the message lists the shipped ones).
    """
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
    else:
        path = configs / kind / f"{name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in (configs / kind).glob("*.yaml"))
        raise FileNotFoundError(f"no {kind} config {name!r} ({path}); shipped: {', '.join(shipped)}")
    return path


def method_name(method: str, configs: Path) -> str:
    """The `model.method` a method config sets (the config's stem if it sets none)."""
    cfg = yaml.safe_load(config_path("methods", method, configs).read_text()) or {}
    return (cfg.get("model") or {}).get("method") or Path(method).stem


def cli_args(
    run: Run,
    out: Path,
    max_epochs: int | None,
    cache_dir: str | None,
    extra: list[str],
    configs: Path,
    recipes: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The `residual-lightning` arguments of one run (no subcommand); `recipes` (configs/recipes
    names or YAML paths) are composed after the method file, before the grid's own arguments."""
    from residual_lightning.adapters import METHODS, method_options

    args = [
        "--config", str(config_path("backbones", run.backbone, configs)),
        "--config", str(config_path("datasets", run.dataset, configs)),
        "--config", str(config_path("methods", run.method, configs)),
        *(a for r in recipes for a in ("--config", str(config_path("recipes", r, configs)))),
        "--seed_everything", str(run.seed),
        "--data.seed", str(run.seed),
    ]  # fmt: skip
    name = method_name(run.method, configs)
    if name in METHODS and "seed" in method_options(name):
        args += ["--model.adapter.seed", str(run.seed)]
    if max_epochs is not None:
        args += ["--trainer.max_epochs", str(max_epochs)]
    if cache_dir is not None:
        args += ["--data.cache_dir", cache_dir]
    logs = out / "runs"
    args += [
        "--trainer.default_root_dir", str(logs),
        "--trainer.logger.init_args.save_dir", str(logs),
        "--trainer.logger.init_args.name", f"{Path(run.backbone).stem}/{Path(run.dataset).stem}/"
        f"{Path(run.method).stem}/seed{run.seed}",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    return args + list(extra)


def _quiet_lightning() -> None:
    """Keep the grid's output to about one line per run: Lightning's info messages go to WARNING."""
    import lightning.pytorch  # noqa: F401  (it sets its loggers to INFO when imported)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The grid passes `args=` while sys.argv holds its own options: intended here.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # Lightning 2.6 against torch 2.14: an upstream deprecation, printed at every fit.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def check_args(argv: list[str]) -> None:
    """Parse (without instantiating anything) one run's arguments with the CLI's parser.

    Raises:
        SystemExit: jsonargparse's error, naming the bad key (a typo, a wrong type).
    """
    from residual_lightning.data.datamodule import ResidualDataModule
    from residual_lightning.model import ResidualModel
    from residual_lightning.recipe import ResidualCLI, ResidualTrainer

    class ParseOnly(ResidualCLI):
        def instantiate_classes(self) -> None:
            pass

    ParseOnly(ResidualModel, ResidualDataModule, trainer_class=ResidualTrainer, run=False, args=argv)


def run_one(argv: list[str], fit: bool) -> dict:
    """One run in this process: caches, fit (best val checkpoint), test. Returns the result fields.

    Args:
        argv: the CLI arguments (see `cli_args`).
        fit: False for zero-shot: test only.
    """
    import torch

    from residual_lightning.data.datamodule import ResidualDataModule
    from residual_lightning.model import ResidualModel
    from residual_lightning.recipe import ResidualCLI, ResidualTrainer

    cli = ResidualCLI(
        ResidualModel,
        ResidualDataModule,
        trainer_class=ResidualTrainer,
        run=False,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    try:
        start = time.perf_counter()
        dm.prepare_data()  # caches + text classifier; a no-op when they exist
        prepare_s = time.perf_counter() - start
        start = time.perf_counter()
        best, best_val = None, None
        if fit:
            cli.before_fit()  # the LR finder when model.lr is "auto"
            trainer.fit(model, datamodule=dm)
            if trainer.interrupted:
                raise KeyboardInterrupt("fit was interrupted")
            ckpt = trainer.checkpoint_callback
            best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
            score = ckpt.best_model_score if ckpt is not None else None
            best_val = float(score) if score is not None else None
        metrics = trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False)[0]
        wall_s = time.perf_counter() - start
        return {
            "status": "ok",
            "test_accuracy": float(metrics["test/accuracy"]),
            "zeroshot_accuracy": float(metrics["test/zeroshot_accuracy"]),
            "test_top5": float(metrics["test/top5"]),
            "best_val_accuracy": best_val,
            "learned_params": model.num_learned(),
            "epochs": trainer.current_epoch if fit else 0,
            "prepare_s": round(prepare_s, 2),
            "wall_s": round(wall_s, 2),
            "best_checkpoint": best or "",
            "log_dir": trainer.log_dir or "",
            "error": "",
        }
    finally:
        del cli, trainer, model, dm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_in_subprocess(argv: list[str], fit: bool) -> dict:
    """`run_one` in a fresh Python process; its output goes to this terminal."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"argv": argv, "fit": fit, "result": str(result)}))
        worker = [sys.executable, "-m", "residual_lightning.grid", "--worker", str(spec)]
        proc = subprocess.run(worker)
        if result.exists():
            return json.loads(result.read_text())
        return {"status": "error", "error": f"worker process exited with code {proc.returncode}"}


def error_text(err: BaseException) -> str:
    """First line of the innermost cause (jsonargparse wraps a data module's error in its own)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _worker(spec_file: str) -> None:
    """The `--launcher subprocess` side: run the spec's run, write its result fields as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    _quiet_lightning()
    try:
        out = run_one(spec["argv"], spec["fit"])
    except Exception as err:  # reported in results.csv, the grid goes on
        traceback.print_exc()
        out = {"status": "error", "error": error_text(err)}
    Path(spec["result"]).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------ main


def split_passthrough(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(own arguments, CLI arguments after ``--``) of a command line (default: ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The grid's arguments; CLI arguments after ``--`` land in ``extra``."""
    argv, passthrough = split_passthrough(argv)
    parser = argparse.ArgumentParser(
        prog="residual-lightning grid",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="offline", help="defaults of the other options"
    )
    parser.add_argument(
        "--configs",
        type=Path,
        metavar="DIR",
        help="folder of backbones/, datasets/, methods/ (default: ./configs, else the source checkout's)",
    )
    parser.add_argument("--backbones", nargs="+", help="configs/backbones names or YAML paths")
    parser.add_argument("--datasets", nargs="+", help="configs/datasets names or YAML paths")
    parser.add_argument("--methods", nargs="+", help="configs/methods names or YAML paths")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument(
        "--recipes",
        nargs="*",
        help="configs/recipes names or YAML paths composed after each method file (paper preset: paper; "
        "none: --recipes with no name)",
    )
    parser.add_argument("--max_epochs", type=int, help="trainer.max_epochs (offline preset 3, paper 30)")
    parser.add_argument(
        "--out", type=Path, default=Path("results/grid"), help="results.csv, results.md, runs/"
    )
    parser.add_argument("--cache_dir", help="data.cache_dir shared by every run (default: the configs')")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="more CLI arguments for every run, shell-split; repeatable",
    )
    parser.add_argument("--launcher", choices=["inprocess", "subprocess"], help="where each run executes")
    parser.add_argument("--rerun", action="store_true", help="redo runs already ok in results.csv")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's info messages")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.extra = [a for chunk in args.extra for a in shlex.split(chunk)] + passthrough
    if not args.worker:  # a worker's arguments name their config files already
        try:
            args.configs = find_configs(args.configs)
        except FileNotFoundError as err:
            parser.error(str(err))
    return args


def grid(args: argparse.Namespace) -> list[dict]:
    """Run the grid described by `args`; returns every row of results.csv."""
    if not args.verbose:
        _quiet_lightning()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    configs: Path = args.configs
    names = {m: method_name(m, configs) for m in args.methods}
    runs = []
    for b in args.backbones:
        for d in args.datasets:
            for m in args.methods:
                # Zero-shot does not depend on the seed: one run per (backbone, dataset).
                seeds = args.seeds[:1] if names[m] == "zeroshot" else args.seeds
                runs += [Run(b, d, m, s) for s in seeds]
    recipes = getattr(args, "recipes", None) or []
    argvs = {
        run: cli_args(run, out, args.max_epochs, args.cache_dir, args.extra, configs, recipes) for run in runs
    }
    # Fail before hours of training on a typo in a config or in --extra: parse every combination.
    for run in {Run(r.backbone, r.dataset, r.method, 0): None for r in runs}:
        try:
            check_args(cli_args(run, out, args.max_epochs, args.cache_dir, args.extra, configs, recipes))
        except SystemExit:
            print(f"grid: the CLI rejects the arguments of {run.label} (error above)", file=sys.stderr)
            raise

    rows = read_rows(csv_path)
    done = {tuple(r[k] for k in KEY) for r in rows if r.get("status") == "ok"}
    print(f"grid: {len(runs)} runs ({len(done & {r.key for r in runs})} already done) -> {out}", flush=True)
    for i, run in enumerate(runs, 1):
        if run.key in done and not args.rerun:
            continue
        fit = names[run.method] != "zeroshot"
        start = time.perf_counter()
        try:
            if args.launcher == "subprocess":
                result = run_in_subprocess(argvs[run], fit)
            else:
                result = run_one(argvs[run], fit)
        except Exception as err:  # one failed run (missing data, ...) must not stop the grid
            traceback.print_exc()
            result = {"status": "error", "error": error_text(err)}
        row = {**dict(zip(KEY, run.key)), **result}
        rows = [r for r in rows if tuple(r[k] for k in KEY) != run.key] + [row]
        write_rows(csv_path, rows)
        md_path.write_text(markdown(rows, args.backbones, args.datasets, args.methods, names))
        took = time.perf_counter() - start
        if row["status"] == "ok":
            print(
                f"[{i}/{len(runs)}] {run.label}: test {100 * row['test_accuracy']:.1f}% "
                f"(zero-shot {100 * row['zeroshot_accuracy']:.1f}%), {row['learned_params']:,} learned, "
                f"epochs {row['epochs']}, {took:.1f} s",
                flush=True,
            )
        else:
            print(f"[{i}/{len(runs)}] {run.label}: FAILED: {row['error']}", flush=True)
    md_path.write_text(markdown(rows, args.backbones, args.datasets, args.methods, names))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``residual-lightning grid [options] [-- CLI arguments]``.

    Args:
        argv: the grid's arguments (no ``grid`` word); None for ``sys.argv[1:]``.
    """
    args = parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return
    rows = grid(args)
    print("\n" + (args.out / "results.md").read_text())
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        print(f"{len(failed)} run(s) failed; see {args.out / 'results.csv'}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

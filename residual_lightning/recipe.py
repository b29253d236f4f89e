"""The training recipe as a LightningCLI: `ResidualCLI` and `ResidualTrainer` (library code).

`ResidualCLI` chooses the model class (``--model``: `ResidualModel` by default, or
`FinetuneModel`, both `ClassifierModule`s), links what the data fixes (backbone, convention, class
names, unit shapes) into the model and the model's class into ``data.mode``, sets the recipe's defaults (early stopping and checkpointing on ``val/accuracy``,
TensorBoard, 30 epochs), adds the ``extract`` subcommand, and after ``fit`` tests the best
checkpoint and prints a summary. The console script (`residual_lightning.cli`) only dispatches to it.

Checkpoints (see `residual_lightning.checkpoints`): every load is weights-only (``--weights_only``
defaults to true; a crafted checkpoint, local or ``http://``, cannot run code); saves are atomic
(`AtomicCheckpointIO` replaces Lightning's default ``CheckpointIO``); a ``--ckpt_path`` that is
truncated or empty is refused at start, naming the file; ``--ckpt_path last`` is the newest
``runs/<name>/version_N/checkpoints/last.ckpt`` (highest N; `checkpoints.find_last`), and ``fit``
resumes it logging into that same version folder; with none, it fails naming where it looked.
"""

from __future__ import annotations

import importlib
import re
import textwrap
from pathlib import Path
from typing import Any, Literal, NoReturn

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_info

from residual_lightning import checkpoints
from residual_lightning.classifier_module import (
    ClassifierModule,
    checkpoint_class_path,
    class_path,
    read_hparams,
)
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.finetune import DEPRECATED_METHOD, FinetuneModel, from_method_finetune
from residual_lightning.model import ResidualModel

CKPT_SUBCOMMANDS = ("fit", "validate", "test", "predict")  # those that take --ckpt_path


class ResidualTrainer(Trainer):
    """Lightning's Trainer plus `extract`, so that cache building uses the same strategies (DDP)."""

    def predict(
        self,
        model: LightningModule | None = None,
        dataloaders: Any = None,
        datamodule: LightningDataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        skip_bad_images: bool = False,
    ):
        """Class probabilities of images (Lightning's predict), with bad images skipped on request.

        Args:
            model: the model.
            dataloaders: loaders (default: the data module's).
            datamodule: the data module.
            return_predictions: return the predictions.
            ckpt_path: the checkpoint to predict with.
            weights_only: load the checkpoint weights-only.
            skip_bad_images: skip images that cannot be read and list them in ``skipped_images.txt``
                beside ``predictions.csv`` (default: stop at the first one, naming it).
        """
        if datamodule is not None and hasattr(datamodule, "predict_on_bad_image"):
            datamodule.predict_on_bad_image = "skip" if skip_bad_images else "raise"
        return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)

    def extract(
        self, model: ResidualModel | None = None, datamodule: ResidualDataModule | None = None
    ) -> None:
        """Build the activation caches and the text classifier of a data config, sharded across devices.

        Args:
            model: unused (LightningCLI passes it).
            datamodule: the data module whose caches to build.
        """
        from residual_lightning.data.extract import Extractor

        if datamodule is None:
            raise ValueError("extract needs a data module (--data ...)")
        datamodule.trainer = self  # its precision is part of the cache key
        backbone = datamodule.backbone.load()
        extractor = Extractor(
            backbone.model,
            # listed in `Extractor.setup`, once the ranks exist: the data prepared by one process
            lambda trainer: datamodule.distributed_jobs(backbone),
            batch_size=datamodule.extract_batch_size,
            chunk_size=datamodule.chunk_size,
            num_workers=datamodule.num_workers,
            on_mismatch=datamodule.on_mismatch,
        )
        self.predict(extractor, return_predictions=False)
        if self.is_global_zero:
            datamodule.classifier()
            print(
                f"caches ready under {datamodule.cache_dir}: {', '.join(map(str, datamodule.cache_paths().values()))}"
            )


# jsonargparse's error for a bad option of the chosen model class: nested under the class path.
_NESTED_MODEL_ERROR = re.compile(
    r"Parser key \"model\":\n.*?- Problem with given class_path '(?P<cls>[^']+)':\n(?P<inner>(?: {8}[^\n]*(?:\n|$))+)",
    re.S,
)


def model_error(message: str) -> str:
    """A parser error about one of the model's options, with its dotted key (``model.lr``).

    With a choice of model classes jsonargparse reports ``Parser key "model"``, a union of classes
    and, nested under the class path, the actual error; this keeps the actual error and names the
    key as the command line spells it. Any other message is returned as it is.

    Args:
        message: jsonargparse's error message.
    """
    found = _NESTED_MODEL_ERROR.search(message)
    if found is None:
        return message
    inner = textwrap.dedent(found["inner"]).rstrip()
    name = found["cls"].rpartition(".")[2]
    key = re.match(r'Parser key "([^"]+)":', inner)
    if key:
        return f'Parser key "model.{key[1]}" ({name}):{inner[key.end() :]}'
    option = re.fullmatch(r"Option '([^']+)' is not accepted", inner)
    if option:
        return f"{name} does not accept option 'model.{option[1]}'"
    return f"model ({name}): {inner}"


class ResidualArgumentParser(LightningArgumentParser):
    """Lightning's argument parser, naming the dotted key of a bad model option (`model_error`)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Report `message` (rewritten by `model_error`) as jsonargparse does: exit 2 or raise."""
        super().error(model_error(message), ex)


def data_mode(model: Namespace) -> str:
    """``data.mode`` for the chosen model: its class's `data_mode` (``images`` for `FinetuneModel`).

    A link from the whole ``model`` value (class path and init args) rather than a data module that
    asks the model in ``setup``: ``prepare_data`` and ``extract`` already need the mode, and
    ``--print_config`` shows it. The deprecated ``model.method: finetune`` reads images too.

    Args:
        model: the parsed ``model`` (``class_path`` and ``init_args``).
    """
    if model.class_path == class_path(ResidualModel) and model.init_args.get("method") == "finetune":
        return FinetuneModel.data_mode
    module, _, name = model.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name).data_mode


class ResidualCLI(LightningCLI):
    """LightningCLI with the project's links, defaults and the `extract` subcommand.

    Args:
        model_class: the model built when the config names no class (default `ResidualModel`, so
            ``model: {method: residual}`` needs no ``class_path``). Any `ClassifierModule` is
            selectable with ``--model`` (``--model FinetuneModel``) or ``model.class_path``.
        *args: LightningCLI's positional arguments after the model class.
        **kwargs: LightningCLI's keyword arguments.
    """

    def __init__(self, model_class: type[LightningModule] | None = None, *args, **kwargs) -> None:
        self.default_model = model_class or ResidualModel
        if issubclass(self.default_model, ClassifierModule):  # --model picks among them
            model_class = ClassifierModule
            kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("parser_class", ResidualArgumentParser)
        # One optimizer option: the model's own ``--model.optimizer`` (a callable of the parameters),
        # not also Lightning's automatic ``--optimizer``/``--lr_scheduler``, which would replace
        # the model's configure_optimizers (schedule-free AdamW, the lr finder's ``model.lr``).
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(model_class, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus `extract`."""
        return {**LightningCLI.subcommands(), "extract": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        """The default model, links between the data module and the model, early stopping and checkpoint defaults."""
        model = "model.init_args" if self.subclass_mode_model else "model"
        if self.subclass_mode_model:
            parser.set_defaults({"model": {"class_path": class_path(self.default_model)}})
            parser.link_arguments("model", "data.mode", compute_fn=data_mode)
        parser.link_arguments("data.backbone", f"{model}.backbone")
        parser.link_arguments("data.convention", f"{model}.convention")
        parser.link_arguments(
            "data", f"{model}.class_names", compute_fn=lambda dm: dm.class_names, apply_on="instantiate"
        )
        parser.link_arguments(
            "data", f"{model}.shape", compute_fn=lambda dm: dm.shape, apply_on="instantiate"
        )
        parser.link_arguments(  # pooler units and full-form heads (MAP readouts); None when compact
            "data", f"{model}.unit_form", compute_fn=lambda dm: dm.layout.form, apply_on="instantiate"
        )
        parser.add_argument(
            "--report",
            type=bool,
            default=True,
            help="after fit: write report.md with plots beside the logs (and to TensorBoard); see docs/analysis.md",
        )
        parser.add_argument(
            "--report_recipe",
            type=Literal["default", "paper"],
            default="default",
            help="definitions the report's analyses use: the project's (default) or the ResiDual authors' "
            "(paper; recipes/paper.yaml sets it); see docs/reproducing.md 'Analyses'",
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "early_stopping.monitor": "val/accuracy",
                "early_stopping.mode": "max",
                "early_stopping.patience": 5,
                "checkpoint.monitor": "val/accuracy",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-acc{val/accuracy:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.max_epochs": 30,
                "trainer.use_distributed_sampler": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "residual"},
                },
                "trainer.callbacks": [
                    {"class_path": "residual_lightning.callbacks.ResidualPlots"},
                    {"class_path": "residual_lightning.callbacks.PredictionCSV"},
                ],
            }
        )

    # ------------------------------------------------------------------ checkpoints

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        """Lightning's parser, with ``--weights_only`` defaulting to true for every subcommand that loads."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # The trainer's method arguments (ckpt_path, weights_only) are added after
        # add_arguments_to_parser, so their defaults are set here. A Lightning without
        # --weights_only fails here rather than loading remote checkpoints with pickle.
        for name, parser in getattr(self, "_subcommand_parsers", {}).items():
            if name in CKPT_SUBCOMMANDS:
                parser.set_defaults(weights_only=True)

    def parse_arguments(self, parser, args) -> None:
        """Parse, build a FinetuneModel for the deprecated ``model.method: finetune``, then resolve
        ``--ckpt_path last`` and check the checkpoint before anything loads it."""
        super().parse_arguments(parser, args)
        self._replace_method_finetune()
        self._prepare_ckpt_path()

    def _model_config(self) -> Namespace:
        """The parsed config holding ``model`` (the subcommand's, or the top level with ``run=False``)."""
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def _replace_method_finetune(self) -> None:
        """``model.method: finetune`` (deprecated): warn and select FinetuneModel with its options."""
        config = self._model_config()
        model = config.get("model")
        if not isinstance(model, Namespace) or model.get("class_path") != class_path(ResidualModel):
            return
        if model.init_args.get("method") != "finetune":
            return
        rank_zero_deprecation(DEPRECATED_METHOD)
        config.model = Namespace(
            class_path=class_path(FinetuneModel), init_args=Namespace(**from_method_finetune(model.init_args))
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning's merge of the ``--ckpt_path`` checkpoint's hyperparameters into the model config.

        A finetune checkpoint of an earlier release (``method: finetune``, no class path) merges as
        FinetuneModel's options; Lightning's own merge would give them to the chosen class as they are.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super()._parse_ckpt_path()
        hparams = read_hparams(ckpt_path)
        if "lr_found" in hparams:  # the LR finder's rate: not a model argument (`before_fit` reads it)
            hparams = {k: v for k, v in hparams.items() if k not in ("lr_found", "_instantiator")}
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
            return None
        if "_class_path" in hparams or checkpoint_class_path(hparams) != class_path(FinetuneModel):
            return super()._parse_ckpt_path()
        init_args = from_method_finetune(hparams)
        model = {"class_path": class_path(FinetuneModel), "init_args": init_args}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _prepare_ckpt_path(self) -> None:
        """Resolve ``last`` (fit then logs into its version folder); refuse a truncated file."""
        subcommand = self.config.get("subcommand")
        if subcommand not in CKPT_SUBCOMMANDS:
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") == "last":
            checkpoint = config.get("checkpoint")
            last = checkpoints.find_last(config.trainer, checkpoint.get("dirpath") if checkpoint else None)
            config.ckpt_path = str(last.path)
            if subcommand == "fit" and last.version is not None:
                checkpoints.set_logger_version(config.trainer, last.version)
            into = f", logging into {last.version}" if subcommand == "fit" and last.version else ""
            rank_zero_info(f"--ckpt_path last: {last.path}{into}")
        if config.get("ckpt_path") is not None and not checkpoints.is_keyword(config.ckpt_path):
            checkpoints.check_checkpoint(
                config.ckpt_path, weights_only=config.get("weights_only") is not False
            )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Lightning's trainer, saving checkpoints atomically (`checkpoints.AtomicCheckpointIO`)."""
        trainer = super().instantiate_trainer(**kwargs)
        checkpoints.use_atomic_checkpoints(trainer)
        return trainer

    # ------------------------------------------------------------------ fit

    def before_fit(self) -> None:
        """Run the LR finder when ``model.lr: auto``, or reuse the rate it found for the checkpoint
        being resumed (``fit --ckpt_path ...``: its ``hyper_parameters["lr_found"]``)."""
        if self.model.lr != "auto":
            return
        config = self._model_config()
        ckpt_path = config.get("ckpt_path")
        found = None
        if ckpt_path and not checkpoints.is_keyword(ckpt_path) and Path(ckpt_path).is_file():
            found = read_hparams(ckpt_path).get("lr_found")
        if isinstance(found, (int, float)) and not isinstance(found, bool) and found > 0:
            self.model.lr = float(found)
            self.model.hparams["lr_found"] = float(found)
            if self.trainer.is_global_zero:
                print(f"LR finder: lr = {found:.4g}, reused from {ckpt_path} (no new search)")
            return
        from residual_lightning.callbacks import find_lr

        seed = config.get("seed_everything")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        result = find_lr(self.trainer, self.model, self.datamodule, seed=seed)
        if self.trainer.is_global_zero:
            record_lr_found(self.trainer, result)

    def after_fit(self) -> None:
        """Test the best checkpoint and print a summary table."""
        if self.trainer.interrupted:
            return
        ckpt = self.trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        results = self.trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False
        )
        if self.trainer.is_global_zero:
            print_summary(self.model, results[0] if results else {}, best, self.trainer)
            if (
                self.config[self.subcommand].get("report")
                and best
                and self.model.method not in ("zeroshot", "finetune")
            ):
                self._write_report(best, self.config[self.subcommand].get("report_recipe", "default"))

    def _write_report(self, ckpt: str, recipe: str = "default") -> None:
        """The analysis report of the best checkpoint, beside the logs and in every logger."""
        from residual_lightning.analysis.report import log_report, write_report

        out = Path(getattr(self.trainer.logger, "log_dir", None) or self.trainer.default_root_dir) / "report"
        path = write_report(ckpt, out, datamodule=self.datamodule, recipe=recipe)
        log_report(self.trainer.loggers, out)  # TensorBoard, MLflow, W&B: each through its own API
        print(f"report: {path}")


def record_lr_found(trainer: Trainer, result) -> Path | None:
    """Write the LR finder's result as ``lr_finder.json`` beside the run's saved ``config.yaml``
    (LightningCLI's `SaveConfigCallback` writes it at setup, while the config still says ``auto``)
    and put the found rate into that ``config.yaml`` as ``model.init_args.lr``, so that the file
    reruns the same fit. Returns the json path (None when no config is saved)."""
    import json

    import yaml
    from lightning.pytorch.cli import SaveConfigCallback

    saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
    if saver is None:
        return None
    log_dir = trainer.log_dir or trainer.default_root_dir
    config_path = Path(log_dir) / saver.config_filename
    out = Path(log_dir) / "lr_finder.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    if config_path.is_file():
        text = config_path.read_text()
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        data = yaml.safe_load(text)
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict):
            target = model.get("init_args") if isinstance(model.get("init_args"), dict) else model
            if target.get("lr") == "auto":
                target["lr"] = result.lr
                note = f"# model lr: {result.lr:.6g}, found by the LR finder for lr: auto (lr_finder.json)\n"
                body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
                config_path.write_text(header + note + body)
    return out


def print_summary(model: ClassifierModule, metrics: dict, best: str | None, trainer: Trainer) -> None:
    """Print the end-of-fit summary, a markdown table (`summary_rows`)."""
    untrained = trainer.global_step == 0
    if untrained:
        print(
            f"\nnot trained: no training step ran (trainer.max_epochs={trainer.max_epochs}); "
            f"the {model.method} accuracy below is that of the initial, untrained adapter"
        )
    print("\n" + markdown_table(("summary", "value"), summary_rows(model, metrics, best, trainer)) + "\n")


def summary_rows(
    model: ClassifierModule, metrics: dict, best: str | None, trainer: Trainer
) -> list[tuple[str, str]]:
    """The summary's rows: zero-shot vs adapted test accuracy, the learning rate used (the LR
    finder's choice under ``lr: auto``), best validation accuracy, epochs run, wall time of the
    fit, learned parameters, and where the logs and checkpoints are."""
    logdir = getattr(trainer.logger, "log_dir", None) if trainer.logger else None
    zs, acc = metrics.get("test/zeroshot_accuracy"), metrics.get("test/accuracy")
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "n/a"  # noqa: E731
    untrained = trainer.global_step == 0
    lr = getattr(model, "lr", None)
    lr_text = f"{lr:.4g}" if isinstance(lr, (int, float)) else str(lr)
    hparams = getattr(model, "hparams", None) or {}
    if (hparams.get("lr") == "auto" or "lr_found" in hparams) and isinstance(lr, (int, float)):
        lr_text += " (LR finder)"
    seconds = _fit_seconds(trainer)
    return [
        ("method", model.method),
        ("zero-shot test accuracy", fmt(zs)),
        (f"{model.method} test accuracy" + (" (untrained)" if untrained else ""), fmt(acc)),
        (
            "gain (points)",
            f"{100 * (acc - zs):+.1f}" if isinstance(acc, float) and isinstance(zs, float) else "n/a",
        ),
        ("best validation accuracy", fmt(_best_val_accuracy(trainer))),
        ("learning rate", lr_text),
        ("epochs run", str(trainer.current_epoch)),
        ("wall time (fit)", _duration(seconds) if seconds is not None else "n/a"),
        ("learned parameters", f"{model.num_learned():,}"),
        ("TensorBoard logs", f"{logdir}  (tensorboard --logdir {Path(logdir).parent if logdir else 'runs'})"),
        ("best checkpoint", best or "none"),
    ]


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A GitHub-flavoured markdown table, columns padded; ``|`` in cells escaped."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator, *(line(row) for row in cells[1:])])


def _best_val_accuracy(trainer: Trainer) -> float | None:
    """The best ``val/accuracy`` that a checkpoint or early-stopping callback monitored, else None."""
    for cb in [trainer.checkpoint_callback, *trainer.callbacks]:
        monitor = getattr(cb, "monitor", None)
        score = getattr(cb, "best_model_score", None) if isinstance(cb, ModelCheckpoint) else None
        if isinstance(cb, EarlyStopping):
            score = cb.best_score
        value = float(score) if score is not None else float("nan")
        if monitor == "val/accuracy" and abs(value) < float("inf"):  # False for NaN and inf
            return value
    return None


def _fit_seconds(trainer: Trainer) -> float | None:
    """Wall time of the fit, as timed by a callback with ``fit_seconds`` (`ResidualPlots`)."""
    for cb in trainer.callbacks:
        seconds = getattr(cb, "fit_seconds", None)
        if isinstance(seconds, (int, float)):
            return float(seconds)
    return None


def _duration(seconds: float) -> str:
    """``42.3 s``, ``3 min 05 s`` or ``2 h 03 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"

"""The `residual-lightning` console script: a LightningCLI over `ResidualModel` + `ResidualDataModule`.

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (Lightning's), ``extract`` (build the
activation caches, sharded across devices), and ``analyze`` (the analysis toolkit, its own
jsonargparse CLI). Values fixed by the data or backbone (class names, unit shapes, backbone,
convention) are linked from the data module into the model, never typed twice.

    residual-lightning fit --config configs/quickstart.yaml
    residual-lightning fit --config configs/backbones/openclip-vit-b-16.yaml \\
        --config configs/datasets/cifar10.yaml --config configs/methods/residual.yaml
    residual-lightning fit --config configs/quickstart.yaml --ckpt_path last   # resume a killed run

Checkpoints (see `residual_lightning.checkpoints`): every load is weights-only (``--weights_only``
defaults to true; a crafted checkpoint, local or ``http://``, cannot run code); saves are atomic
(`AtomicCheckpointIO` replaces Lightning's default ``CheckpointIO``); a ``--ckpt_path`` that is
truncated or empty is refused at start, naming the file; ``--ckpt_path last`` is the newest
``runs/<name>/version_N/checkpoints/last.ckpt`` (highest N; `checkpoints.find_last`), and ``fit``
resumes it logging into that same version folder; with none, it fails naming where it looked.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from residual_lightning import checkpoints
from residual_lightning.data.datamodule import ResidualDataModule
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
            datamodule.jobs(backbone),
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


class ResidualCLI(LightningCLI):
    """LightningCLI with the project's links, defaults and the `extract` subcommand."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus `extract`."""
        return {**LightningCLI.subcommands(), "extract": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        """Links from the data module into the model, early stopping and checkpoint defaults."""
        parser.link_arguments("data.backbone", "model.backbone")
        parser.link_arguments("data.convention", "model.convention")
        parser.link_arguments(
            "model.method",
            "data.mode",
            compute_fn=lambda method: "images" if method == "finetune" else "cache",
        )
        parser.link_arguments(
            "data", "model.class_names", compute_fn=lambda dm: dm.class_names, apply_on="instantiate"
        )
        parser.link_arguments("data", "model.shape", compute_fn=lambda dm: dm.shape, apply_on="instantiate")
        parser.add_argument(
            "--report",
            type=bool,
            default=True,
            help="after fit: write report.md with plots beside the logs (and to TensorBoard); see docs/analysis.md",
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
        """Parse, then resolve ``--ckpt_path last`` and check the checkpoint before anything loads it."""
        super().parse_arguments(parser, args)
        self._prepare_ckpt_path()

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
        """Run the LR finder when ``model.lr: auto``."""
        if self.model.lr == "auto":
            from residual_lightning.callbacks import find_lr

            find_lr(self.trainer, self.model, self.datamodule)

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
                self._write_report(best)

    def _write_report(self, ckpt: str) -> None:
        """The analysis report of the best checkpoint, beside the logs and in TensorBoard."""
        from residual_lightning.analysis.report import log_report_to_tensorboard, write_report

        out = Path(getattr(self.trainer.logger, "log_dir", None) or self.trainer.default_root_dir) / "report"
        path = write_report(ckpt, out, datamodule=self.datamodule)
        exp = getattr(self.trainer.logger, "experiment", None)
        if hasattr(exp, "add_text"):
            log_report_to_tensorboard(exp, out)
        print(f"report: {path}")


def print_summary(model: ResidualModel, metrics: dict, best: str | None, trainer: Trainer) -> None:
    """Zero-shot vs adapted test accuracy, learned parameters, where logs and checkpoints are."""
    logdir = getattr(trainer.logger, "log_dir", None) if trainer.logger else None
    zs, acc = metrics.get("test/zeroshot_accuracy"), metrics.get("test/accuracy")
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "n/a"  # noqa: E731
    untrained = trainer.global_step == 0
    if untrained:
        print(
            f"\nnot trained: no training step ran (trainer.max_epochs={trainer.max_epochs}); "
            f"the {model.method} accuracy below is that of the initial, untrained adapter"
        )
    rows = [
        ("method", model.method),
        ("zero-shot test accuracy", fmt(zs)),
        (f"{model.method} test accuracy" + (" (untrained)" if untrained else ""), fmt(acc)),
        (
            "gain (points)",
            f"{100 * (acc - zs):+.1f}" if isinstance(acc, float) and isinstance(zs, float) else "n/a",
        ),
        ("learned parameters", f"{model.num_learned():,}"),
        ("TensorBoard logs", f"{logdir}  (tensorboard --logdir {Path(logdir).parent if logdir else 'runs'})"),
        ("best checkpoint", best or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `residual-lightning` console script."""
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["analyze"]:
        from residual_lightning.analysis.cli import main as analyze

        analyze(words[1:])
        return
    try:
        ResidualCLI(
            ResidualModel,
            ResidualDataModule,
            trainer_class=ResidualTrainer,
            args=argv,  # None: sys.argv, which DDP's launcher re-runs in each process
            save_config_kwargs={"overwrite": True},
        )
    except ValueError as err:
        # jsonargparse wraps errors raised while computing a link (the data module's class names,
        # shape) in "Call to compute_fn of link ... with args ({Train dataloader: None} ...)": show
        # the user the error itself.
        cause = err.__cause__
        if cause is not None and str(err).startswith("Call to compute_fn of link"):
            raise cause from None
        raise


if __name__ == "__main__":
    main()

"""The `residual-lightning` console script: a LightningCLI over `ResidualModel` + `ResidualDataModule`.

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (Lightning's), ``extract`` (build the
activation caches, sharded across devices), and ``analyze`` (the analysis toolkit, its own
jsonargparse CLI). Values fixed by the data or backbone (class names, unit shapes, backbone,
convention) are linked from the data module into the model, never typed twice.

    residual-lightning fit --config configs/quickstart.yaml
    residual-lightning fit --config configs/backbones/openclip-vit-b-16.yaml \\
        --config configs/datasets/cifar10.yaml --config configs/methods/residual.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.model import ResidualModel


class ResidualTrainer(Trainer):
    """Lightning's Trainer plus `extract`, so that cache building uses the same strategies (DDP)."""

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
    rows = [
        ("method", model.method),
        ("zero-shot test accuracy", fmt(zs)),
        (f"{model.method} test accuracy", fmt(acc)),
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
    ResidualCLI(
        ResidualModel,
        ResidualDataModule,
        trainer_class=ResidualTrainer,
        args=argv,  # None: sys.argv, which DDP's launcher re-runs in each process
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()

"""The `residual-lightning` console script (nothing in the package imports it).

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (Lightning's), ``extract`` (build the
activation caches, sharded across devices): the LightningCLI of `residual_lightning.recipe`;
``analyze`` (the analysis toolkit, `residual_lightning.analysis.cli`), ``grid`` (backbones x
datasets x methods x seeds, `residual_lightning.grid`) and ``ablate`` (the paper's ablations as
sweeps, `residual_lightning.ablations`) have their own parsers.

    residual-lightning fit --config configs/quickstart.yaml
    residual-lightning fit --config configs/backbones/openclip-vit-b-16.yaml \\
        --config configs/datasets/cifar10.yaml --config configs/methods/residual.yaml
    residual-lightning fit --config configs/quickstart.yaml --ckpt_path last   # resume a killed run
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from jsonargparse import DefaultHelpFormatter

from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.model import ResidualModel
from residual_lightning.recipe import ResidualCLI, ResidualTrainer, print_summary

__all__ = ["ResidualCLI", "ResidualTrainer", "main", "package_version", "print_summary"]

DESCRIPTION = """\
ResiDual adapters for frozen vision-language backbones, trained with Lightning.

  residual-lightning fit --config configs/quickstart.yaml
  residual-lightning fit --help        the options of a subcommand (also validate, test, ...)"""

EPILOG = """\
more subcommands, with their own options:
  analyze {intrinsic-dim,similarity,textspan,selection,report}
                        analyses of residual units (intrinsic dimension, spectral
                        similarity, head descriptions, unit selection, the report
                        of a checkpoint): residual-lightning analyze --help
  grid                  backbones x datasets x methods x seeds, results in one
                        table: residual-lightning grid --help
  ablate {components,units,reference,coarse_vs_residual,selection,all}
                        the paper's ablations as sweeps over seeds, each with a
                        table and a figure: residual-lightning ablate --help"""


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, keeping the line breaks of the description and the epilog."""


def package_version() -> str:
    """The installed version of residual-lightning (``unknown`` when it is not installed)."""
    try:
        return version("residual-lightning")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `residual-lightning` console script."""
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["analyze"]:
        from residual_lightning.analysis.cli import main as analyze

        analyze(words[1:])
        return
    if words[:1] == ["grid"]:
        from residual_lightning.grid import main as grid

        grid(words[1:])
        return
    if words[:1] == ["ablate"]:
        from residual_lightning.ablations import main as ablate

        ablate(words[1:])
        return
    try:
        ResidualCLI(
            ResidualModel,
            ResidualDataModule,
            trainer_class=ResidualTrainer,
            args=argv,  # None: sys.argv, which DDP's launcher re-runs in each process
            save_config_kwargs={"overwrite": True},
            parser_kwargs={  # the top-level parser only: `residual-lightning --help`, `--version`
                "prog": "residual-lightning",
                "description": DESCRIPTION,
                "epilog": EPILOG,
                "formatter_class": _HelpFormatter,
                "version": package_version(),
            },
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

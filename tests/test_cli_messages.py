"""What the CLI tells users: every flag a message suggests is one the CLI accepts (and that takes
effect), the top-level help names every subcommand, help cites only shipped files, one optimizer
option, and a clear error when torchvision cannot download a dataset."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import urllib.error
from importlib.metadata import version
from pathlib import Path

import pytest
import torchvision.datasets as tvd
import yaml
from jsonargparse import Namespace

from residual_lightning import ablations, grid
from residual_lightning.adapters import OPTIONS, options_for
from residual_lightning.analysis import cli as analyze_cli
from residual_lightning.cli import ResidualCLI, main
from residual_lightning.data.layouts import DatasetDownloadError
from residual_lightning.data.registry import load_dataset

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "residual_lightning"
QUICK = str(ROOT / "configs" / "quickstart.yaml")
FLAG = re.compile(r"(?<![\w-])--[a-z_][a-z0-9_.]*")

# A sample command line for each flag the package's strings (messages, help, docstrings) suggest,
# per parser: ``lightning`` (fit, validate, test, predict, extract: ResidualCLI), ``analyze``
# (its subcommands), ``grid`` and ``ablate``. (subcommand, value...): the value must differ from the default so
# that the test sees it land; a flag with no entry fails the test (add one).
SAMPLES: dict[tuple[str, str], tuple[str, ...]] = {
    ("lightning", "--ckpt_path"): ("fit", "some.ckpt"),
    ("lightning", "--checkpoint.dirpath"): ("fit", "ckpts"),
    ("lightning", "--config"): ("fit", QUICK),
    ("lightning", "--data"): ("fit", "{dataset: cifar10}"),
    ("lightning", "--data.backbone.model_name"): ("fit", "ViT-B-16"),
    ("lightning", "--data.backbone.pretrained"): ("fit", "/path/to/model.safetensors"),
    ("lightning", "--data.cache_dir"): ("fit", "/tmp/somewhere"),
    ("lightning", "--data.download"): ("fit", "true"),
    ("lightning", "--data.on_mismatch"): ("fit", "rebuild"),
    ("lightning", "--data.reference"): ("fit", "imagenet"),
    ("lightning", "--data.reference_root"): ("fit", "data/imagenet"),
    ("lightning", "--data.root"): ("fit", "data/x"),
    ("lightning", "--data.seed"): ("fit", "7"),
    ("lightning", "--help"): ("fit",),
    ("lightning", "--model"): ("fit", "FinetuneModel"),
    ("lightning", "--model.adapter"): ("fit", "ResidualStarOptions"),
    ("lightning", "--model.adapter.help"): ("fit", "ResidualOptions"),
    ("lightning", "--model.adapter.seed"): ("fit", "7"),
    ("lightning", "--model.classifier"): ("fit", "prototypes"),
    ("lightning", "--model.lr"): ("fit", "0.01"),
    ("lightning", "--print_config"): ("fit",),
    ("lightning", "--report"): ("fit", "false"),
    ("lightning", "--report_recipe"): ("fit", "paper"),
    ("lightning", "--seed_everything"): ("fit", "7"),
    ("lightning", "--skip_bad_images"): ("predict", "true"),
    ("lightning", "--trainer.accelerator"): ("fit", "gpu"),
    ("lightning", "--trainer.default_root_dir"): ("fit", "somewhere"),
    ("lightning", "--trainer.enable_model_summary"): ("fit", "false"),
    ("lightning", "--trainer.enable_progress_bar"): ("fit", "false"),
    ("lightning", "--trainer.logger.init_args.name"): ("fit", "other"),
    ("lightning", "--trainer.logger.init_args.save_dir"): ("fit", "elsewhere"),
    ("lightning", "--trainer.max_epochs"): ("fit", "3"),
    ("lightning", "--weights_only"): ("fit", "false"),
    ("analyze", "--bank"): ("textspan", "my_bank.txt"),
    ("analyze", "--ckpt"): ("report", "best.ckpt"),
    ("analyze", "--config"): ("intrinsic-dim", QUICK),
    ("analyze", "--config2"): ("similarity", QUICK),
    ("analyze", "--data.cache_dir"): ("intrinsic-dim", "/tmp/c"),
    ("analyze", "--k"): ("textspan", "7"),
    ("analyze", "--max_samples"): ("intrinsic-dim", "500"),
    ("analyze", "--out_dir"): ("intrinsic-dim", "elsewhere"),
    ("analyze", "--part"): ("intrinsic-dim", "val"),
    ("analyze", "--recipe"): ("selection", "paper"),
    ("analyze", "--seeds"): ("selection", "3"),
    ("analyze", "--units"): ("similarity", "layers"),
    ("grid", "--backbones"): ("", "openclip-vit-b-16"),
    ("grid", "--cache_dir"): ("", "/tmp/c"),
    ("grid", "--configs"): ("", str(ROOT / "configs")),
    ("grid", "--datasets"): ("", "cifar10"),
    ("grid", "--extra"): ("", "--trainer.accelerator cpu"),
    ("grid", "--launcher"): ("", "subprocess"),
    ("grid", "--max_epochs"): ("", "2"),
    ("grid", "--methods"): ("", "residual"),
    ("grid", "--out"): ("", "elsewhere"),
    ("grid", "--preset"): ("", "paper"),
    ("grid", "--recipes"): ("", "paper"),
    ("grid", "--rerun"): ("",),
    ("grid", "--seeds"): ("", "3"),
    ("grid", "--verbose"): ("",),
    ("grid", "--worker"): ("", "spec.json"),
    ("lightning", "--model.adapter.components"): ("fit", "4"),
    ("lightning", "--model.adapter.transform"): ("fit", "heads"),
    ("ablate", "--backbone"): ("", "openclip-vit-b-16"),
    ("ablate", "--cache_dir"): ("", "/tmp/c"),
    ("ablate", "--configs"): ("", str(ROOT / "configs")),
    ("ablate", "--dataset"): ("", "cifar10"),
    ("ablate", "--extra"): ("", "--trainer.accelerator cpu"),
    ("ablate", "--imagenet_root"): ("", "/data/imagenet"),
    ("ablate", "--launcher"): ("", "subprocess"),
    ("ablate", "--max_epochs"): ("", "2"),
    ("ablate", "--method"): ("", "residual_star"),
    ("ablate", "--out"): ("", "elsewhere"),
    ("ablate", "--rerun"): ("",),
    ("ablate", "--seeds"): ("", "3"),
    ("ablate", "--selection_seeds"): ("", "3"),
    ("ablate", "--variants"): ("", "1"),
    ("ablate", "--verbose"): ("",),
}
# Flags of other programs, quoted as such.
EXTERNAL = {("recipe.py", "--logdir")}  # tensorboard --logdir
# Flags that print and exit, or config files: checked to parse, not to set a value.
NO_VALUE_CHECK = {"--config", "--configs", "--print_config", "--model.adapter.help", "--extra"}


def _groups(path: Path) -> tuple[str, ...]:
    """The parsers whose flags the strings of `path` may suggest."""
    rel = path.relative_to(PACKAGE).as_posix()
    if rel.startswith("analysis/"):
        return ("analyze",)
    if rel == "grid.py":  # its own options, and those of the fit runs it starts
        return ("grid", "lightning")
    if rel in ("ablations.py", "ablation_report.py"):  # likewise for `residual-lightning ablate`
        return ("ablate", "lightning")
    return ("lightning",)


def suggested_flags() -> list[tuple[str, int, str]]:
    """(file, line, flag) of every ``--flag`` in the package's string literals and docstrings.

    A flag ending in ``.`` (a prefix: ``--data.*``, ``--model.adapter.<name>``) is left out.
    """
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    if not flag.endswith("."):
                        found.append((str(path.relative_to(PACKAGE)), node.lineno, flag))
    return found


_MISSING = object()


def _value(config: Namespace | object, key: str):
    """`config`'s value at the dotted `key` as the command line spells it (``init_args`` implied)."""
    for part in key.split("."):
        if isinstance(config, Namespace) and part not in config and "init_args" in config:
            config = config["init_args"]
        if not isinstance(config, Namespace) or part not in config:
            return _MISSING
        config = config[part]
    return config


def _parse(parser, argv: list[str]):
    """``(config, None)``, or ``(None, error text)`` when the parser exits 2; exit 0 (help) is ``(0, None)``."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv), None
    except SystemExit as ex:
        return (0, None) if ex.code == 0 else (None, err.getvalue()[-1500:] or f"exit {ex.code}")


class _Captured(Exception):
    pass


class _GridParser:
    """`residual_lightning.grid.parse_args` (presets applied) as a parser."""

    parse_args = staticmethod(grid.parse_args)


class _AblateParser:
    """`residual_lightning.ablations.parse_args` as a parser."""

    parse_args = staticmethod(ablations.parse_args)


@pytest.fixture(scope="module")
def parsers():
    """The parsers of `residual-lightning` (built as the console script builds them), analyze, grid."""

    def capture(self, parser, args):
        raise _Captured(parser)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ResidualCLI, "parse_arguments", capture)
        with pytest.raises(_Captured) as got:
            main(["fit"])
    return {
        "lightning": got.value.args[0],
        "analyze": analyze_cli._parser(),
        "grid": _GridParser(),
        "ablate": _AblateParser(),
    }


def check_flag(parsers, group: str, flag: str) -> str | None:
    """None if `flag` parses with `group`'s parser and its sample value lands; else why not."""
    sub, *values = SAMPLES[(group, flag)]
    parser = parsers[group]
    base = {"lightning": [sub, "--config", QUICK], "analyze": [sub], "grid": [], "ablate": ["components"]}[
        group
    ]
    config, error = _parse(parser, [*base, flag, *values])
    if error is not None:
        return error
    if config == 0 or flag in NO_VALUE_CHECK:
        return None
    default, required = _parse(parser, base)  # fails when the flag is a required one
    key = flag[2:]
    if group in ("grid", "ablate"):
        given, before = getattr(config, key, _MISSING), getattr(default, key, _MISSING)
    else:
        given = _value(config[sub], key)
        before = _MISSING if required else _value(default[sub], key)
    if given is _MISSING or given == before:
        return f"accepted, but {key} is {given!r} either way (a link or another option sets it)"
    return None


def test_every_suggested_flag_parses_and_takes_effect(parsers):
    problems, unsampled, checked = [], [], {}
    for file, line, flag in suggested_flags():
        if (Path(file).name, flag) in EXTERNAL:
            continue
        groups = [g for g in _groups(PACKAGE / file) if (g, flag) in SAMPLES]
        if not groups:
            unsampled.append(f"{file}:{line}: {flag} ({' or '.join(_groups(PACKAGE / file))})")
            continue
        errors = []
        for group in groups:
            if (group, flag) not in checked:
                checked[(group, flag)] = check_flag(parsers, group, flag)
            errors.append(checked[(group, flag)])
        if all(errors):
            problems.append(f"{file}:{line}: {flag}: {errors[0]}")
    assert not unsampled, "flags without a sample in SAMPLES:\n" + "\n".join(unsampled)
    assert not problems, "suggested flags the CLI does not accept:\n" + "\n".join(problems)
    assert len(checked) > 30  # the scan found the package's messages


def test_the_check_catches_a_flag_the_cli_ignores(parsers):
    # The offline-weights error once suggested --model.backbone.pretrained: jsonargparse accepts it,
    # but the link from data.backbone overwrites it, so it has no effect.
    SAMPLES[("lightning", "--model.backbone.pretrained")] = ("fit", "/path/to/model.safetensors")
    try:
        assert "either way" in check_flag(parsers, "lightning", "--model.backbone.pretrained")
    finally:
        del SAMPLES[("lightning", "--model.backbone.pretrained")]
    SAMPLES[("lightning", "--model.pretrained")] = ("fit", "x")
    try:
        assert "pretrained" in check_flag(parsers, "lightning", "--model.pretrained")
    finally:
        del SAMPLES[("lightning", "--model.pretrained")]


def test_adapter_deprecation_suggests_a_command_line_that_parses(parsers):
    with pytest.warns(FutureWarning, match="command line") as record:
        options_for("residual", {"seed": 3, "add_mean": True})
    words = shlex.split(re.search(r"command line: ([^)]*)\)", str(record[0].message))[1])
    assert words[:2] == ["--model.adapter", "ResidualOptions"]
    config, error = _parse(parsers["lightning"], ["fit", "--config", QUICK, *words])
    assert error is None, error
    adapter = _value(config.fit, "model.adapter")
    assert adapter.class_path.endswith(".ResidualOptions")
    assert (adapter.init_args.seed, adapter.init_args.add_mean) == (3, True)


# -------------------------------------------------------------------------------- help, version


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 0
    return out.getvalue()


def test_top_level_help_lists_analyze_and_grid():
    text = _help(["--help"])
    for name in ("fit", "validate", "test", "predict", "extract", "analyze", "grid", "--version"):
        assert re.search(rf"(?<![\w-]){name}(?![\w-])", text), name
    assert "{" + ",".join(analyze_cli.COMMANDS) + "}" in text  # the analyze subcommands, current
    assert "residual-lightning analyze --help" in text and "residual-lightning grid --help" in text
    assert "residual-lightning ablate --help" in text
    assert "Lightning Trainer command line tool" not in text


def test_version_prints_the_package_version():
    assert _help(["--version"]).strip() == f"residual-lightning {version('residual-lightning')}"


def test_help_cites_only_shipped_files():
    texts = {
        "top": _help(["--help"]),
        "fit": _help(["fit", "--help"]),
        "analyze": _help(["analyze", "--help"]),
        "grid": _help(["grid", "--help"]),
        "ablate": _help(["ablate", "--help"]),
    }
    for name in analyze_cli.COMMANDS:
        texts[f"analyze {name}"] = _help(["analyze", name, "--help"])
    for cls in OPTIONS.values():
        texts[cls.__name__] = _help(["fit", "--config", QUICK, "--model.adapter.help", cls.__name__])
    outputs = {"results.md", "report.md", "summary.md"}  # files the commands write
    for where, text in texts.items():
        assert "method.md" not in text, where
        for cited in re.findall(r"[\w./-]+\.md\b", text):
            assert cited in outputs or (ROOT / cited).is_file(), f"{where} cites {cited}"


# -------------------------------------------------------------------------------- optimizer


def test_one_optimizer_option(parsers):
    text = _help(["fit", "--help"])
    assert not re.search(r"--(optimizer|lr_scheduler)\b", text)
    config, error = _parse(parsers["lightning"], ["fit", "--config", QUICK, "--optimizer", "SGD"])
    assert config is None and "optimizer" in error
    config, error = _parse(
        parsers["lightning"], ["fit", "--config", QUICK, "--model.optimizer", "torch.optim.SGD"]
    )
    assert error is None, error
    assert _value(config.fit, "model.optimizer").class_path == "torch.optim.SGD"


def test_no_config_sets_lightning_optimizer():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        assert not {"optimizer", "lr_scheduler"} & set(config), path


# -------------------------------------------------------------------------------- downloads


@pytest.mark.parametrize(
    ("name", "cls", "split", "error", "layout"),
    [
        ("eurosat", "EuroSAT", "all", urllib.error.URLError("[Errno -3] name resolution"), "2750"),
        ("cifar10", "CIFAR10", "train", RuntimeError("File not found or corrupted."), "cifar-10-batches-py"),
    ],
)
def test_failed_download_says_where_files_go(tmp_path, monkeypatch, name, cls, split, error, layout):
    def offline(root, download=False, **kw):  # torchvision's class, on a machine without network
        raise error

    monkeypatch.setattr(tvd, cls, offline)
    root = tmp_path / "data"
    with pytest.raises(DatasetDownloadError) as err:
        load_dataset(name, root, split, download=True)
    msg = str(err.value)
    assert err.value.__cause__ is error
    assert msg.startswith(f"{name}:") and f"torchvision.datasets.{cls}" in msg
    assert "offline" in msg and str(root) in msg and layout in msg and str(error) in msg
    assert "--data.download false" in msg

"""Every shipped YAML goes through the real `ResidualCLI` parser and instantiates (nothing runs).

Instantiation builds the data module and the model from their init args (no data is read, no
weights are loaded, except the class names of a folder/CSV dataset, for which a small fake one is
made). Each backbone file is combined with every method file; each dataset file with the tiny
backbone. A test checks that the three families set disjoint keys, so every other combination
resolves to the same values in any order and needs no test of its own.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import yaml
from PIL import Image

from residual_lightning.adapters import ResidualStarOptions
from residual_lightning.backbones.hf_known import KNOWN_CONFIGS
from residual_lightning.cli import ResidualCLI, ResidualTrainer, main
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.data.registry import DATASETS
from residual_lightning.model import ResidualModel
from residual_lightning.units import BackboneSpec, layout_from_config

# The options a model resolves residual_star to: its unset threshold_fallback takes model.threshold_fallback.
RESOLVED_STAR = ResidualStarOptions(seed=3, threshold_fallback="all")

# The CLI warns when `args=` is given while sys.argv holds pytest's own options: intended here.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
BACKBONES = sorted((CONFIGS / "backbones").glob("*.yaml"))
DATASET_FILES = sorted((CONFIGS / "datasets").glob("*.yaml"))
METHODS = sorted((CONFIGS / "methods").glob("*.yaml"))
TINY = CONFIGS / "backbones" / "tiny.yaml"
DIGITS = CONFIGS / "datasets" / "digits.yaml"
RESIDUAL = CONFIGS / "methods" / "residual.yaml"
PAPER = CONFIGS / "recipes" / "paper.yaml"

# The authors' recipe (method.md §3): learning rate, batch size, gradient clipping.
RECIPE = {
    "zeroshot": (None, None, None),
    "residual": (0.8, 64, None),
    "residual_star": (0.8, 64, None),
    "coarse": (0.8, 64, None),
    "linear": (1e-3, 64, None),
    "spectral": (1e-3, 64, None),
    "finetune": (1e-5, 128, 1.0),
}
# The keys each family may set: a backbone file only the backbone, a dataset file only the data,
# a method file only the method's model, batch and trainer options.
FAMILY_KEYS = {
    "backbones": ("data.backbone.", "data.extract_batch_size"),
    "datasets": ("data.dataset", "data.root", "data.download", "data.dataset_options"),
    "methods": ("model.", "data.batch_size", "trainer."),
}


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys of a YAML mapping's leaves (a mapping counts as a leaf under dataset_options)."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in ("data.dataset_options", "model.adapter"):
            out.update(leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def method_of(path: Path) -> str:
    """A method config's `model.method`, or the `method` of the model class it selects (finetune)."""
    model = load(path)["model"]
    if "class_path" in model:
        module, _, name = model["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name).method
    return model["method"]


def build(tmp_path: Path, *configs: Path, extra: tuple[str, ...] = ()) -> ResidualCLI:
    """Parse and instantiate with the CLI, everything that could be written pointed into tmp_path."""
    args = [a for c in configs for a in ("--config", str(c))]
    args += [
        "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        *extra,
    ]  # fmt: skip
    return ResidualCLI(ResidualModel, ResidualDataModule, trainer_class=ResidualTrainer, run=False, args=args)


def fake_images(root: Path, classes=("cat", "sea_lion"), per_class: int = 10) -> list[tuple[str, str]]:
    """Tiny PNGs in class folders; returns (relative path, class) pairs."""
    rows = []
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((8, 8, 3), 10 * i + 100 * label, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            rows.append((f"{name}/{i}.png", name))
    return rows


def test_quickstart_alone(tmp_path):
    cli = build(tmp_path, QUICKSTART)
    assert cli.model.method == "residual" and cli.model.lr == 0.8
    assert cli.datamodule.dataset == "digits" and cli.datamodule.num_classes == 10
    assert cli.model.hparams.shape == layout_from_config("RL-Tiny-ViT-64").shape == (4, 4, 64, 128)
    assert cli.trainer.max_epochs == 30


@pytest.mark.parametrize("backbone", BACKBONES, ids=ids(BACKBONES))
@pytest.mark.parametrize("method", METHODS, ids=ids(METHODS))
def test_backbone_with_every_method(tmp_path, backbone, method):
    cfg = load(backbone)["data"]["backbone"]
    cli = build(tmp_path, backbone, DIGITS, method)
    spec = cli.datamodule.backbone
    library = cfg.get("library", "open_clip")
    assert spec == BackboneSpec(cfg["model_name"], cfg["pretrained"], library=library)
    assert cli.model.backbone_spec == spec  # linked, never typed twice
    layout = layout_from_config(cfg["model_name"], library=library, pretrained=cfg["pretrained"])
    assert cli.model.hparams.shape == layout.shape
    name = method_of(method)
    lr, batch, clip = RECIPE[name]
    assert cli.model.method == name
    if lr is not None:
        assert cli.model.lr == pytest.approx(lr)
        assert cli.datamodule.batch_size == batch
    assert cli.trainer.gradient_clip_val == clip


@pytest.mark.parametrize("backbone", BACKBONES, ids=ids(BACKBONES))
def test_backbone_tags_exist_and_match_the_architecture(backbone):
    """A tag open_clip does not know fails at download time; a QuickGELU mismatch only warns."""
    cfg = load(backbone)["data"]["backbone"]
    if cfg["pretrained"] is None:
        return
    library = cfg.get("library", "open_clip")
    if library == "timm":
        assert f"{cfg['model_name']}.{cfg['pretrained']}" in timm.list_pretrained(cfg["model_name"] + ".*")
        return
    if library == "hf":  # no offline registry of hub ids: the architecture is known for planning
        assert cfg["model_name"] in KNOWN_CONFIGS and cfg["pretrained"] == "main"
        return
    assert cfg["pretrained"] in open_clip.list_pretrained_tags_by_model(cfg["model_name"])
    tag = open_clip.get_pretrained_cfg(cfg["model_name"], cfg["pretrained"])
    model = open_clip.get_model_config(cfg["model_name"])
    assert bool(tag.get("quick_gelu", False)) == bool(model.get("quick_gelu", False))


@pytest.mark.parametrize("dataset", DATASET_FILES, ids=ids(DATASET_FILES))
def test_every_dataset(tmp_path, dataset):
    cfg = load(dataset)["data"]
    name = cfg["dataset"]
    spec = DATASETS[name]
    extra: tuple[str, ...] = ()
    if name == "imagefolder":
        fake_images(tmp_path / "images")
        extra = ("--data.root", str(tmp_path / "images"))
    elif name == "csv":
        rows = fake_images(tmp_path / "images")
        table = tmp_path / "images" / "labels.csv"
        table.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
        extra = ("--data.root", str(table))
    cli = build(tmp_path, TINY, dataset, RESIDUAL, extra=extra)
    dm = cli.datamodule
    assert dm.dataset == name
    assert dm.download == cfg.get("download", False)
    assert not dm.download or spec.can_download, f"{name}: torchvision cannot download it"
    if name not in ("imagefolder", "csv", "digits"):
        assert cfg["root"] == f"data/{name}"
    if spec.class_names:
        assert cli.model.class_names == list(spec.class_names)
    else:
        assert cli.model.class_names == ["cat", "sea lion"]  # read from the folders, "_" as a space


def test_a_config_per_registry_dataset():
    assert {load(p)["data"]["dataset"] for p in DATASET_FILES} == set(DATASETS)
    assert {p.stem for p in DATASET_FILES} == set(DATASETS)


def test_a_config_per_method():
    assert {method_of(p) for p in METHODS} == set(RECIPE)


def test_families_set_disjoint_keys():
    """So `--config backbone --config dataset --config method` means the same in any order."""
    seen: dict[str, str] = {}
    for family, prefixes in FAMILY_KEYS.items():
        for path in sorted((CONFIGS / family).glob("*.yaml")):
            for key in leaves(load(path)):
                assert key.startswith(prefixes), f"{path.name} sets {key}, outside its family {family}"
                owner = seen.setdefault(key, family)
                assert owner == family, f"{key} is set by both {owner} and {family} configs"


ADAPTER = "model:\n  adapter:\n    class_path: residual_lightning.adapters.ResidualOptions\n    init_args:\n"


@pytest.mark.parametrize(
    "bad, key, words",
    [
        ("model:\n  methd: residual\n", "model.methd", ["does not accept"]),
        ("data:\n  batch_size: abc\n", "data.batch_size", ["int", "abc"]),
        ("model:\n  method: residul\n", "model.method", ["residul", "residual_star"]),
        (f"{ADAPTER}      compnents: 0.9\n", "adapter", ["compnents", "not accepted"]),
        (f"{ADAPTER}      init: zeros\n", "adapter", ["init", "zeros", "'normal'"]),
        ("model:\n  adapter: {inti: ones}\n", "adapter", ["inti"]),
    ],
    ids=["typo", "wrong-type", "unknown-method", "adapter-typo", "adapter-wrong-value", "old-spelling-typo"],
)
def test_bad_yaml_fails_with_the_parser_message(tmp_path, capsys, bad, key, words):
    """A clean jsonargparse error naming the key (exit code 2), not a traceback from deep inside."""
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    safe = ["--data.cache_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--config", str(path), *safe])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert key in err
    assert all(w in err for w in words), err[-500:]
    assert "Traceback" not in err


def test_adapter_options_are_listed_in_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.adapter.help", "ResidualStarOptions"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help wraps at the terminal's width
    for words in ("adapter.components", "default: {'heads': 0.9}", "adapter.others {keep,zero,mean}"):
        assert words in out, out[-1500:]
    assert "explained variance" in out  # the field docs


def test_adapter_option_override_and_the_old_spelling(tmp_path):
    star = CONFIGS / "methods" / "residual_star.yaml"
    cli = build(tmp_path, TINY, DIGITS, star, extra=("--model.adapter.seed", "3"))
    assert cli.model.options == RESOLVED_STAR
    assert cli.model.hparams.adapter == RESOLVED_STAR.to_hparams()
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  method: residual_star\n  adapter:\n    seed: 3\n")
    with pytest.warns(
        FutureWarning, match=r"write `model.adapter: \{class_path: residual_lightning.adapters"
    ):
        cli = build(tmp_path, TINY, DIGITS, old)
    assert cli.model.options == RESOLVED_STAR


@pytest.mark.parametrize("method", METHODS, ids=ids(METHODS))
def test_paper_recipe_composes_after_every_method(tmp_path, method):
    """configs/recipes/paper.yaml, last: the paper's raw logits, equal-share convention and ImageNet
    PCA reference; the method's learning rate, batch size, clipping and adapter stay its own."""
    alone = build(tmp_path, TINY, DIGITS, method)
    cli = build(tmp_path, TINY, DIGITS, method, PAPER)
    name = method_of(method)
    lr, batch, clip = RECIPE[name]
    assert cli.model.method == name
    assert cli.model.logit_mode == "raw"
    assert cli.model.hparams.convention == "equal_share"  # linked from the data module
    dm = cli.datamodule
    assert dm.convention == "equal_share"
    assert dm.reference == "imagenet" and dm.reference_size == 80_000 and dm.reference_root
    if lr is not None:
        assert cli.model.lr == pytest.approx(lr)
        assert dm.batch_size == batch
    assert cli.model.lr == alone.model.lr and dm.batch_size == alone.datamodule.batch_size
    assert cli.trainer.gradient_clip_val == clip
    # the adapter options are the method's own, but for the two the recipe sets at model level
    options, own = getattr(cli.model, "options", None), getattr(alone.model, "options", None)
    if own is not None:
        paper = {"threshold_fallback": "one", "basis": "standard"}
        own = dataclasses.replace(own, **{k: v for k, v in paper.items() if hasattr(own, k)})
    assert options == own


def test_paper_recipe_sets_no_method_keys():
    keys = leaves(load(PAPER))
    assert not [k for k in keys if k.startswith(("model.lr", "model.adapter", "model.method", "trainer."))]
    assert "data.batch_size" not in keys
    assert keys["model.logit_mode"] == "raw" and keys["data.convention"] == "equal_share"


def test_lr_follows_the_method_without_its_yaml(tmp_path):
    """`--model.method linear` alone (no method file) trains at linear's 1e-3, not residual's 0.8."""
    cli = build(tmp_path, TINY, DIGITS, extra=("--model.method", "linear"))
    assert cli.model.lr == pytest.approx(1e-3)
    cli = build(tmp_path, TINY, DIGITS, extra=("--model.method", "linear", "--model.lr", "0.05"))
    assert cli.model.lr == pytest.approx(0.05)
    cli = build(tmp_path, TINY, DIGITS, RESIDUAL, PAPER, extra=("--data.batch_size", "32"))
    assert cli.datamodule.batch_size == 32

"""The full-tower baseline `FinetuneModel`: chosen by class, images by link, the deprecated
``model.method: finetune``, and checkpoints of this release and the earlier one."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from residual_lightning.checkpoints import stamp
from residual_lightning.cli import ResidualCLI, ResidualTrainer, main
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.finetune import DEPRECATED_METHOD, FinetuneModel
from residual_lightning.model import ResidualCLIP, ResidualModel

# The CLI warns when `args=` is given while sys.argv holds pytest's own options: intended here.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA = ("--config", str(CONFIGS / "backbones/tiny.yaml"), "--config", str(CONFIGS / "datasets/digits.yaml"))
FINETUNE = ("--config", str(CONFIGS / "methods" / "finetune.yaml"))


def cli(tmp_path: Path, *args: str, cache: Path | None = None, run: bool = False) -> ResidualCLI:
    """The real CLI on the tiny backbone and digits, nothing written outside tmp_path."""
    args = (
        *args,
        "--data.cache_dir", str(cache or tmp_path / "cache"),
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    if run:  # the subcommand first
        args = (args[0], *DATA, *args[1:])
    else:
        args = (*DATA, *args)
    return ResidualCLI(
        ResidualModel, ResidualDataModule, trainer_class=ResidualTrainer, run=run, args=list(args)
    )


def images_module(cache: Path) -> ResidualDataModule:
    return ResidualDataModule(
        dataset="digits", cache_dir=str(cache), dataset_options={"image_size": 64}, mode="images"
    )


# ---------------------------------------------------------------- chosen by class, images by link


def test_finetune_config_selects_the_model_class_and_images(tmp_path):
    c = cli(tmp_path, *FINETUNE)
    assert type(c.model) is FinetuneModel and c.model.method == "finetune"
    assert c.model.lr == pytest.approx(1e-5)
    assert c.datamodule.mode == "images"  # linked from the model class
    assert (c.datamodule.batch_size, c.trainer.gradient_clip_val) == (128, 1.0)
    assert c.model.backbone_spec == c.datamodule.backbone  # the data's links reach the subclass
    assert c.model.class_names == c.datamodule.class_names
    assert tuple(c.model.hparams.shape) == c.datamodule.shape
    assert c.model.hparams["_class_path"] == "residual_lightning.finetune.FinetuneModel"
    plain = cli(tmp_path)  # no class named: the adapter model on caches
    assert type(plain.model) is ResidualModel and plain.datamodule.mode == "cache"


def test_model_flag_takes_the_class_and_its_own_default_learning_rate(tmp_path):
    c = cli(tmp_path, "--model", "FinetuneModel")
    assert type(c.model) is FinetuneModel and c.datamodule.mode == "images"
    assert c.model.lr == pytest.approx(1e-5)  # not the adapter model's 0.8
    assert cli(tmp_path, "--model", "FinetuneModel", "--model.lr", "3e-5").model.lr == pytest.approx(3e-5)
    back = cli(tmp_path, *FINETUNE, "--model", "ResidualModel")
    assert type(back.model) is ResidualModel and back.datamodule.mode == "cache"
    assert back.model.lr == pytest.approx(1e-5)  # a value given before the switch is kept (jsonargparse)


@pytest.mark.parametrize("spelling", ["flags", "yaml"])
def test_deprecated_method_finetune_builds_a_finetune_model(tmp_path, spelling):
    if spelling == "flags":
        old = ("--model.method", "finetune", "--model.lr", "2e-5", "--model.logit_mode", "raw")
    else:
        path = tmp_path / "old.yaml"
        path.write_text("model:\n  method: finetune\n  lr: 2.0e-05\n  logit_mode: raw\n  adapter: null\n")
        old = ("--config", str(path))
    with pytest.warns(DeprecationWarning, match=re.escape(DEPRECATED_METHOD)):
        c = cli(tmp_path, *old)
    assert type(c.model) is FinetuneModel and c.datamodule.mode == "images"
    assert c.model.lr == pytest.approx(2e-5) and c.model.logit_mode == "raw"  # its options carried over


def test_residual_model_refuses_finetune_naming_the_class():
    with pytest.raises(ValueError, match=r"no longer a ResidualModel: build .*FinetuneModel"):
        ResidualModel(method="finetune", class_names=["a", "b"], shape=(1, 1, 2, 3))


def test_option_of_another_class_is_refused_naming_the_dotted_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *DATA, *FINETUNE, "--model.method", "residual", "--data.cache_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "FinetuneModel does not accept option 'model.method'" in err and "Traceback" not in err


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tower(digits_cache):
    """A FinetuneModel with a filled classifier and its tower (random tiny weights), in eval mode."""
    dm = images_module(digits_cache)
    torch.manual_seed(0)
    model = FinetuneModel(lr=3e-5, class_names=dm.class_names, shape=dm.shape, backbone=dm.backbone)
    model.finetuned = dm.backbone.load().model.visual
    model.classifier.copy_(torch.nn.functional.normalize(torch.randn_like(model.classifier), dim=-1))
    model.ready.fill_(True)
    return model.eval()


def write_checkpoint(model: FinetuneModel, path: Path, earlier: bool, instantiator: bool = False) -> Path:
    """A checkpoint of `model` as `fit` writes it; `earlier`: as a ``method: finetune`` run of the
    earlier release wrote it (ResidualModel's hyperparameters, zero head maps, no class path)."""
    hparams = dict(model.hparams)
    state = dict(model.state_dict())
    if earlier:
        layers, heads, k, dim = model.hparams.shape
        hparams = {
            "method": "finetune", "adapter": {}, "lr": hparams["lr"], "logit_mode": "scaled_cosine",
            "classifier": "text", "backbone": asdict(model.backbone_spec), "class_names": model.class_names,
            "shape": list(model.hparams.shape), "convention": "default",
        }  # fmt: skip
        state["head_maps"] = torch.zeros(layers, heads, dim, k)
    if instantiator:  # what the LightningCLI adds to what it instantiates
        hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    ckpt = {"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__}
    stamp(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "earlier, instantiator",
    [(False, False), (True, False), (True, True)],
    ids=["this-release", "earlier-release", "earlier-release-cli"],
)
def test_finetune_checkpoints_load_through_residual_clip(tmp_path, tower, earlier, instantiator):
    path = write_checkpoint(tower, tmp_path / "ft.ckpt", earlier, instantiator)
    clip = ResidualCLIP.from_checkpoint(str(path))
    assert type(clip.model) is FinetuneModel and clip.model.lr == pytest.approx(3e-5)
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tower.logits_from_embedding(tower.finetuned(images).float()).softmax(-1)
        embedding = tower.finetuned(images).float()
    torch.testing.assert_close(clip.predict(images), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip.encode_image(images), embedding, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="FinetuneModel"):
        ResidualModel.load_from_checkpoint(path, weights_only=True)


def test_checkpoint_of_the_other_class_is_refused_by_name(tower):
    ckpt = {"hyper_parameters": dict(tower.hparams)}
    stamp(ckpt)
    adapter_model = ResidualModel(class_names=tower.class_names, shape=tuple(tower.hparams.shape))
    with pytest.raises(ValueError, match="written by FinetuneModel .* pass --model FinetuneModel"):
        adapter_model.on_load_checkpoint(ckpt)
    ckpt = {"hyper_parameters": dict(adapter_model.hparams)}
    stamp(ckpt)
    finetune_model = FinetuneModel(class_names=tower.class_names, shape=tuple(tower.hparams.shape))
    with pytest.raises(ValueError, match="written by ResidualModel .* pass --model ResidualModel"):
        finetune_model.on_load_checkpoint(ckpt)


@pytest.mark.parametrize("spelling", ["config", "deprecated"])
def test_cli_validates_a_finetune_checkpoint_of_the_earlier_release(tmp_path, tower, digits_cache, spelling):
    path = write_checkpoint(tower, tmp_path / "old.ckpt", earlier=True, instantiator=True)
    choice = FINETUNE if spelling == "config" else ("--model.method", "finetune")
    c = cli(tmp_path, "validate", *choice, "--ckpt_path", str(path), cache=digits_cache, run=True)
    assert type(c.model) is FinetuneModel and c.datamodule.mode == "images"
    assert c.model.lr == pytest.approx(3e-5)  # the checkpoint's, merged into the config
    for name, value in tower.finetuned.state_dict().items():
        torch.testing.assert_close(c.model.finetuned.state_dict()[name], value, rtol=0, atol=0)
    assert "val/accuracy" in c.trainer.callback_metrics


@pytest.mark.slow
def test_fit_writes_a_checkpoint_that_knows_its_class(tmp_path, digits_cache):
    one_epoch = ("--trainer.max_epochs", "1", "--report", "false")
    c = cli(tmp_path, "fit", *FINETUNE, *one_epoch, cache=digits_cache, run=True)
    last = next(tmp_path.glob("**/last.ckpt"))
    assert torch.load(last, weights_only=True)["hyper_parameters"]["_class_path"].endswith("FinetuneModel")
    assert type(ResidualCLIP.from_checkpoint(str(last)).model) is FinetuneModel
    again = cli(tmp_path / "again", "validate", "--ckpt_path", str(last), cache=digits_cache, run=True)
    assert type(again.model) is FinetuneModel  # no --model: the checkpoint's class
    assert again.datamodule.mode == "images"
    saved = yaml.safe_load(next(tmp_path.glob("**/config.yaml")).read_text())
    assert saved["model"]["class_path"] == "residual_lightning.finetune.FinetuneModel"
    assert c.trainer.global_step > 0

"""Reliability: bad input gets a clear error, faults leave no half-written state, runs are reproducible."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from residual_lightning.cli import main
from residual_lightning.contributions import Contributions
from residual_lightning.model import ResidualModel

ROOT = Path(__file__).parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
SHAPE = (4, 4, 64, 128)


def tiny_model(**kw) -> ResidualModel:
    return ResidualModel(class_names=[str(i) for i in range(10)], shape=SHAPE, **kw)


def test_nan_loss_stops_training_naming_the_step():
    model = tiny_model(method="linear")
    model._build_adapter(None)
    batch = Contributions(
        torch.full((2, 4, 4, 64), float("nan")),
        torch.zeros(2, 4, 128),
        torch.zeros(2, 128),
        torch.zeros(2, dtype=torch.long),
    )
    with pytest.raises(FloatingPointError, match="train loss is nan at step"):
        model.training_step(batch, 0)


def test_incompatible_adapter_option_is_refused_at_construction():
    with pytest.raises(
        ValueError, match=r"\['others'\] do not apply to method 'coarse'; its options: init, seed"
    ):
        tiny_model(method="coarse", adapter={"others": "zero"})


def test_adapter_options_of_another_method_are_refused_at_construction():
    from residual_lightning.adapters import CoarseOptions

    with pytest.raises(
        ValueError,
        match=r"holds CoarseOptions, the options of method 'coarse', but model.method is 'residual'",
    ):
        tiny_model(method="residual", adapter=CoarseOptions())


def test_checkpoint_of_another_backbone_is_refused():
    model = tiny_model(method="residual")
    ckpt = {
        "hyper_parameters": {
            "backbone": {"model_name": "ViT-B-16", "pretrained": "openai", "precision": "fp32"}
        }
    }
    with pytest.raises(ValueError, match="checkpoint was trained with backbone=.*ViT-B-16"):
        model.on_load_checkpoint(ckpt)


def test_missing_ckpt_path_is_named(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="nonexistent.ckpt"):
        main(
            [
                "test",
                "--config",
                QUICK,
                "--data.cache_dir",
                str(tmp_path),
                "--ckpt_path",
                str(tmp_path / "nonexistent.ckpt"),
            ]
        )


@pytest.mark.slow
def test_same_seed_gives_identical_lambdas(tmp_path):
    from residual_lightning.data.datamodule import ResidualDataModule

    dm = ResidualDataModule(dataset="digits", cache_dir=str(tmp_path), dataset_options={"image_size": 64})
    dm.prepare_data()
    runs = []
    for _ in range(2):
        L.seed_everything(0)
        model = ResidualModel(
            method="residual", class_names=dm.class_names, shape=dm.shape, backbone=dm.backbone
        )
        t = L.Trainer(
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            deterministic=True,
        )
        t.fit(model, dm)
        runs.append({k: v.clone() for k, v in model.state_dict().items() if k.endswith("_lambdas")})
    assert runs[0].keys() == runs[1].keys() and runs[0]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])

"""The LightningModule on the digits cache: learning, identity, checkpoints, schedule-free modes."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from residual_lightning.adapters import ResidualOptions, ResidualStarOptions
from residual_lightning.backbones.dispatch import model_embedding
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.finetune import FinetuneModel
from residual_lightning.model import METHOD_LRS, ResidualCLIP, ResidualModel

# The options a model resolves residual_star to: its unset threshold_fallback takes model.threshold_fallback.
RESOLVED_STAR = ResidualStarOptions(seed=3, threshold_fallback="all")

# The authors' learning rate of each method (method.md §3), written out here so that a wrong
# `METHOD_LRS` entry fails `test_lr_none_resolves_to_the_methods_rate`.
RECIPE_LRS = {
    "residual": 0.8,
    "residual_star": 0.8,
    "coarse": 0.8,
    "linear": 1e-3,
    "spectral": 1e-3,
}
CHANCE = 0.1  # digits: 10 balanced classes
# `test_every_adapter_beats_zero_shot`: each adapter trains at its own recipe lr (lr=None) with the
# paper's raw logits (`z @ C`, the setting the authors' rates were chosen in) for EPOCHS epochs. The
# tiny backbone has random weights and a random text tower, so zero-shot sits at chance (0.089 on
# this test split): beating it by a small margin would be met by an adapter that barely learned. The
# bar is max(zero-shot, chance) + MARGIN, set below what each method reaches here (seed 0, 6 epochs:
# residual 0.52, residual_star 0.28, coarse 0.16, linear 0.24) and, but for coarse, at least 6
# standard errors of a chance-level accuracy on 359 images (0.016) above chance. coarse only
# reweights 16 heads (MLPs and emb dropped): its bar is 2 standard errors.
# spectral at its recipe lr 1e-3 stays at chance on this backbone (0.103 after 20 epochs; it did
# learn at the lr 0.1 this test used before): a strict xfail, so that the day it learns here the
# test says so and gets a real bar.
EPOCHS = 6
MARGIN = {"residual": 0.3, "residual_star": 0.12, "coarse": 0.03, "linear": 0.1, "spectral": 0.1}
SPECTRAL_AT_CHANCE = pytest.mark.xfail(
    strict=True, reason="spectral at its recipe lr 1e-3 stays at chance on the tiny random backbone"
)


@pytest.fixture(scope="module")
def dm(tmp_path_factory):
    """Digits caches of the tiny random backbone, built once for this module."""
    data = ResidualDataModule(
        dataset="digits", cache_dir=str(tmp_path_factory.mktemp("cache")), dataset_options={"image_size": 64}
    )
    data.prepare_data()
    data.setup("fit")
    return data


def make_model(dm, method="residual", **kw):
    return ResidualModel(
        method=method, class_names=dm.class_names, shape=dm.shape, backbone=dm.backbone, **kw
    )


def trainer(tmp_path, epochs=3, **kw):
    return L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=SPECTRAL_AT_CHANCE) if m == "spectral" else m for m in RECIPE_LRS]
)
def test_every_adapter_beats_zero_shot(dm, tmp_path, method):
    L.seed_everything(0)
    model = make_model(dm, method, logit_mode="raw")  # lr=None: the method's own recipe rate
    assert model.lr == pytest.approx(RECIPE_LRS[method])
    t = trainer(tmp_path, epochs=EPOCHS)
    t.fit(model, dm)
    res = t.test(model, dm, verbose=False)[0]
    bar = max(res["test/zeroshot_accuracy"], CHANCE) + MARGIN[method]
    assert res["test/accuracy"] > bar, res
    assert model.num_learned() > 0


@pytest.mark.parametrize("method", [*RECIPE_LRS, "zeroshot"])
def test_lr_none_resolves_to_the_methods_rate(dm, method):
    """lr=None gives the method's recipe rate: in `model.lr`, the hparams and the optimizer."""
    model = make_model(dm, method)
    expected = RECIPE_LRS.get(method, METHOD_LRS["zeroshot"])
    assert model.lr == pytest.approx(expected)
    assert model.hparams["lr"] == pytest.approx(expected)  # recorded resolved, never None
    model.head_maps.copy_(dm.head_maps)  # what setup does before building the adapter
    model._build_adapter(dm.bases() if model.options.needs_bases else None)
    if method == "zeroshot":
        with pytest.raises(ValueError, match="nothing to train"):
            model.configure_optimizers()
        return
    opt = model.configure_optimizers()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(expected)] * len(opt.param_groups)


def test_explicit_lr_wins_and_reaches_the_optimizer_and_the_checkpoint(dm, tmp_path):
    model = make_model(dm, "linear", lr=0.05)
    assert model.lr == 0.05 and model.hparams["lr"] == 0.05
    default = make_model(dm, "linear")  # lr=None
    t = trainer(tmp_path, epochs=1, limit_train_batches=1, limit_val_batches=1)
    t.fit(default, dm)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)
    path = tmp_path / "linear.ckpt"
    t.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["lr"] == pytest.approx(1e-3)
    assert ResidualModel.load_from_checkpoint(path, weights_only=True).lr == pytest.approx(1e-3)
    assert FinetuneModel.default_lr == 1e-5  # the full-tower baseline's lr=None (the authors')


def live_test_images(dm, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` test images (the backbone's eval transform) and labels, in cache order."""
    test = dm._load_parts(dm.loaded_backbone().transform)["test"]
    images = torch.stack([test[i][0] for i in range(n)])
    labels = torch.tensor([int(test[i][1]) for i in range(n)])
    return images, labels


def live_embedding(dm, images: torch.Tensor) -> torch.Tensor:
    """The backbone's own forward (`encode_image` for open_clip), not the decomposition."""
    with torch.no_grad():
        return model_embedding(dm.loaded_backbone().model.eval(), images).float()


def test_identity_adapter_gives_zero_shot_logits(dm, tmp_path):
    model = make_model(dm, "residual", adapter=ResidualOptions(init="ones", add_mean=True))
    trainer(tmp_path).validate(model, dm, verbose=False)  # runs setup: fills buffers, builds the adapter
    n = 100
    batch = dm.caches["test"].batch(slice(0, n))
    images, labels = live_test_images(dm, n)
    assert torch.equal(batch.label, labels)  # the cache holds the test part in order
    live = live_embedding(dm, images)
    with torch.no_grad():
        adapted = model(batch)
        zero_shot = model.logits_from_embedding(batch.embedding(model.head_maps))
        adapted_emb = model.adapter(batch)
        live_logits = model.logits_from_embedding(live)
    torch.testing.assert_close(adapted, zero_shot, rtol=1e-5, atol=1e-5)
    # Against the live backbone on the images: the decomposition sums to encode_image to float32
    # accuracy (about 1e-3 on embeddings of norm ~3), so the identity adapter gives its logits.
    torch.testing.assert_close(adapted_emb, live, rtol=1e-3, atol=5e-3)
    torch.testing.assert_close(adapted, live_logits, rtol=1e-3, atol=0.1)  # logit scale 100
    assert (adapted.argmax(-1) == live_logits.argmax(-1)).float().mean() >= 0.98


def test_zeroshot_method_matches_zero_shot_metric(dm, tmp_path):
    model = make_model(dm, "zeroshot")
    res = trainer(tmp_path).test(model, dm, verbose=False)[0]
    assert model.num_learned() == 0
    # The reference is the live backbone's encode_image on the test images through the classifier,
    # not the cached path the metric itself uses.
    n = len(dm.caches["test"])
    images, labels = live_test_images(dm, n)
    with torch.no_grad():
        live_logits = model.logits_from_embedding(live_embedding(dm, images))
        cached_logits = model(dm.caches["test"].batch(slice(0, n)))
    live_accuracy = (live_logits.argmax(-1) == labels).float().mean().item()
    assert res["test/accuracy"] == pytest.approx(live_accuracy, abs=1.5 / n)  # one flip at most
    assert res["test/zeroshot_accuracy"] == pytest.approx(live_accuracy, abs=1.5 / n)
    torch.testing.assert_close(cached_logits, live_logits, rtol=1e-3, atol=0.1)


def test_checkpoint_round_trip_and_schedule_free_eval_weights(dm, tmp_path):
    L.seed_everything(0)
    model = make_model(dm, "residual")
    t = trainer(tmp_path, epochs=2)
    t.fit(model, dm)
    opt = t.optimizers[0]
    assert opt.param_groups[0]["train_mode"] is False  # evaluation mode after the last epoch
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    clip = ResidualCLIP.from_checkpoint(str(path))
    assert "_backbone" not in str(list(torch.load(path, weights_only=True)["state_dict"]))
    from residual_lightning.data.registry import load_dataset

    bb = dm.backbone.load()
    data = load_dataset("digits", None, "all", bb.transform, image_size=64)
    images = torch.stack([data[i][0] for i in range(8)])
    probs = clip.predict(images)
    with torch.no_grad():
        from residual_lightning.contributions import Contributions
        from residual_lightning.units import decompose_compact

        c = decompose_compact(bb.model, images)
        ref = model(Contributions(c.heads, c.mlps, c.emb, torch.zeros(8, dtype=torch.long))).softmax(-1)
    torch.testing.assert_close(probs, ref, rtol=1e-4, atol=1e-5)
    assert clip.encode_image(images).shape == (8, dm.shape[3])


def test_checkpoint_of_the_previous_release_loads(dm, tmp_path):
    """Hyperparameters with ``adapter`` a plain dict of overrides and no initial-λ buffers: the
    checkpoint loads (naming the new spelling) and the λs it started from are drawn again."""
    model = make_model(dm, "residual_star", adapter=ResidualStarOptions(seed=3))
    t = trainer(tmp_path)
    t.validate(model, dm, verbose=False)  # builds the adapter
    start = model.adapter.initial_unit_weights()
    with torch.no_grad():
        model.adapter.head_lambdas.add_(0.5)  # as if trained
    path = tmp_path / "new.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["adapter"] == RESOLVED_STAR.to_hparams()
    assert "adapter.head_lambdas_init" in ckpt["state_dict"]
    ckpt["hyper_parameters"]["adapter"] = {"seed": 3}  # what the previous release stored
    ckpt["hyper_parameters"].pop("_class_path", None)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith("_init")}
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.warns(FutureWarning, match="ResidualStarOptions"):
        old = ResidualCLIP.from_checkpoint(str(tmp_path / "old.ckpt")).model
    assert old.options == RESOLVED_STAR
    torch.testing.assert_close(old.adapter.initial_unit_weights(), start, equal_nan=True)
    torch.testing.assert_close(old.adapter.unit_weights(), model.adapter.unit_weights(), equal_nan=True)
    assert ResidualCLIP.from_checkpoint(str(path)).model.options == RESOLVED_STAR


def test_unknown_method_is_refused(dm):
    with pytest.raises(ValueError, match="valid: residual"):
        make_model(dm, "residul")


@pytest.mark.slow
def test_finetune_trains_the_vision_tower_on_images(tmp_path):
    L.seed_everything(0)
    data = ResidualDataModule(
        dataset="digits",
        cache_dir=str(tmp_path / "c"),
        dataset_options={"image_size": 64},
        mode="images",
        batch_size=128,
    )
    model = FinetuneModel(lr=1e-4, class_names=data.class_names, shape=data.shape, backbone=data.backbone)
    t = trainer(tmp_path, epochs=1, gradient_clip_val=1.0)
    t.fit(model, data)
    res = t.test(model, data, verbose=False)[0]
    assert res["test/accuracy"] > res["test/zeroshot_accuracy"] + 0.1, res
    assert model.num_learned() > 1_000_000
    assert not any(k.startswith("_backbone") for k in model.state_dict())


def test_prototype_classifier_for_backbones_without_text(dm, tmp_path):
    L.seed_everything(0)
    model = make_model(dm, "residual", classifier="prototypes")
    t = trainer(tmp_path, epochs=2)
    t.fit(model, dm)
    res = t.test(model, dm, verbose=False)[0]
    norms = model.classifier.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # normalised class means
    assert res["test/zeroshot_accuracy"] > 0.2  # class means of the train embeddings classify digits
    assert res["test/accuracy"] > 0.2

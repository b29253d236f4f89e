"""The cache on the training device (``data.cache_on_device``): the same batches as the memory-mapped
loader (order, values, per-rank shards), the same fitted model, the ``auto`` decision, bad options."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from residual_lightning.data import device_cache
from residual_lightning.data.device_cache import DeviceBatches, DeviceCache, device_loader
from residual_lightning.data.loaders import cache_loader
from residual_lightning.model import ResidualModel
from tests.helpers import digits_module, setup_digits


def assert_same_batches(a, b) -> int:
    """Every batch of two loaders equal, value for value; returns the number of batches."""
    count = 0
    for x, y in zip(a, b, strict=True):
        for name in ("heads", "mlps", "emb", "label"):
            got, want = getattr(x, name), getattr(y, name)
            assert got.dtype == want.dtype and torch.equal(got, want), name
        count += 1
    return count


def test_device_batches_equal_the_loaders_per_epoch_and_rank(digits):
    cache = setup_digits(digits).caches["train"]
    on_device = DeviceCache(cache, "cpu")
    assert on_device.tensors["heads"].dtype == torch.float16  # the cache's own dtype: an exact copy
    for rank in range(3):  # DDP: each rank the shard its sampler gives
        mapped = cache_loader(cache, True, 96, 512, 5, rank, 3, 0, False)
        held = device_loader(on_device, True, 96, 512, 5, rank, 3)
        for epoch in (0, 1):
            mapped.sampler.set_epoch(epoch)
            held.sampler.set_epoch(epoch)  # what Lightning calls on either
            assert len(held) == len(mapped) == assert_same_batches(held, mapped) > 1
    first = [b.label for b in held]
    held.sampler.set_epoch(0)
    assert not all(torch.equal(x, y) for x, y in zip(first, (b.label for b in held), strict=True))


def test_datamodule_uses_the_device_cache_and_evaluation_matches(digits):
    held, mapped = setup_digits(digits, cache_on_device=True), setup_digits(digits, cache_on_device=False)
    assert isinstance(held.train_dataloader(), DeviceBatches)
    assert not isinstance(mapped.train_dataloader(), DeviceBatches)
    for name in ("val_dataloader", "test_dataloader", "train_dataloader"):
        assert assert_same_batches(getattr(held, name)(), getattr(mapped, name)()) >= 1


def fitted_lambdas(cache, on_device, tmp_path) -> tuple[dict, dict]:
    """The adapter's parameters before and after one epoch (seed 0), batches on the device or not."""
    dm = digits_module(cache, cache_on_device=on_device, batch_size=64)
    L.seed_everything(0)
    model = ResidualModel(method="residual", class_names=dm.class_names, shape=dm.shape, backbone=dm.backbone)
    before: dict[str, torch.Tensor] = {}

    class Start(L.Callback):
        def on_train_start(self, trainer, module):
            before.update({k: v.detach().clone() for k, v in module.adapter.state_dict().items()})

    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[Start()],
    )
    trainer.fit(model, dm)
    assert isinstance(trainer.train_dataloader, DeviceBatches) == on_device
    assert isinstance(trainer.val_dataloaders, DeviceBatches) == on_device  # validated on it too
    return before, {k: v.detach().clone() for k, v in model.adapter.state_dict().items()}


def test_one_epoch_on_the_device_fits_the_same_lambdas(digits, tmp_path):
    start, held = fitted_lambdas(digits, True, tmp_path / "held")
    _, mapped = fitted_lambdas(digits, False, tmp_path / "mapped")
    assert held.keys() == mapped.keys() and held
    assert any(not torch.equal(held[k], v) for k, v in start.items())  # it did learn
    for k in held:
        assert torch.equal(held[k], mapped[k]), k


def test_auto_loads_what_fits_and_falls_back_otherwise(digits, monkeypatch, caplog):
    cache = setup_digits(digits).caches["train"]
    need = device_cache.cache_nbytes(cache)
    assert need == sum(a.nbytes for a in cache.arrays.values()) > 0
    monkeypatch.setattr(device_cache, "free_bytes", lambda device: 2 * need)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger=device_cache.__name__):
        assert device_cache.use_device_cache("auto", cache, cpu, 0.5, "train")
        assert not device_cache.use_device_cache("auto", cache, cpu, 0.49, "train")
    assert "read from the memory-mapped cache" in caplog.text
    assert device_cache.use_device_cache(True, cache, cpu, 0.01, "train")
    assert not device_cache.use_device_cache(False, cache, cpu, 1.0, "train")
    dm = setup_digits(digits, device_cache_fraction=0.3)
    assert not isinstance(dm.train_dataloader(), DeviceBatches) and dm.on_device["train"] is None
    monkeypatch.undo()
    assert device_cache.free_bytes(cpu) > 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"cache_on_device": "sometimes"}, "data.cache_on_device must be auto, true or false"),
        ({"device_cache_fraction": 0.0}, r"data.device_cache_fraction must be a number in \(0, 1\]"),
        ({"device_cache_fraction": 1.5}, "got 1.5"),
    ],
)
def test_bad_device_cache_options_are_named(digits, kw, match):
    with pytest.raises(ValueError, match=match):
        digits_module(digits, **kw)

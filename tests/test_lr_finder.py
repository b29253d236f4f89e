"""``model.lr: auto``: the LR finder's suggestion, its reproducibility, and where the rate is recorded."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from cli_helpers import quick_args

from residual_lightning import callbacks
from residual_lightning.cli import main

METHODS = {
    "residual": [],
    "residual_star": [
        "--model.method",
        "residual_star",
        "--model.adapter",
        "residual_lightning.adapters.ResidualStarOptions",
    ],
    "coarse": ["--model.method", "coarse", "--model.adapter", "residual_lightning.adapters.CoarseOptions"],
    "linear": ["--model.method", "linear", "--model.adapter", "residual_lightning.adapters.LinearOptions"],
}


@pytest.fixture
def found(monkeypatch):
    """The `LRFinderResult`s of the runs of a test, in order."""
    results = []
    original = callbacks.find_lr

    def spy(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(callbacks, "find_lr", spy)
    return results


def finder_only(tmp, cache, *extra: str) -> list[str]:
    """`fit` of the quickstart with ``lr: auto`` and no epoch: the finder, then the test of the result."""
    return ["fit", *quick_args(tmp, cache, "--trainer.max_epochs", "0", "--model.lr", "auto", *extra)]


def test_same_seed_same_rate_with_or_without_logger(tmp_path, digits_cache, found):
    main(finder_only(tmp_path / "a", digits_cache))
    main(finder_only(tmp_path / "b", digits_cache, "--trainer.logger", "false"))
    assert found[0].lr == found[1].lr and found[0].losses == found[1].losses


@pytest.mark.parametrize(
    "method, low, high",
    [
        pytest.param("residual", 0.2, 3, marks=pytest.mark.xfail(strict=True, reason="suggests 3.4")),
        ("residual_star", 0.2, 3),
        pytest.param("coarse", 0.2, 3, marks=pytest.mark.xfail(strict=True, reason="suggests 0.1")),
        pytest.param("linear", 1e-4, 1e-2, marks=pytest.mark.xfail(strict=True, reason="flat curve: 0.04")),
    ],
)
def test_suggestion_range(tmp_path, digits_cache, found, method, low, high):
    main(finder_only(tmp_path, digits_cache, "--trainer.logger", "false", *METHODS[method]))
    assert low <= found[0].lr <= high, found[0].lr


def test_rate_is_recorded_and_reused_on_resume(tmp_path, digits_cache, found, monkeypatch, capsys):
    main(["fit", *quick_args(tmp_path, digits_cache, "--trainer.max_epochs", "1", "--model.lr", "auto")])
    out = capsys.readouterr().out
    lr = found[0].lr
    assert sum(line.startswith("LR finder: lr = ") for line in out.splitlines()) == 1, out
    assert f"{lr:.4g} (LR finder)" in out  # the summary's learning rate row
    logdir = next((tmp_path / "runs").glob("quickstart/version_*"))
    assert json.loads((logdir / "lr_finder.json").read_text())["lr"] == lr
    assert yaml.safe_load((logdir / "config.yaml").read_text())["model"]["init_args"]["lr"] == lr
    ckpt = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["lr_found"] == lr and ckpt["hyper_parameters"]["lr"] == "auto"
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == lr

    def no_search(*args, **kwargs):
        raise AssertionError("the LR finder ran again on resume")

    monkeypatch.setattr(callbacks, "find_lr", no_search)
    main(["fit", *quick_args(tmp_path, digits_cache, "--trainer.max_epochs", "2", "--ckpt_path", "last")])
    out = capsys.readouterr().out
    assert f"LR finder: lr = {lr:.4g}, reused from" in out and f"{lr:.4g} (LR finder)" in out
    ckpt = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["lr_found"] == lr and ckpt["epoch"] == 1

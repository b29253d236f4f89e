"""``model.lr: auto``: the LR finder's rule, its suggestion per method, its reproducibility, and where
the rate is recorded. One search per method is shared by the tests of this module (`searches`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from cli_helpers import ROOT, quick_args

from residual_lightning import callbacks
from residual_lightning.cli import main
from residual_lightning.lr_finder import candidate_rates, suggest

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


def spy_on_find_lr(monkeypatch) -> list:
    """Collect the `LRFinderResult` of every `find_lr` call, in order."""
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


#: The second setup: a tiny timm ViT with registers (vision-only: class-mean prototypes) on digits at 32 px.
TIMM = [
    "--config",
    str(ROOT / "configs" / "backbones" / "tiny-timm.yaml"),
    "--data.dataset_options.image_size",
    "32",
]


def run_searches(tmp_path_factory, cache, setup: list[str], logger_too: bool) -> dict:
    """One search per method (logger off), plus, with `logger_too`, residual again with the logger on
    (key ``"residual+logger"``)."""
    monkeypatch = pytest.MonkeyPatch()
    found = spy_on_find_lr(monkeypatch)
    out = {}
    try:
        for method, extra in METHODS.items():
            tmp = tmp_path_factory.mktemp(method)
            main(finder_only(tmp, cache, *setup, "--trainer.logger", "false", *extra))
            out[method] = found[-1]
        if logger_too:
            main(finder_only(tmp_path_factory.mktemp("logger"), cache, *setup))
            out["residual+logger"] = found[-1]
    finally:
        monkeypatch.undo()
    return out


@pytest.fixture(scope="module")
def searches(digits_cache, tmp_path_factory, one_thread):
    """The quickstart's searches (`run_searches`), shared by the tests of this module."""
    return run_searches(tmp_path_factory, digits_cache, [], logger_too=True)


@pytest.fixture(scope="module")
def timm_searches(tmp_path_factory, one_thread):
    """The second setup's searches (its caches built by the first)."""
    return run_searches(tmp_path_factory, tmp_path_factory.mktemp("timm-cache"), TIMM, logger_too=False)


def test_rule_picks_the_lowest_smoothed_validation_loss():
    assert candidate_rates(1e-3, 10.0, 1) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    lrs = candidate_rates(1e-4, 100.0, 1)
    # the raw minimum is a lone dip at 1e-3; the rule takes the middle of the wide basin, 1.0
    lr, index, smoothed = suggest(lrs, [2.0, 1.0, 2.0, 1.1, 1.1, 1.1, 2.0])
    assert (lr, index) == (lrs[4], 4) and lr == pytest.approx(1.0)
    assert smoothed[1] == pytest.approx(5 / 3) and smoothed[4] == pytest.approx(1.1)


def test_rule_edges_divergence_and_errors():
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    # a diverged neighbour disqualifies a candidate: 1e-1 is next to an inf
    lr, index, smoothed = suggest(lrs, [2.0, 1.5, 1.0, math.inf])
    assert (lr, index) == (1e-2, 1) and math.isinf(smoothed[2]) and math.isinf(smoothed[3])
    with pytest.raises(ValueError, match="every candidate rate diverged"):
        suggest(lrs, [math.inf] * 4)
    with pytest.raises(ValueError, match="min_lr < max_lr"):
        candidate_rates(1.0, 0.1)


def test_same_seed_same_rate_with_or_without_logger(searches):
    a, b = searches["residual"], searches["residual+logger"]
    assert a.lr == b.lr and a.losses == b.losses


# residual on these random tiny models: the validation loss after 30 steps keeps falling up to ~46
# (quickstart: 46 then 100 flat; timm: still falling at 100), and the rule follows it. The authors'
# 0.8 is not better there: 2 epochs of the quickstart reach val accuracy 0.742 at 46.4 vs 0.392 at
# 0.8. The issue's [0.2, 3] for residual is kept as a strict xfail, visible, not met by clamping.
RESIDUAL_HIGH = pytest.mark.xfail(strict=True, reason="suggests 46-100: best 30-step val loss there")
RANGES = [
    pytest.param("residual", 0.2, 3, marks=RESIDUAL_HIGH),
    ("residual_star", 0.2, 3),
    ("coarse", 0.2, 3),
    ("linear", 1e-4, 1e-2),
]


@pytest.mark.parametrize("method, low, high", RANGES)
def test_suggestion_range(searches, method, low, high):
    result = searches[method]
    assert result.lr == result.lrs[result.index]  # one of the candidates: never clamped
    assert low <= result.lr <= high, (result.lr, result.losses)


@pytest.mark.parametrize("method, low, high", RANGES)
def test_suggestion_range_on_a_second_setup(timm_searches, method, low, high):
    result = timm_searches[method]
    assert low <= result.lr <= high, (result.lr, result.losses)


def test_rate_is_recorded_and_reused_on_resume(tmp_path, digits_cache, monkeypatch, capsys, one_thread):
    found = spy_on_find_lr(monkeypatch)
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

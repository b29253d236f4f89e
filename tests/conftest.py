"""Shared fixtures: tiny random-weight open_clip models, built offline from configs; digits caches.

Helpers that test files import live in `helpers.py`, `cli_helpers.py` and `data/fakes.py`; test files
never import each other.
"""

from __future__ import annotations

import os

# huggingface_hub reads these when it is imported: set them before open_clip pulls it in, so a
# stray download fails at once instead of retrying against an unreachable hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# The helper modules hold asserts (dataset checks): rewrite them for pytest's detailed messages.
pytest.register_assert_rewrite("tests.helpers", "tests.data.fakes")

from residual_lightning.units import register_model_configs  # noqa: E402

TINY = "RL-Tiny-ViT-64"


@pytest.fixture(autouse=True)
def _offline_in_a_scratch_folder(monkeypatch, tmp_path):
    """Make any stray download fail loudly, and run in a scratch folder so that defaults such as
    ``runs/`` and ``.cache/`` never land in the repository."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise biases, LayerNorm affines and LayerScales, which open_clip initialises to 0/1.

    With identity LayerNorms and zero biases a mistake in folding the constant terms would be
    invisible; every test of exactness runs on a model randomised by this first.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("bias", "in_proj_bias") or name.endswith(("ln_pre.weight", "ln_post.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if leaf == "weight" else 0.0))
            elif leaf == "weight" and p.ndim == 1:  # LayerNorm gammas inside blocks
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif leaf == "gamma":  # LayerScale
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def build_clip(seed: int = 0, embed_dim: int = 48, **vision) -> open_clip.CLIP:
    """A tiny CLIP with the given vision options, randomised and in eval mode."""
    torch.manual_seed(seed)
    cfg = dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16)
    cfg.update(vision)
    text = dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=cfg, text_cfg=text)
    return randomise_(model, seed).eval()


def write_synthetic_cache(path, heads, mlps, emb, labels, head_maps):
    """A float32 ActivationCache on disk holding exactly the given compact tensors."""
    from residual_lightning.contributions import Contributions
    from residual_lightning.data.cache import CacheKey, write_cache

    layers, nheads = heads.shape[1:3]
    names = ["emb", *(f"l{i}.mlp" for i in range(layers))]
    names += [f"l{i}.h{h}" for i in range(layers) for h in range(nheads)]
    key = CacheKey("synthetic", "random", "synthetic", path.name, "all", "none", "default", "float32")
    return write_cache(path, key, Contributions(heads, mlps, emb, head_maps=head_maps, names=names), labels)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """Digits caches and text classifier of the quickstart config, built once per test session
    through the `extract` subcommand. Tests that alter files in it work on a copy."""
    from pathlib import Path

    from residual_lightning.cli import main

    path = tmp_path_factory.mktemp("digits-cache")
    quick = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    main(
        [
            "extract",
            "--config",
            quick,
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(path),  # the saved config.yaml goes here, not into the cwd
            "--data.cache_dir",
            str(path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    return path


@pytest.fixture(scope="module")
def digits(digits_cache):
    """Digits caches, PCA bases and text classifier of the quickstart backbone (built once)."""
    from residual_lightning.data.datamodule import build_caches
    from tests.helpers import digits_module

    dm = digits_module(digits_cache)
    build_caches(dm)  # verifies what the session fixture built
    dm.bases()
    return digits_cache


@pytest.fixture
def tiny_clip():
    """The shipped tiny config, random weights, randomised constants."""
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    return randomise_(model).eval()


def pytest_collection_modifyitems(config, items):
    """Skip gpu tests with a visible reason when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention (100x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""A MAP (attention-pooled) backbone through the whole pipeline: the tiny timm SigLIP-style ViT
(full-form heads, a ``pool.mlp`` pooler unit) extracted, cached, trained, tested, reported,
checkpointed and loaded back; and compact caches left exactly as they were."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from residual_lightning.adapters import build_adapter  # noqa: E402
from residual_lightning.backbones.dispatch import model_embedding  # noqa: E402
from residual_lightning.cli import main  # noqa: E402
from residual_lightning.contributions import Contributions, UnitLayout, shared_maps  # noqa: E402
from residual_lightning.data.cache import ActivationCache, CacheKey, write_cache  # noqa: E402
from residual_lightning.data.datamodule import ResidualDataModule  # noqa: E402
from residual_lightning.data.extract import build_cache  # noqa: E402
from residual_lightning.model import ResidualCLIP, ResidualModel  # noqa: E402
from residual_lightning.spectral import fit_unit_bases  # noqa: E402
from residual_lightning.units import BackboneSpec, decompose_compact  # noqa: E402
from tests.cli_helpers import QUICK, quick_args  # noqa: E402

SIGLIP = BackboneSpec("RL-Tiny-timm-SigLIP", library="timm")
L, H, D, d = 3, 4, 64, 16  # the tiny SigLIP's layers, heads, output size, head width
DATA = ["--data.backbone.library", "timm", "--data.backbone.model_name", SIGLIP.model_name]
DATA += ["--data.dataset_options.image_size", "32"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def cache_folder(fitted: dict, part: str) -> Path:
    return next(p for p in fitted["cache"].glob(f"digits-{part}-RL-Tiny-timm-SigLIP-*") if p.is_dir())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One CLI fit (residual, 2 epochs, report on); its printed summary, run folder and cache."""
    tmp = tmp_path_factory.mktemp("map")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["fit", *quick_args(tmp, tmp / "cache", *DATA, "--trainer.max_epochs", "2")])
    run = next((tmp / "runs").glob("quickstart/version_*"))
    return {"out": out.getvalue(), "run": run, "cache": tmp / "cache", "tmp": tmp}


def test_layout_shape_and_form_round_trip():
    layout = SIGLIP.layout()
    assert layout.shape == (L, H, D, D) and not layout.compact and layout.pooler_units == ("pool.mlp",)
    assert layout.form == {"compact": False, "head_width": d, "pooler_units": ["pool.mlp"]}
    assert UnitLayout.from_shape(layout.shape, "default", layout.form) == UnitLayout(
        L, H, d, D, pooler_units=("pool.mlp",), compact=False
    )
    assert layout.num_units == 1 + L + L * H + 1
    eq = SIGLIP.layout("equal_share")
    assert (
        eq.shape == (L, H, D, D) and UnitLayout.from_shape(eq.shape, "equal_share", eq.form).head_width == d
    )
    compact = BackboneSpec("RL-Tiny-timm-ViT", library="timm").layout()
    assert compact.form is None and UnitLayout.from_shape(compact.shape) == UnitLayout(
        *compact.shape[:2], *compact.shape[2:]
    )


def test_fit_ends_with_a_test_accuracy_a_report_and_a_checkpoint(fitted):
    assert "residual test accuracy" in fitted["out"]
    assert (fitted["run"] / "checkpoints" / "last.ckpt").is_file()
    assert (fitted["run"] / "report" / "report.md").is_file()


def test_cache_stores_the_pooler_unit_and_no_head_maps(fitted):
    folder = cache_folder(fitted, "train")
    files = {p.name for p in folder.iterdir()}
    assert files == {"heads.npy", "mlps.npy", "emb.npy", "labels.npy", "pooler.npy", "meta.json"}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["head_maps"] == "identity" and "head_maps_sha256" not in meta
    assert meta["form"] == SIGLIP.layout().form and meta["names"][-1] == "pool.mlp"
    cache = ActivationCache.open(folder)  # verifies every chunk, the pooler array included
    assert shared_maps(cache.head_maps) and cache.head_maps.untyped_storage().nbytes() == D * D * 4
    assert cache.layout.shape == SIGLIP.layout().shape and cache.layout.form == SIGLIP.layout().form
    batch = cache.batch(np.arange(5))
    assert batch.heads.shape == (5, L, H, D) and batch.extra["pool.mlp"].shape == (5, D)
    assert batch.expand(cache.head_maps).shape == (5, 1 + L + L * H + 1, D)
    # The pooler array is checksummed like the others: altering it is caught.
    pooler = np.load(folder / "pooler.npy", mmap_mode="r+")
    original = pooler[0, 0, 0].copy()
    pooler[0, 0, 0] = original + 1
    pooler.flush()
    try:
        with pytest.raises(Exception, match="checksum"):
            ActivationCache.open(folder)
    finally:
        pooler[0, 0, 0] = original
        pooler.flush()
    ActivationCache.open(folder)


def _test_images(dm: ResidualDataModule, backbone, n: int) -> tuple[torch.Tensor, ActivationCache]:
    job = next(j for j in dm.jobs(backbone) if j.key.part == "test")
    cache = build_cache(backbone.model, job, progress=False)  # the fit's: opened, not rebuilt
    images = torch.stack([job.dataset[i][0] for i in range(n)])
    return images, cache


@pytest.mark.parametrize(("dtype", "tol"), [("float16", 1e-3), ("float32", 1e-5)])
def test_cached_embedding_equals_the_backbone_embedding(fitted, tmp_path, dtype, tol):
    """The fit's float16 cache; a float32 cache of the same images written by `write_cache`."""
    overrides = {
        "backbone.library": "timm",
        "backbone.model_name": SIGLIP.model_name,
        "dataset_options.image_size": "32",
        "cache_dir": str(fitted["cache"]),
    }
    dm = ResidualDataModule.from_config(QUICK, **overrides)
    backbone = SIGLIP.load()
    images, cache = _test_images(dm, backbone, 24)
    if dtype == "float32":
        with torch.no_grad():
            compact = decompose_compact(backbone.model, images)
        compact.label = torch.zeros(24, dtype=torch.long)
        key = CacheKey(SIGLIP.model_name, "w", "digits", "test", "s", "p", "default", dtype="float32")
        cache = write_cache(tmp_path / "c32", key, compact, head_width=d)
        assert cache.meta["form"] == SIGLIP.layout().form
    with torch.no_grad():
        ref = model_embedding(backbone.model, images)
    batch = cache.batch(np.arange(24))
    assert rel_err(batch.embedding(cache.head_maps), ref) <= tol
    # without the pooler unit it is far off: the unit is cached, and needed
    assert rel_err(batch.emb + batch.mlps.sum(1) + batch.heads.sum((1, 2)), ref) > 10 * tol


def test_checkpoint_learns_the_pooler_unit_and_holds_no_identity(fitted):
    path = fitted["run"] / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["unit_form"] == SIGLIP.layout().form
    assert tuple(ckpt["hyper_parameters"]["shape"]) == (L, H, D, D)
    sizes = {k: v.numel() for k, v in ckpt["state_dict"].items()}
    assert not any(k.endswith("head_maps") for k in sizes)
    assert max(sizes.values()) < L * H * D * D
    model = ResidualModel.load_from_checkpoint(path, weights_only=True)
    adapter = model.adapter
    # every unit but emb (kept as is by the preset) has its own learned weights, the pooler's too
    assert adapter.transformed_units() == SIGLIP.layout().names[1:]
    weights = adapter.unit_weights()
    assert weights["pooler"].shape == (1, D) and int((~weights["pooler"].isnan()).sum()) > 0
    learned = {k: int((~w.isnan()).sum()) for k, w in weights.items()}
    assert model.num_learned() == sum(learned.values()) and set(learned) == {"heads", "mlps", "pooler"}
    assert learned["heads"] <= L * H * d  # heads keep the top d components, as compact ones
    assert f"| {model.num_learned():,} |" in fitted["out"] or str(model.num_learned()) in fitted["out"]


def test_checkpoint_round_trip_predicts_on_images(fitted):
    path = fitted["run"] / "checkpoints" / "last.ckpt"
    model = ResidualModel.load_from_checkpoint(path, weights_only=True).eval()
    assert shared_maps(model.head_maps) and "head_maps" not in model.state_dict()
    model.to(torch.float64).float()  # moving keeps the identity a view
    assert shared_maps(model.head_maps) and shared_maps(
        model.adapter.head_maps if hasattr(model.adapter, "head_maps") else model.head_maps
    )
    folder = cache_folder(fitted, "test")
    cache = ActivationCache.open(folder, verify=False)
    dm = ResidualDataModule.from_config(
        QUICK,
        **{
            "backbone.library": "timm",
            "backbone.model_name": SIGLIP.model_name,
            "dataset_options.image_size": "32",
            "cache_dir": str(fitted["cache"]),
        },
    )
    job = next(j for j in dm.jobs(SIGLIP.load()) if j.key.part == "test")
    images = torch.stack([job.dataset[i][0] for i in range(16)])
    clip = ResidualCLIP.from_checkpoint(str(path))
    probs = clip.predict(images)
    assert probs.shape == (16, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(16))
    with torch.no_grad():
        cached = model(cache.batch(np.arange(16))).softmax(-1)
    torch.testing.assert_close(probs, cached, atol=2e-3, rtol=0)


@pytest.mark.parametrize("method", ["linear", "coarse", "zeroshot", "spectral", "residual_star"])
def test_other_methods_on_the_map_cache(fitted, method):
    folder = cache_folder(fitted, "train")
    cache = ActivationCache.open(folder, verify=False)
    batch = cache.batch(np.arange(64))
    bases = fit_unit_bases(cache.iter_batches(512), cache.head_maps, layout=cache.layout)
    assert bases.pooler.mean.shape == (1, D) and bases.heads.components.shape == (L, H, d, D)
    adapter = build_adapter(method, bases, cache.head_maps)
    out = adapter(batch)
    assert out.shape == (64, D) and torch.isfinite(out).all()
    assert all(v.numel() < L * H * D * D for v in adapter.state_dict().values())
    if method == "zeroshot":
        torch.testing.assert_close(out, batch.embedding(cache.head_maps))
    out.sum().backward() if method != "zeroshot" else None


def test_coarse_fits_through_the_cli(fitted):
    tmp = fitted["tmp"] / "coarse"
    out = io.StringIO()
    args = quick_args(tmp, fitted["cache"], *DATA, "--trainer.max_epochs", "1", "--report", "false")
    with contextlib.redirect_stdout(out):
        main(["fit", *args, "--model.method", "coarse", "--model.adapter", "null"])
    assert "coarse test accuracy" in out.getvalue()


def test_a_compact_cache_is_unchanged(tmp_path):
    """No pooler array, no form, the head maps file and the checksums of the four arrays only."""
    g = torch.Generator().manual_seed(0)
    n = 10
    compact = Contributions(
        heads=torch.randn(n, 2, 2, 4, generator=g),
        mlps=torch.randn(n, 2, 8, generator=g),
        emb=torch.randn(n, 8, generator=g),
        label=torch.arange(n) % 3,
        head_maps=torch.randn(2, 2, 8, 4, generator=g),
        names=UnitLayout(2, 2, 4, 8).names,
    )
    key = CacheKey("m", "w", "d", "train", "s", "p", "default")
    cache = write_cache(tmp_path / "c", key, compact, chunk_size=4)
    files = {p.name for p in (tmp_path / "c").iterdir()}
    assert files == {"heads.npy", "mlps.npy", "emb.npy", "labels.npy", "head_maps.safetensors", "meta.json"}
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert "form" not in meta and "head_maps" not in meta and "head_maps_sha256" in meta
    for chunk, expected in enumerate(meta["checksums"]):
        h = hashlib.sha256()
        for name in ("heads", "mlps", "emb", "labels"):
            h.update(
                np.ascontiguousarray(
                    np.load(tmp_path / "c" / f"{name}.npy")[chunk * 4 : chunk * 4 + 4]
                ).tobytes()
            )
        assert h.hexdigest() == expected
    assert cache.layout.form is None and not shared_maps(cache.head_maps)
    assert cache.batch(np.arange(3)).names == [] and cache.batch(np.arange(3)).extra == {}
    # A compact model keeps its head maps as a stored buffer, as before.
    model = ResidualModel(class_names=["a", "b", "c"], shape=(2, 2, 4, 8), method="zeroshot")
    assert "head_maps" in model.state_dict() and model.hparams.unit_form is None


def test_a_written_full_form_cache_round_trips(tmp_path):
    """`write_cache` of full-form contributions with a pooler unit, and a stale pooler-less one refused."""
    canonical_names = UnitLayout(2, 2, 4, 8, pooler_units=("pool.mlp",), compact=False).names
    g = torch.Generator().manual_seed(1)
    n = 6
    full = Contributions(
        heads=torch.randn(n, 2, 2, 8, generator=g),
        mlps=torch.randn(n, 2, 8, generator=g),
        emb=torch.randn(n, 8, generator=g),
        label=torch.arange(n) % 2,
        head_maps=torch.eye(8).expand(2, 2, 8, 8),
        names=canonical_names,
        extra={"pool.mlp": torch.randn(n, 8, generator=g)},
    )
    key = CacheKey("m", "w", "d", "train", "s", "p", "default", dtype="float32")
    cache = write_cache(tmp_path / "c", key, full, head_width=4)
    assert cache.layout == UnitLayout(2, 2, 4, 8, pooler_units=("pool.mlp",), compact=False)
    torch.testing.assert_close(cache.batch(np.arange(n)).embedding(cache.head_maps), full.embedding())
    meta_file = tmp_path / "c" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["form"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="pooler units"):
        ActivationCache.open(tmp_path / "c")

"""Helpers shared by test files in several folders (fixtures live in conftest.py).

`make_job` is also imported by child processes some tests start (``from tests.helpers import
make_job``, run from the repository root), so it must stay importable without pytest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from residual_lightning.data.cache import CacheKey
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.data.extract import ExtractionJob
from residual_lightning.data.registry import load_dataset
from residual_lightning.units import BackboneSpec, load_backbone


def make_job(root: str, n: int = 100, dtype: str = "float16"):
    """The tiny backbone and an extraction job over the first n digits images."""
    torch.manual_seed(0)
    bb = load_backbone("RL-Tiny-ViT-64")
    data = load_dataset("digits", None, "all", bb.transform, image_size=64)
    subset = torch.utils.data.Subset(data, range(n))
    key = CacheKey("RL-Tiny-ViT-64", "random", "digits", "test", f"first{n}", "eval", "default", dtype)
    return bb.model, ExtractionJob(subset, key, Path(root) / key.folder_name())


def arrays_bytes(path: Path) -> dict[str, bytes]:
    return {name: (path / f"{name}.npy").read_bytes() for name in ("heads", "mlps", "emb", "labels")}


# ---------------------------------------------------------------------------------------------
# the digits data module of the quickstart backbone, and its derived files


def digits_module(cache: Path, **kw) -> ResidualDataModule:
    spec = BackboneSpec("RL-Tiny-ViT-64")
    return ResidualDataModule(spec, "digits", dataset_options={"image_size": 64}, cache_dir=str(cache), **kw)


def tamper(path: Path) -> None:
    """Change one value of a safetensors file but keep its metadata (and so its recorded checksum)."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, str(path), metadata=meta)


def derived_files(dm: ResidualDataModule) -> tuple[Path, Path]:
    """The PCA-bases and text-classifier files of a data module."""
    from residual_lightning.classifier import classifier_path

    return dm.bases_path(), classifier_path(dm.cache_dir, dm.backbone, dm.class_names, dm.templates)


def setup_digits(cache: Path, **kw) -> ResidualDataModule:
    """`digits_module` of `cache`, set up for fit (its caches opened and verified)."""
    dm = digits_module(cache, **kw)
    dm.setup("fit")
    return dm

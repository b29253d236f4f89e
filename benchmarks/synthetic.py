"""Synthetic caches in a real backbone's layout (random contributions), for speed benchmarks.

Extracting 50,000 real images would take hours on 2 CPU cores; reading, iterating and training do
not depend on the values, so a cache written by the real `CacheWriter` from random data measures
them faithfully.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from residual_lightning.contributions import Contributions
from residual_lightning.data.cache import ActivationCache, CacheKey, CacheWriter
from residual_lightning.units import layout_from_config


def synthetic_cache(
    root: str | Path, n: int = 50_000, model: str = "ViT-B-16", chunk: int = 4096
) -> ActivationCache:
    """Write (once) and open a float16 cache of `n` random samples in `model`'s layout."""
    layers, heads, k, dim = layout_from_config(model).shape
    key = CacheKey(model, "synthetic", "synthetic", "train", f"n{n}", "none", "default")
    path = Path(root) / key.folder_name()
    if (path / "meta.json").exists():
        cache = ActivationCache.open(path, key, verify=False)
        if cache.meta.get("complete"):
            return cache
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(layers, heads, dim, k, generator=g) / k**0.5
    writer = CacheWriter(path, key, n, (layers, heads, k, dim), [], maps, chunk_size=chunk, extra_meta={})
    for c in writer.pending_chunks():
        start, stop = writer.chunk_range(c)
        m = stop - start
        compact = Contributions(
            heads=torch.randn(m, layers, heads, k, generator=g),
            mlps=torch.randn(m, layers, dim, generator=g),
            emb=torch.randn(m, dim, generator=g),
            head_maps=maps,
            names=[],
        )
        writer.write(np.arange(start, stop), compact, torch.randint(0, 100, (m,), generator=g))
        writer.commit_chunk(c)
    writer.finalize()
    return ActivationCache.open(path, key, verify=False)

"""Benchmark training on the cache against the authors' design (a live backbone forward per step).

    python benchmarks/train.py [--threads 2] [--n 50000] [--steps 150]

Adapters train on batches of 64 from a 50,000-sample cache in the ViT-B-16 layout (written by the
real cache writer from random data; see synthetic.py). Throughput is measured over `--steps`
optimiser steps after a warm-up and projected to one epoch. The authors run the traced backbone
at every step: its cost per sample is measured here as `decompose` time on ViT-B-16 (random
weights, batch 16), which is what a cache-free epoch would pay on this machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import schedulefree
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import synthetic_cache  # noqa: E402

from residual_lightning.adapters import build_adapter  # noqa: E402
from residual_lightning.data.datamodule import CacheBatches, EpochBatchSampler  # noqa: E402
from residual_lightning.spectral import fit_unit_bases  # noqa: E402
from residual_lightning.units import decompose, load_backbone  # noqa: E402


def samples_per_second(
    method: str, cache, bases, steps: int, batch: int = 64, classes: int = 100
) -> tuple[float, int]:
    """Training throughput (samples/s) of one adapter and its learned-parameter count."""
    torch.manual_seed(0)
    adapter = build_adapter(method, bases, cache.head_maps)
    text = F.normalize(torch.randn(classes, cache.head_maps.shape[2]), dim=-1)
    opt = schedulefree.AdamWScheduleFree(adapter.parameters(), lr=0.1, weight_decay=0.0)
    opt.train()
    sampler = EpochBatchSampler(len(cache), batch, True, seed=0)
    loader = torch.utils.data.DataLoader(
        CacheBatches(cache), sampler=sampler, batch_size=None, collate_fn=lambda x: x
    )
    it = iter(loader)
    t = None
    for step in range(steps + 10):
        if step == 10:
            t = time.perf_counter()  # after warm-up
        b = next(it).float()
        logits = 100 * F.normalize(adapter(b), dim=-1) @ text.T
        loss = F.cross_entropy(logits, b.label % classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t), adapter.num_learned()


def main() -> None:
    """Print a markdown table: per-method throughput, epoch time, and the ratio to a live backbone."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "rl-bench"))
    p.add_argument("--methods", nargs="+", default=["residual", "residual_star", "coarse", "linear"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = synthetic_cache(args.root, args.n)
    bases = fit_unit_bases(
        cache.iter_batches(2048) if args.n <= 10_000 else _first(cache, 8192), cache.head_maps
    )

    bb = load_backbone("ViT-B-16")
    x = torch.randn(16, 3, 224, 224)
    with torch.inference_mode():
        decompose(bb.model, x[:2])
        t = time.perf_counter()
        decompose(bb.model, x)
        live = (time.perf_counter() - t) / len(x)  # seconds per sample
    print(f"{args.threads} CPU threads; live backbone (decompose, ViT-B-16): {live * 1000:.0f} ms/sample\n")
    print(
        "| method | learned params | samples/s on cache | epoch on cache (s) | epoch with live backbone (s) | ratio | target |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        sps, learned = samples_per_second(method, cache, bases, args.steps)
        epoch = args.n / sps
        print(
            f"| {method} | {learned:,} | {sps:,.0f} | {epoch:.1f} | {args.n * live:,.0f} | {args.n * live / epoch:,.0f}x "
            f"| >= 100x: {'met' if args.n * live / epoch >= 100 else 'MISSED'} |"
        )


def _first(cache, n: int):
    """Batches over the first n samples (PCA on a subset keeps the benchmark short)."""
    for start in range(0, n, 2048):
        yield cache.batch(slice(start, min(start + 2048, n)))


if __name__ == "__main__":
    main()

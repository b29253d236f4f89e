"""Benchmark the activation cache: extraction vs encode_image, bytes per image, epoch iteration.

    python benchmarks/cache.py [--threads 2] [--n 50000] [--root /tmp/rl-bench]

1. Extraction: `build_cache` (decompose + float16 writes + checksums) against plain
   `encode_image` over the same batches of ViT-B-16 inputs (random weights), interleaved.
2. Size: bytes per image of a ViT-B-16 cache (float16), against the full (U, D) form.
3. Iteration: one epoch over a 50,000-sample cache in the ViT-B-16 layout (written by the real
   cache writer from random data) through the DataModule's loader, with peak RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import synthetic_cache  # noqa: E402

from residual_lightning.data.cache import CacheKey  # noqa: E402
from residual_lightning.data.datamodule import CacheBatches, EpochBatchSampler  # noqa: E402
from residual_lightning.data.extract import ExtractionJob, build_cache  # noqa: E402
from residual_lightning.units import layout_from_config, load_backbone  # noqa: E402


def extraction(n_images: int, batch: int, repeats: int) -> tuple[float, float, float]:
    """Median seconds of encode_image and of build_cache over `n_images`, and their ratio."""
    bb = load_backbone("ViT-B-16")
    size = bb.model.visual.image_size[0]
    data = torch.utils.data.TensorDataset(
        torch.randn(n_images, 3, size, size), torch.zeros(n_images, dtype=torch.long)
    )
    enc, ext, ratios = [], [], []
    with torch.inference_mode():
        bb.model.encode_image(data.tensors[0][:2])
    for r in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n_images, batch):
                bb.model.encode_image(data.tensors[0][s : s + batch])
        enc.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:
            key = CacheKey("ViT-B-16", "random", "bench", "train", f"r{r}", "eval", "default")
            job = ExtractionJob(data, key, Path(tmp) / key.folder_name())
            t = time.perf_counter()
            build_cache(bb.model, job, batch_size=batch, chunk_size=batch * 2, progress=False)
            ext.append(time.perf_counter() - t)
        ratios.append(ext[-1] / enc[-1])
    return statistics.median(enc), statistics.median(ext), statistics.median(ratios)


def _rss_anon_mb() -> float:
    """Private (anonymous) resident memory: what the process holds beyond mapped file pages."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def iteration(root: str, n: int, batch: int) -> tuple[float, float, float]:
    """Seconds for one shuffled epoch of batches; anonymous RSS before and at its peak (MB).

    Memory-mapped cache pages that the kernel keeps resident are file-backed and reclaimable; they
    show in plain RSS but not in RssAnon, which is what loading would grow if it copied the cache.
    """
    cache = synthetic_cache(root, n)
    sampler = EpochBatchSampler(len(cache), batch, True, seed=0)
    loader = torch.utils.data.DataLoader(
        CacheBatches(cache), sampler=sampler, batch_size=None, collate_fn=lambda x: x
    )
    before = peak = _rss_anon_mb()
    t = time.perf_counter()
    for i, b in enumerate(loader):
        b.float()
        if i % 50 == 0:
            peak = max(peak, _rss_anon_mb())
    return time.perf_counter() - t, before, max(peak, _rss_anon_mb())


def device_iteration(root: str, n: int, batch: int, device: str) -> tuple[float, float]:
    """Seconds to load the cache onto `device` (`data.cache_on_device`), and for one shuffled epoch
    of batches drawn there (float32, as the loader gives them)."""
    from residual_lightning.data.device_cache import DeviceCache, device_loader

    cache = synthetic_cache(root, n)
    t = time.perf_counter()
    held = DeviceCache(cache, device)
    load = time.perf_counter() - t
    t = time.perf_counter()
    for b in device_loader(held, True, batch, batch, 0, 0, 1):
        b.heads.sum()  # touch the batch
    if held.device.type == "cuda":
        torch.cuda.synchronize()
    return load, time.perf_counter() - t


def main() -> None:
    """Print the three measurements as markdown tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "rl-bench"))
    p.add_argument("--skip_extraction", action="store_true", help="only the size and iteration parts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    layers, heads, k, dim = layout_from_config("ViT-B-16").shape
    compact = 2 * (layers * heads * k + layers * dim + dim) + 8
    full = 2 * (1 + layers + layers * heads) * dim
    print("## Cache size per image, ViT-B-16, float16\n\n| form | bytes/image | target |\n|---|---|---|")
    met = "met" if compact <= 40_000 else "MISSED"
    print(
        f"| compact (this cache) | {compact:,} ({compact / 1024:.1f} KiB) | <= 40 KB: {met} |\n"
        f"| full (U, D) | {full:,} ({full / 1024:.1f} KiB) | - |\n"
    )

    if not args.skip_extraction:
        enc, ext, ratio = extraction(args.images, args.batch, args.repeats)
        print(f"## Extraction, ViT-B-16, {args.images} images, batch {args.batch}, {args.threads} threads\n")
        print(
            "| encode_image s | build_cache s | ratio | target | build_cache images/s |\n|---|---|---|---|---|"
        )
        met = "met" if ratio <= 1.15 else "MISSED"
        print(f"| {enc:.2f} | {ext:.2f} | {ratio:.2f} | <= 1.15: {met} | {args.images / ext:.1f} |\n")

    secs, before, peak = iteration(args.root, args.n, 64)
    print(f"## One epoch over {args.n:,} cached samples (ViT-B-16 layout, batch 64)\n")
    print("| seconds | samples/s | anonymous RSS before / peak MB | cache on disk MB |\n|---|---|---|---|")
    print(
        f"| {secs:.1f} | {args.n / secs:,.0f} | {before:.0f} / {peak:.0f} | {args.n * compact / 2**20:,.0f} |"
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load, held = device_iteration(args.root, args.n, 64, device)
    print(f"\n## The same epoch with the cache on the device ({device}; data.cache_on_device)\n")
    print("| load s | epoch s | samples/s | speed-up over the memory-mapped loader |\n|---|---|---|---|")
    print(f"| {load:.1f} | {held:.2f} | {args.n / held:,.0f} | {secs / held:.1f}x |")


if __name__ == "__main__":
    main()

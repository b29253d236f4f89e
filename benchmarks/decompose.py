"""Benchmark: `decompose` against plain `encode_image` (time ratio and extra peak memory).

Each (model, function) pair runs in a fresh subprocess so that peak RSS is measured cleanly:
the extra memory is the peak resident set size during one call (sampled every millisecond from
/proc/self/statm) minus the RSS just before it. Times are
measured in one process, the two functions interleaved, and the ratio is the median of per-pair
ratios, so that load from other processes hits both alike. Random weights (nothing is downloaded). Usage:

    python benchmarks/decompose.py [--models ViT-B-32 ViT-B-16] [--batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _child(model_name: str, fn: str, batch: int, threads: int, repeats: int) -> dict:
    """Peak memory of one function in a fresh process (fn: encode_image or decompose)."""
    import open_clip
    import torch

    from residual_lightning.units import decompose

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None).eval()
    size = model.visual.image_size[0]
    x = torch.randn(batch, 3, size, size)
    with _PeakRSS() as peak, torch.inference_mode():
        model.encode_image(x) if fn == "encode_image" else decompose(model, x)
    return {"extra_mb": peak.extra / 2**20}


class _PeakRSS:
    """Samples the resident set size every millisecond; `extra` = peak minus the RSS at entry."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.extra = self.peak - self.start


def _timing(model_name: str, batch: int, threads: int, repeats: int) -> dict:
    """Median times of both functions, interleaved in one process so load changes hit both alike."""
    import open_clip
    import torch

    from residual_lightning.units import decompose

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None).eval()
    size = model.visual.image_size[0]
    x = torch.randn(batch, 3, size, size)
    calls = {"encode_image": lambda: model.encode_image(x), "decompose": lambda: decompose(model, x)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    ratios = []
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up
        for _ in range(repeats):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
            ratios.append(times["decompose"][-1] / times["encode_image"][-1])
    out = {k: statistics.median(v) for k, v in times.items()}
    out["ratio"] = statistics.median(ratios)
    return out


def main() -> None:
    """Run every model in subprocesses and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "FN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.batch, args.threads, args.repeats)))
        return

    def run(model: str, fn: str) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            model,
            fn,
            "--batch",
            str(args.batch),
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    print(
        f"batch {args.batch}, {args.threads} CPU threads, random weights, median of {args.repeats} interleaved pairs\n"
    )
    print(
        "| model | encode_image s | decompose s | ratio | encode_image extra MB | decompose extra MB | extra over encode_image MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        t = _timing(model, args.batch, args.threads, args.repeats)
        enc, dec = run(model, "encode_image"), run(model, "decompose")
        print(
            f"| {model} | {t['encode_image']:.3f} | {t['decompose']:.3f} | {t['ratio']:.2f} "
            f"| {enc['extra_mb']:.0f} | {dec['extra_mb']:.0f} | {dec['extra_mb'] - enc['extra_mb']:+.0f} |"
        )


if __name__ == "__main__":
    main()

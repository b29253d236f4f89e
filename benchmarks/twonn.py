"""Time `residual_lightning.analysis.twonn` against scikit-dimension's TwoNN.

A sweep of N x D float32 data sets, one per rank (default 2, 6, 64 and 512 = D): a rank-r Gaussian
embedded in D dimensions by a random orthonormal map (like a CLIP head, rank <= 64 in 512 dims), and
at r = D a full-rank standard Gaussian, so that a regression at any rank shows in one run.
Both estimators see the same array, with the same thread budget for torch and for the BLAS/OpenMP
pools sklearn uses. Prints a markdown table: median wall time of the repeats, speed-up beside its
target, both estimates, their relative difference and the peak extra resident memory of each call.

    python benchmarks/twonn.py                      # 20,000 x 512, ranks 2,6,64,512, 2 threads, 3 repeats
    python benchmarks/twonn.py --n 5000 --repeats 1 # quick look

Targets: >= 2x faster on full-rank data, >= 5x on low-rank data (rank <= 64), estimates within 2%.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from residual_lightning.analysis import twonn

LOW_RANK_TARGET = 5.0  # speed-up over skdim wanted on low-rank data (a CLIP head: rank <= 64)
FULL_RANK_TARGET = 2.0  # and on full-rank data


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory above the current level while fn runs, in MiB.

    On Linux the high-water mark is reset first (/proc/self/clear_refs, "5"), so the number is
    exact for this call; elsewhere it falls back to the ru_maxrss delta, a lower bound once an
    earlier call has raised the process peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS")
        fn()
        return (_rss_kib("VmHWM") - before) / 1024
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def interleaved_medians(fns: list[Callable[[], float]], repeats: int) -> list[tuple[float, float]]:
    """Median wall time and last estimate of each fn, runs interleaved (a, b, a, b, ...) so that
    load from other processes on a shared machine hits both sides alike."""
    times: list[list[float]] = [[] for _ in fns]
    values = [float("nan")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            values[k] = fn()
            times[k].append(time.perf_counter() - start)
    return [(statistics.median(t), v) for t, v in zip(times, values)]


def make_data(n: int, dim: int, rank: int | None, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, dim, generator=g).numpy()  # (N, D)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))[0]  # (D, r)
    z = torch.randn(n, rank, generator=g, dtype=torch.float64)  # (N, r)
    return (z @ basis.T).float().numpy()  # (N, D), rank r up to float32 rounding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="number of points N")
    parser.add_argument("--dim", type=int, default=512, help="ambient dimension D")
    parser.add_argument(
        "--ranks",
        default="2,6,64,512",
        help="comma-separated ranks of the data sets (a rank >= D: full rank)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per estimator and data set")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch, BLAS and OpenMP")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per distance chunk (ours)")
    parser.add_argument("--device", default="cpu", help="device for ours (cpu or cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-skdim", action="store_true", help="time ours only")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    import skdim

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"{args.threads} threads, torch {torch.__version__}, device {args.device}, "
        f"N={args.n}, D={args.dim}, median of {args.repeats}; load average at the start: {os.getloadavg()}\n"
    )
    header = (
        "| data | ours (s) | skdim (s) | speed-up | target | met | ours ID | skdim ID | rel. diff "
        "| ours peak extra (MiB) | skdim peak extra (MiB) |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in (int(v) for v in args.ranks.split(",")):
        rank = None if r >= args.dim else r
        label = f"rank {r}" if rank else f"full rank ({args.dim})"
        target = FULL_RANK_TARGET if rank is None else LOW_RANK_TARGET
        x = make_data(args.n, args.dim, rank, args.seed)
        xt = torch.from_numpy(x).to(args.device)

        def ours(xt: torch.Tensor = xt) -> float:
            value = twonn(xt, chunk_size=args.chunk_size)
            if xt.is_cuda:
                torch.cuda.synchronize()
            return value

        def theirs(x: np.ndarray = x) -> float:
            return float(skdim.id.TwoNN().fit(x).dimension_)

        ours()  # warm-up: thread pools, allocator, LAPACK workspaces
        fns = [ours] if args.skip_skdim else [ours, theirs]
        (t_ours, id_ours), *rest = interleaved_medians(fns, args.repeats)
        mem_ours = peak_extra_mib(ours)
        if args.skip_skdim:
            print(
                f"| {label} | {t_ours:.2f} | - | - | >= {target:g}x | - | {id_ours:.3f} | - | - | {mem_ours:.0f} | - |"
            )
            continue
        t_theirs, id_theirs = rest[0]
        mem_theirs = peak_extra_mib(theirs)
        speedup, close = t_theirs / t_ours, abs(id_ours / id_theirs - 1) <= 0.02
        met = "yes" if speedup >= target and close else "NO"
        print(
            f"| {label} | {t_ours:.2f} | {t_theirs:.2f} | {speedup:.1f}x | >= {target:g}x | {met} | {id_ours:.3f} "
            f"| {id_theirs:.3f} | {abs(id_ours / id_theirs - 1):.1e} | {mem_ours:.0f} | {mem_theirs:.0f} |"
        )
    print(f"\nload average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

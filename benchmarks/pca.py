"""Time `residual_lightning.spectral.fit_unit_bases` against scikit-learn's PCA fitted per unit.

A synthetic cache with a ViT-B/16 layout (L=12, H=12, d=64, D=512 by default): float32 compact
head coordinates y with decreasing scales, random head maps, full-rank MLP and emb contributions.
Ours streams the compact cache in batches (float64 moments, one eigendecomposition per unit, heads
in k x k). scikit-learn fits `PCA(svd_solver="full")` on every unit's expanded (N, D) float32
contributions; the expansion of the heads (A @ y) is timed separately and not counted in its fit
time. Both use the same thread budget (torch, BLAS and OpenMP pools). Prints a markdown table and
the largest relative difference of the explained variances over the units compared.

    python benchmarks/pca.py                          # N = 5,000, ViT-B/16 layout, 2 threads
    python benchmarks/pca.py --sklearn-units 20       # sklearn on 20 units, its total extrapolated
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from residual_lightning.spectral import fit_unit_bases


def make_cache(n: int, layers: int, heads: int, d: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Synthetic float32 cache: y (N, L, H, d), mlps (N, L, D), emb (N, D), head_maps (L, H, D, d)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, d)  # a decaying spectrum per head
    y = torch.randn(n, layers, heads, d, generator=g) * scale + 0.1  # (N, L, H, d)
    maps = torch.randn(layers, heads, dim, d, generator=g) / d**0.5  # (L, H, D, d)
    mix = torch.randn(layers, dim, dim, generator=g) / dim**0.5
    mlps = torch.einsum("nlj,ljd->nld", torch.randn(n, layers, dim, generator=g), mix)  # (N, L, D)
    emb = torch.randn(n, dim, generator=g) * 0.05 + 1.0  # (N, D)
    return y, mlps, emb, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="number of samples N")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-width", type=int, default=64, help="d")
    parser.add_argument("--dim", type=int, default=512, help="D")
    parser.add_argument("--batch", type=int, default=1000, help="samples per streamed batch (ours)")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch, BLAS and OpenMP")
    parser.add_argument("--device", default="cpu", help="device for ours (cpu or cuda)")
    parser.add_argument(
        "--sklearn-units", type=int, default=None, help="fit sklearn on this many units and extrapolate"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    layers, heads, d, dim = args.layers, args.heads, args.head_width, args.dim
    y, mlps, emb, maps = make_cache(args.n, layers, heads, d, dim, args.seed)
    units = 1 + layers + layers * heads
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, load average "
        f"{os.getloadavg()[0]:.1f}, {args.threads} threads, torch {torch.__version__}, device {args.device}; "
        f"N={args.n}, L={layers}, H={heads}, d={d}, D={dim}: {units} units, float32\n"
    )

    def ours(fit_output: bool) -> tuple[float, object]:
        dev = torch.device(args.device)
        batches = [
            (y[i : i + args.batch].to(dev), mlps[i : i + args.batch].to(dev), emb[i : i + args.batch].to(dev))
            for i in range(0, args.n, args.batch)
        ]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        bases = fit_unit_bases(batches, maps.to(dev), fit_output=fit_output)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, bases.to("cpu")

    ours(False)  # warm-up
    t_ours, bases = ours(False)
    t_ours_out, _ = ours(True)

    # sklearn, unit by unit, in the authors' order (emb, MLPs, heads); heads expanded first.
    order = [("emb", None)] + [("mlp", layer) for layer in range(layers)]
    order += [("head", (layer, h)) for layer in range(layers) for h in range(heads)]
    if args.sklearn_units is not None:
        step = max(1, len(order) // args.sklearn_units)
        order = order[::step][: args.sklearn_units]
    t_fit = t_expand = 0.0
    worst = 0.0
    for kind, idx in order:
        start = time.perf_counter()
        if kind == "emb":
            x, ours_ev = emb, bases.emb.explained_variance
        elif kind == "mlp":
            x, ours_ev = mlps[:, idx], bases.mlps.explained_variance[idx]
        else:
            x = y[:, idx[0], idx[1]] @ maps[idx].T  # (N, D)
            ours_ev = bases.heads.explained_variance[idx]
        x = np.ascontiguousarray(x.numpy())
        t_expand += time.perf_counter() - start
        start = time.perf_counter()
        ref = PCA(svd_solver="full").fit(x)
        t_fit += time.perf_counter() - start
        k = int((ours_ev > 0).sum())
        ev_ref = ref.explained_variance_[:k]
        worst = max(worst, float(np.max(np.abs(ours_ev[:k].numpy() - ev_ref) / ev_ref.max())))
    scale = units / len(order)
    note = "" if scale == 1 else f" (extrapolated from {len(order)} units)"
    t_sk, t_exp = t_fit * scale, t_expand * scale
    print("| what | ours (s) | sklearn (s) | sklearn / ours |")
    print("|---|---|---|---|")
    print(f"| {units} unit PCAs{note} | {t_ours:.2f} | {t_sk:.2f} | {t_sk / t_ours:.1f}x |")
    print(
        f"| same, sklearn's head expansion counted | {t_ours:.2f} | {t_sk + t_exp:.2f} "
        f"| {(t_sk + t_exp) / t_ours:.1f}x |"
    )
    print(
        f"| ours also fitting the final embedding's PCA | {t_ours_out:.2f} | {t_sk:.2f} | {t_sk / t_ours_out:.1f}x |"
    )
    print(
        f"\nlargest |explained variance difference| / largest variance, over the units compared: {worst:.1e}"
    )


if __name__ == "__main__":
    main()

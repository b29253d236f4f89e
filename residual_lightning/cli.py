"""The `residual-lightning` console script.

Subcommands: ``demo`` (offline check of the exact decomposition on a random-weight tiny ViT and
the bundled digits images). The training subcommands arrive with the training CLI.
"""

from __future__ import annotations

import sys
import time


def decomposition_demo(model_name: str = "RL-Tiny-ViT-64", n: int = 64) -> list[dict]:
    """Decompose `n` digits images with a random-weight model and report exactness and timing.

    Args:
        model_name: an open_clip architecture or a shipped tiny config.
        n: number of images.

    Returns:
        One row per convention: relative error of the unit sum, units, and the time ratio
        against `encode_image`.
    """
    import torch

    from residual_lightning.data.registry import load_dataset
    from residual_lightning.units import decompose, load_backbone, unit_layout

    bb = load_backbone(model_name)
    data = load_dataset("digits", root=None, split="all", transform=bb.transform, image_size=64)
    images = torch.stack([data[i][0] for i in range(n)])
    rows = []
    with torch.inference_mode():
        bb.model.encode_image(images[:2])  # warm-up, so the first timed call is not penalised
        t = time.perf_counter()
        ref = bb.model.encode_image(images)
        t_enc = time.perf_counter() - t
        for convention in ("default", "equal_share"):
            t = time.perf_counter()
            out = decompose(bb.model, images, convention=convention)
            t_dec = time.perf_counter() - t
            err = ((out.contributions.sum(1) - ref).norm() / ref.norm()).item()
            rows.append(
                {
                    "convention": convention,
                    "units": unit_layout(bb.model).num_units,
                    "rel_error": err,
                    "time_ratio": t_dec / t_enc,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `residual-lightning` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        rows = decomposition_demo()
        print("| convention | units | sum vs encode_image (rel. error) | time / encode_image |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['convention']} | {r['units']} | {r['rel_error']:.2e} | {r['time_ratio']:.2f} |")
        return
    sys.exit(f"residual-lightning: unknown command {' '.join(argv[:1]) or '(none)'}; available: demo")


if __name__ == "__main__":
    main()

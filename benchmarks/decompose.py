"""Benchmark: `decompose` against plain `encode_image` (time ratio and extra peak memory).

Each (model, function) pair runs in a fresh subprocess so that peak RSS is measured cleanly:
the extra memory is the peak resident set size during one call (sampled every millisecond from
/proc/self/statm) minus the RSS just before it. Times are
measured in one process, the two functions interleaved, and the ratio is the median of per-pair
ratios, so that load from other processes hits both alike. Random weights (nothing is downloaded). Usage:

    python benchmarks/decompose.py [--models ViT-B-32 ViT-B-16 timm:vit_base_patch16_224 hf:dinov2-b] [--batch 32] [--threads 2]

A row is ``library:model`` (a bare name is open_clip). open_clip rows compare ``encode_image`` with
`residual_lightning.units.decompose`; timm rows (``VisionTransformer`` and ``Eva``, e.g.
``timm:eva02_base_patch14_224``) and Hugging Face rows (``hf:clip-vit-b-16``, ``hf:dinov2-b``, ...,
random weights from configs with the public checkpoints' sizes, see `_HF_VISION`) compare the
library's own embedding (`backbones.dispatch.model_embedding`) with
``decompose_compact(read_model(model), x)``. The ``encode_image`` columns hold each library's own
embedding call. Another library is one `register` line (see `SETUPS`).
Quick check: ``--models RL-Tiny-ViT-64 timm:vit_tiny_patch16_224 --batch 2 --repeats 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

# --- rows: one setup per library ----------------------------------------------------------------
# A setup takes (model name, batch) and returns (encode, decompose, compact): zero-argument calls on
# the same model and the same batch of random images, built once (random weights, eval mode);
# compact is `decompose_compact` (what extraction runs), decompose adds the (N, U, D) expansion. A row is
# ``library:model`` (no prefix: open_clip); adding a library is one `register` line.

Calls = tuple[Callable[[], object], Callable[[], object], Callable[[], object]]
SETUPS: dict[str, Callable[[str, int], Calls]] = {}
DEFAULT_ROWS = ["ViT-B-32", "ViT-B-16", "timm:vit_base_patch16_224"]
FUNCTIONS = ("encode_image", "decompose", "decompose_compact")
# Targets (issue 16): decompose_compact at most 0.95x encode_image's time; ViT-B-16 at batch 32 at
# most 0.37 GB (compact) and 0.45 GB (decompose) extra peak memory.
TIME_TARGET = 0.95
MEMORY_TARGETS_MB = {"decompose_compact": 370, "decompose": 450}


def register(library: str, setup: Callable[[str, int], Calls]) -> None:
    """Make rows ``library:model`` run through `setup` (model name, batch) -> (encode, decompose, compact)."""
    SETUPS[library] = setup


def _images(batch: int, size: int):
    import torch

    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _open_clip_setup(model_name: str, batch: int) -> Calls:
    """open_clip: ``encode_image`` vs `residual_lightning.units.decompose`."""
    import open_clip

    from residual_lightning.backbones.loading import register_model_configs
    from residual_lightning.units import decompose, decompose_compact

    register_model_configs()  # the shipped tiny configs (RL-Tiny-ViT-64) for quick runs
    model = open_clip.create_model(model_name, pretrained=None).eval()
    x = _images(batch, model.visual.image_size[0])
    return (
        (lambda: model.encode_image(x)),
        (lambda: decompose(model, x)),
        (lambda: decompose_compact(model, x)),
    )


def _dispatch_calls(model, x) -> Calls:
    """The library's own embedding (`dispatch.model_embedding`) vs `decompose_compact(read_model(model))`
    (and its (N, U, D) expansion).

    Every library goes through the same code: `read_model` picks the reader, `model_embedding` the
    library's own forward (timm ``forward_head(forward_features(x), pre_logits=True)``, Hugging Face
    `hf_image_features`). Reading the model is part of the decompose call, as in `units.decompose`.
    """
    from residual_lightning.backbones.dispatch import model_embedding, read_model
    from residual_lightning.backbones.engine import decompose, decompose_compact

    return (
        (lambda: model_embedding(model, x)),
        (lambda: decompose(read_model(model), x)),
        (lambda: decompose_compact(read_model(model), x)),
    )


def _timm_setup(model_name: str, batch: int) -> Calls:
    """timm ``VisionTransformer`` or ``Eva`` (e.g. ``eva02_base_patch14_224``), by `read_model`."""
    import timm

    model = timm.create_model(model_name, pretrained=False).eval()
    return _dispatch_calls(model, _images(batch, model.patch_embed.img_size[0]))


# Hugging Face rows: random-weight models from configs with the public checkpoints' sizes (the
# numbers of each model card's config.json); only the vision side matters, so text towers are small.
_HF_SMALL_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=64,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
_HF_VISION = {  # name -> (vision sizes: width, layers, heads, patch, image)
    "clip-vit-b-16": (768, 12, 12, 16, 224),  # openai/clip-vit-base-patch16
    "clip-vit-l-14": (1024, 24, 16, 14, 224),  # openai/clip-vit-large-patch14
    "dinov2-b": (768, 12, 12, 14, 224),  # facebook/dinov2-base (224 px instead of 518)
    "dinov2-l": (1024, 24, 16, 14, 224),  # facebook/dinov2-large (224 px instead of 518)
    "vit-b-16": (768, 12, 12, 16, 224),  # google/vit-base-patch16-224
    "blip-itm-b": (768, 12, 12, 16, 384),  # Salesforce/blip-itm-base-coco
    "siglip-b-16": (768, 12, 12, 16, 224),  # google/siglip-base-patch16-224 (MAP pooling)
}


def _hf_model(name: str):
    import transformers as tf

    if name not in _HF_VISION:
        raise SystemExit(f"unknown hf row {name!r}; known: {', '.join(_HF_VISION)}")
    width, layers, heads, patch, image = _HF_VISION[name]
    sizes = dict(num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch, image_size=image)
    vision = dict(sizes, hidden_size=width, intermediate_size=4 * width)
    family = name.split("-")[0]
    if family == "clip":
        text = dict(_HF_SMALL_TEXT, max_position_embeddings=16)
        proj = 512 if width == 768 else 768
        config = tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=proj)
        return tf.CLIPModel._from_config(config), image
    if family == "dinov2":
        config = tf.Dinov2Config(hidden_size=width, mlp_ratio=4, layerscale_value=1.0, **sizes)
        return tf.Dinov2Model._from_config(config), image
    if family == "vit":
        return tf.ViTModel._from_config(tf.ViTConfig(**vision), add_pooling_layer=False), image
    if family == "blip":
        text = dict(_HF_SMALL_TEXT, max_position_embeddings=64, encoder_hidden_size=width, sep_token_id=3)
        config = tf.BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=256)
        model = tf.BlipForImageTextRetrieval._from_config(config, attn_implementation="eager")
        return model, image
    text = dict(_HF_SMALL_TEXT, max_position_embeddings=16, projection_size=width)
    return tf.SiglipModel._from_config(tf.SiglipConfig(vision_config=vision, text_config=text)), image


def _hf_setup(model_name: str, batch: int) -> Calls:
    """Hugging Face (``hf:clip-vit-b-16``, ``hf:dinov2-b``, ...; see `_HF_VISION`), by `read_model`."""
    model, image = _hf_model(model_name)
    return _dispatch_calls(model.eval(), _images(batch, image))


register("open_clip", _open_clip_setup)
register("timm", _timm_setup)
register("hf", _hf_setup)


def _setup(row: str, batch: int, threads: int) -> Calls:
    """The two calls of a row (``library:model``, or a bare open_clip model name)."""
    import torch

    library, _, name = row.rpartition(":")
    library = library or "open_clip"
    if library not in SETUPS:
        raise SystemExit(f"unknown library {library!r} in row {row!r}; registered: {', '.join(SETUPS)}")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return SETUPS[library](name, batch)


def _child(row: str, fn: str, batch: int, threads: int, repeats: int) -> dict:
    """Peak memory of one function in a fresh process (fn: encode_image, decompose or decompose_compact)."""
    import torch

    call = dict(zip(FUNCTIONS, _setup(row, batch, threads), strict=True))[fn]
    with _PeakRSS() as peak, torch.inference_mode():
        call()
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


def _timing(row: str, batch: int, threads: int, repeats: int) -> dict:
    """Median times of the three functions, interleaved in one process so load changes hit all alike,
    and the median per-round ratio of each decomposition to ``encode_image``."""
    import torch

    calls = dict(zip(FUNCTIONS, _setup(row, batch, threads), strict=True))
    times: dict[str, list[float]] = {k: [] for k in calls}
    ratios: dict[str, list[float]] = {k: [] for k in FUNCTIONS[1:]}
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up
        for _ in range(repeats):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
            for name in ratios:
                ratios[name].append(times[name][-1] / times["encode_image"][-1])
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k} ratio": statistics.median(v) for k, v in ratios.items()})
    return out


def _verdict(value: float, target: float | None) -> str:
    return "" if target is None else f" (<= {target:g}: {'met' if value <= target else 'MISSED'})"


def main() -> None:
    """Run every model in subprocesses and print a markdown table with each target beside its value."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=DEFAULT_ROWS,
        help="rows: open_clip model names, or library:model with library one of "
        f"{', '.join(SETUPS)} (default: %(default)s)",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "FN"), help=argparse.SUPPRESS)
    p.add_argument("--memory-only", action="store_true", help="skip the timings (peak memory only)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.batch, args.threads, args.repeats)))
        return

    def run(model: str, fn: str) -> dict:
        cmd = [sys.executable, __file__, "--child", model, fn, "--batch", str(args.batch)]
        cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    print(
        f"batch {args.batch}, {args.threads} CPU threads, random weights, median of {args.repeats} "
        f"interleaved rounds; extra MB: peak RSS of one call in a fresh process; load average {os.getloadavg()}\n"
    )
    print(
        "| model | encode_image s | decompose_compact s | decompose s | compact / encode_image "
        "| decompose / encode_image | encode_image extra MB | compact extra MB | decompose extra MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        t = {} if args.memory_only else _timing(model, args.batch, args.threads, args.repeats)
        mem = {fn: run(model, fn)["extra_mb"] for fn in FUNCTIONS}
        budgets = MEMORY_TARGETS_MB if model == "ViT-B-16" and args.batch == 32 else {}
        order = ("encode_image", "decompose_compact", "decompose")  # the columns' order
        cells = [f"{t[fn]:.3f}" if t else "-" for fn in order]
        for fn in order[1:]:
            ratio = t.get(f"{fn} ratio")
            cells.append("-" if ratio is None else f"{ratio:.2f}{_verdict(ratio, TIME_TARGET)}")
        cells += [f"{mem[fn]:.0f}{_verdict(mem[fn], budgets.get(fn))}" for fn in order]
        print(f"| {model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

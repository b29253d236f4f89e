"""Residual units of an open_clip ViT and the exact decomposition of its image embedding.

This is the one module that knows open_clip's internals. It reads a `VisionTransformer`'s
`resblocks` and splits `encode_image(x)` into the direct contributions of its residual units,
read where the pooled embedding is read (the CLS token, or the mean of the patch tokens):

    emb        what enters block 0 (`ln_pre` of the token embeddings)
    l{l}.mlp   the MLP of block l
    l{l}.h{h}  head h of block l's attention (its slice of `out_proj` applied to its output)

Letters used across the package: N images, U units (1 + L + L*H), L layers (`resblocks`),
H heads per layer, T tokens, W transformer width, d head width (W / H), D output embedding
size, K principal components, C classes.

The final LayerNorm is linear once each image's statistics (mean and sigma of the pooled stream)
are frozen, so the unit contributions sum to `encode_image(x)` exactly. Two conventions place the
LayerNorm's constant terms (see docs/units.md):

- ``"default"``: each unit is centred by its own feature mean and every constant (LayerNorm beta,
  each layer's `out_proj` bias) is folded into `emb`. A head's contribution is then
  ``A[l, h] @ y[n, l, h]`` with a fixed D x d map A and ``y = a / sigma`` its d-dim attention
  output over the image's sigma, so K = d components hold all of it.
- ``"equal_share"``: the authors' split: the mean term and beta are shared equally, 1/(2L+1) per
  emb/MLP unit and 1/((2L+1)H) per head, and each layer's `out_proj` bias is split over its heads.
  A head then spans up to d + 2 directions; its compact coordinates gain three entries
  ``[1/sigma, mean/sigma, 1]`` so the same ``A @ y`` form stays exact.

The compact form (`residual_lightning.contributions.Contributions`, with the layout and the unit
names) is what the activation cache stores: heads as y (N, L, H, k), MLPs and emb already in D.
`Contributions.expand` turns it back into (N, U, D).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual_lightning.contributions import (
    CONVENTIONS,
    EQUAL_SHARE_EXTRA,
    Contributions,
    Convention,
    UnitContributions,
    UnitLayout,
    expand,
)

__all__ = [
    "CONVENTIONS",
    "EQUAL_SHARE_EXTRA",
    "Backbone",
    "BackboneSpec",
    "Contributions",
    "Convention",
    "UnitContributions",
    "UnitLayout",
    "UnsupportedModelError",
    "decompose",
    "decompose_compact",
    "expand",
    "layout_from_config",
    "load_backbone",
    "register_model_configs",
    "unit_layout",
    "unit_names",
]

Precision = Literal["fp32", "fp16", "bf16", "amp", "amp_bf16", "pure_fp16", "pure_bf16"]


class UnsupportedModelError(TypeError):
    """The model is not an open_clip ViT this module can decompose exactly."""


# --------------------------------------------------------------------------------------------
# Architecture description
# --------------------------------------------------------------------------------------------


def _visual(model: nn.Module) -> nn.Module:
    """The vision tower of a CLIP/CustomTextCLIP, or the model itself if it is one."""
    return model.visual if hasattr(model, "visual") else model


def _check_supported(visual: nn.Module) -> None:
    """Raise `UnsupportedModelError` naming what is not supported, else return."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    supported = (
        "supported: open_clip VisionTransformer with standard ResidualAttentionBlock blocks "
        "(nn.MultiheadAttention), pool_type 'tok' or 'avg', no attentional pooler, a final "
        "LayerNorm and a projection"
    )
    cls = type(visual).__name__
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"cannot decompose a vision tower of class {type(visual).__module__}.{cls}; {supported}."
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"{cls} uses an attentional pooler (attn_pool); {supported}.")
    if visual.pool_type not in ("tok", "avg"):
        raise UnsupportedModelError(f"{cls} has pool_type={visual.pool_type!r}; {supported}.")
    if visual.proj is None:
        raise UnsupportedModelError(f"{cls} has no projection (proj is None); {supported}.")
    if not isinstance(visual.ln_post, nn.LayerNorm):
        raise UnsupportedModelError(
            f"{cls}.ln_post is {type(visual.ln_post).__name__}, not a LayerNorm; {supported}."
        )
    for i, block in enumerate(visual.transformer.resblocks):
        attn = getattr(block, "attn", None)
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(attn, nn.MultiheadAttention):
            raise UnsupportedModelError(
                f"block {i} is {type(block).__name__} with attention module "
                f"{type(attn).__name__} (custom blocks with qk_norm, scaled cosine attention or "
                f"open_clip's own Attention are not supported); {supported}."
            )
        if attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
            raise UnsupportedModelError(
                f"block {i}'s nn.MultiheadAttention uses bias_k/add_zero_attn/separate kdim; {supported}."
            )
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(f"block {i} is a cross-attention block; {supported}.")


def unit_layout(model: nn.Module) -> UnitLayout:
    """Describe the residual units of an open_clip CLIP model or its `.visual`.

    Args:
        model: an open_clip `CLIP`/`CustomTextCLIP` or its `VisionTransformer`.

    Raises:
        UnsupportedModelError: naming the class or option that is not supported.
    """
    visual = _visual(model)
    _check_supported(visual)
    blocks = visual.transformer.resblocks
    attn = blocks[0].attn
    if visual.pool_type == "tok":
        pool = "tok"
    else:
        pool = "avg_ln" if visual.final_ln_after_pool else "ln_avg"
    return UnitLayout(
        layers=len(blocks),
        heads=attn.num_heads,
        width=attn.embed_dim,
        head_width=attn.head_dim,
        output_dim=visual.proj.shape[1],
        pool=pool,
    )


def layout_from_config(model_name: str, convention: Convention = "default") -> UnitLayout:
    """The `UnitLayout` of an open_clip ViT from its config alone (no weights are built).

    Its ``shape`` is ``(L, H, k, D)``, k the compact head width: d, or d + 3 under ``equal_share``.

    Raises:
        ValueError: unknown model, or a config that is not a ViT.
    """
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5, cutoff=0.5)
        raise ValueError(
            f"unknown open_clip model {model_name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    vision = cfg.get("vision_cfg", {})
    layers = vision.get("layers")
    if not isinstance(layers, int) or "timm_model_name" in vision and vision["timm_model_name"]:
        raise UnsupportedModelError(f"{model_name} does not have an open_clip ViT vision tower")
    width = vision.get("width", 768)
    head_width = vision.get("head_width", 64)
    return UnitLayout(layers, width // head_width, head_width, cfg["embed_dim"], convention, width=width)


def unit_names(model: nn.Module) -> list[str]:
    """The U = 1 + L + L*H unit names, in the authors' order.

    ``"emb"``, then ``"l{l}.mlp"`` for every layer, then ``"l{l}.h{h}"`` layer-major, so that
    weights learned by the authors' code map one to one.

    Args:
        model: an open_clip `CLIP`/`CustomTextCLIP` or its `VisionTransformer`.
    """
    return unit_layout(model).names


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def CompactContributions(  # noqa: N802 (the old class name, kept for one release)
    heads: Tensor,
    mlps: Tensor,
    emb: Tensor,
    head_maps: Tensor,
    names: list[str],
    convention: str = "default",
    extra: dict | None = None,
) -> Contributions:
    """Deprecated: build a `Contributions` (this was its own class before 0.2)."""
    warnings.warn(
        "CompactContributions is deprecated and will be removed in the next release: use "
        "residual_lightning.contributions.Contributions (keyword head_maps=, names=)",
        DeprecationWarning,
        stacklevel=2,
    )
    return Contributions(
        heads, mlps, emb, head_maps=head_maps, names=names, convention=convention, extra=extra or {}
    )


# --------------------------------------------------------------------------------------------
# Decomposition
# --------------------------------------------------------------------------------------------


def _readout(x: Tensor, pool: str) -> Tensor:
    """The tokens the embedding is read from, as a new tensor: (N, T, W) -> (N, R, W).

    A copy, not a view: a view would keep every layer's full (N, T, W) activations alive.
    """
    if pool == "tok":
        return x[:, :1].float().clone()
    if pool == "avg_ln":
        return x[:, 1:].float().mean(dim=1, keepdim=True)
    return x[:, 1:].float().clone()


def _attention_context(block: nn.Module, x: Tensor, query_tokens: int | None) -> Tensor:
    """Multi-head attention output before `out_proj`, for the first `query_tokens` queries.

    Mirrors `nn.MultiheadAttention`'s math (in_proj, scaled dot product, softmax) with the
    block's own parameters; returns (N, Tq, W) with head h in columns h*d:(h+1)*d.
    """
    attn: nn.MultiheadAttention = block.attn
    n, t, w = x.shape
    h = attn.num_heads
    d = w // h
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if query_tokens is None:
        qkv = F.linear(x, weight, bias)  # (N, T, 3W)
        q, k, v = qkv.split(w, dim=-1)
    else:
        bq, bkv = (None, None) if bias is None else (bias[:w], bias[w:])
        q = F.linear(x[:, :query_tokens], weight[:w], bq)  # (N, Tq, W)
        k, v = F.linear(x, weight[w:], bkv).split(w, dim=-1)  # (N, T, W) each
    q = q.reshape(n, -1, h, d).transpose(1, 2)  # (N, H, Tq, d)
    k = k.reshape(n, t, h, d).transpose(1, 2)  # (N, H, T, d)
    v = v.reshape(n, t, h, d).transpose(1, 2)  # (N, H, T, d)
    ctx = F.scaled_dot_product_attention(q, k, v)  # (N, H, Tq, d)
    return ctx.transpose(1, 2).reshape(n, -1, w)  # (N, Tq, W)


def _run_blocks(visual: nn.Module, images: Tensor, layout: UnitLayout) -> dict[str, Tensor]:
    """One forward pass collecting every unit's output at the readout tokens.

    Returns float32 tensors: ``emb`` (N, R, W), ``mlps`` (N, L, R, W), ``ctx`` (N, L, R, W)
    (attention outputs before out_proj) and ``stream`` (N, R, W), the full residual stream.
    """
    pool = layout.pool
    x = visual._embeds(images.to(visual.conv1.weight.dtype))  # (N, T, W)
    emb = _readout(x, pool)
    blocks = visual.transformer.resblocks
    mlps, ctxs = [], []
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        # In the last block only the CLS row matters for a 'tok' readout.
        cls_only = last and pool == "tok"
        ctx = _attention_context(block, block.ln_1(x), 1 if cls_only else None)  # (N, Tq, W)
        attn_out = block.ls_1(block.attn.out_proj(ctx))  # (N, Tq, W)
        x = x[:, :1] + attn_out if cls_only else x + attn_out
        mlp_out = block.ls_2(block.mlp(block.ln_2(x)))  # (N, Tq, W)
        x = x + mlp_out
        ctxs.append(_readout(ctx, pool))
        mlps.append(_readout(mlp_out, pool))
    return {
        "emb": emb,
        "mlps": torch.stack(mlps, dim=1),  # (N, L, R, W)
        "ctx": torch.stack(ctxs, dim=1),  # (N, L, R, W)
        "stream": _readout(x, pool),  # (N, R, W)
    }


def _head_weights(visual: nn.Module, layout: UnitLayout) -> tuple[Tensor, Tensor]:
    """Per-head out_proj slices with LayerScale folded in, and the scaled out_proj biases.

    Returns (L, H, W, d) maps into the stream and (L, W) bias vectors, float32.
    """
    maps, biases = [], []
    for block in visual.transformer.resblocks:
        w_o = block.attn.out_proj.weight.float()  # (W, W)
        b_o = block.attn.out_proj.bias
        b_o = torch.zeros(layout.width, device=w_o.device) if b_o is None else b_o.float()
        scale = _layer_scale(block.ls_1, layout.width, w_o.device)
        w_o = scale[:, None] * w_o
        maps.append(w_o.reshape(layout.width, layout.heads, layout.head_width).permute(1, 0, 2))
        biases.append(scale * b_o)
    return torch.stack(maps), torch.stack(biases)  # (L, H, W, d), (L, W)


def _layer_scale(module: nn.Module, width: int, device: torch.device) -> Tensor:
    """The LayerScale vector of `module` (ones for nn.Identity)."""
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        if not isinstance(module, nn.Identity):
            raise UnsupportedModelError(f"unknown LayerScale module {type(module).__name__}")
        return torch.ones(width, device=device)
    return gamma.float()


def decompose_compact(model: nn.Module, images: Tensor, convention: Convention = "default") -> Contributions:
    """Decompose `encode_image(images)` into the compact form the cache stores.

    One forward pass through the frozen tower; only the readout tokens of each unit are kept.
    Works under `torch.autocast` and `torch.inference_mode`; outputs are float32.

    Args:
        model: an open_clip `CLIP`/`CustomTextCLIP` or its `VisionTransformer`, in eval mode.
        images: (N, 3, S, S) preprocessed images.
        convention: ``"default"`` or ``"equal_share"`` (see the module docstring).

    Raises:
        UnsupportedModelError: for models this module cannot decompose exactly.
        ValueError: for an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    visual = _visual(model)
    layout = unit_layout(visual)
    acts = _run_blocks(visual, images, layout)
    with torch.autocast(device_type=images.device.type, enabled=False):
        return _linearise(visual, layout, acts, convention)


def _linearise(visual: nn.Module, layout: UnitLayout, acts: dict, convention: str) -> Contributions:
    """Split the final LayerNorm and projection over the units (float32)."""
    ln = visual.ln_post
    gamma = (
        ln.weight.float() if ln.weight is not None else torch.ones(layout.width, device=acts["emb"].device)
    )
    beta = ln.bias.float() if ln.bias is not None else torch.zeros_like(gamma)
    proj = visual.proj.float()  # (W, D)
    gp = gamma[:, None] * proj  # (W, D): v -> (gamma * v) @ proj
    stream = acts["stream"]  # (N, R, W)
    mu = stream.mean(-1, keepdim=True)  # (N, R, 1)
    inv_sigma = torch.rsqrt(stream.var(-1, unbiased=False, keepdim=True) + ln.eps)  # (N, R, 1)
    head_w, head_b = _head_weights(visual, layout)  # (L, H, W, d), (L, W)
    layers, heads = layout.layers, layout.heads

    def centre(v: Tensor) -> Tensor:
        return v - v.mean(-1, keepdim=True) if convention == "default" else v

    # Units' stream values over sigma, averaged over the readout tokens (sigma is per token).
    emb_v = acts["emb"] * inv_sigma  # (N, R, W)
    mlp_v = acts["mlps"] * inv_sigma[:, None]  # (N, L, R, W)
    y = (acts["ctx"] * inv_sigma[:, None]).mean(2)  # (N, L, W)
    y = y.reshape(y.shape[0], layers, heads, layout.head_width)  # (N, L, H, d)
    maps = torch.einsum("lhwk,wd->lhdk", centre_maps(head_w, convention), gp)  # (L, H, D, d)
    beta_p = beta @ proj  # (D,)

    if convention == "default":
        bias_v = head_b.sum(0) * inv_sigma  # (N, R, W)
        emb = (centre(emb_v + bias_v).mean(1)) @ gp + beta_p  # (N, D)
        mlps = centre(mlp_v).mean(2) @ gp  # (N, L, D)
        heads_y = y
    else:
        share = 1.0 / (2 * layers + 1)
        share_h = share / heads
        mu_sigma = mu * inv_sigma  # (N, R, 1)
        g = gamma @ proj  # (D,)
        emb = emb_v.mean(1) @ gp - share * mu_sigma.mean(1) * g + share * beta_p  # (N, D)
        mlps = mlp_v.mean(2) @ gp - share * mu_sigma.mean(1)[:, None] * g + share * beta_p  # (N, L, D)
        n = y.shape[0]
        extra_y = torch.stack(
            [inv_sigma.mean((1, 2)), mu_sigma.mean((1, 2)), torch.ones_like(mu_sigma.mean((1, 2)))], -1
        )  # (N, 3)
        heads_y = torch.cat([y, extra_y[:, None, None].expand(n, layers, heads, 3)], dim=-1)  # (N, L, H, d+3)
        bias_dir = (head_b / heads) @ gp  # (L, D)
        extra_maps = torch.stack(
            [
                bias_dir[:, None].expand(layers, heads, -1),
                (-share_h * g).expand(layers, heads, -1),
                (share_h * beta_p).expand(layers, heads, -1),
            ],
            dim=-1,
        )  # (L, H, D, 3)
        maps = torch.cat([maps, extra_maps], dim=-1)  # (L, H, D, d+3)
    return Contributions(
        heads=heads_y, mlps=mlps, emb=emb, head_maps=maps, names=layout.names, convention=convention
    )


def centre_maps(head_w: Tensor, convention: str) -> Tensor:
    """Centre each column of the (L, H, W, d) head maps over W under the default convention."""
    if convention == "default":
        return head_w - head_w.mean(2, keepdim=True)
    return head_w


def decompose(model: nn.Module, images: Tensor, convention: Convention = "default") -> UnitContributions:
    """Decompose `encode_image(images)` into the direct contributions of every residual unit.

    ``result.contributions.sum(1)`` equals ``model.encode_image(images)`` (not normalised) to
    float32 rounding.

    Args:
        model: an open_clip `CLIP`/`CustomTextCLIP` or its `VisionTransformer`, in eval mode.
        images: (N, 3, S, S) preprocessed images.
        convention: ``"default"`` (constants folded into emb, heads of rank <= d) or
            ``"equal_share"`` (the authors' split).
    """
    compact = decompose_compact(model, images, convention)
    return UnitContributions(contributions=compact.expand(), names=compact.names)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_TINY_REGISTERED = False


def register_model_configs() -> list[str]:
    """Register the tiny architectures shipped in `residual_lightning/model_configs` with open_clip.

    Returns the names added (e.g. ``"RL-Tiny-ViT-64"``). Safe to call more than once.
    """
    global _TINY_REGISTERED
    import open_clip

    folder = resources.files("residual_lightning") / "model_configs"
    names = sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))
    if not _TINY_REGISTERED:
        with resources.as_file(folder) as path:
            open_clip.add_model_config(path)
        _TINY_REGISTERED = True
    return names


@dataclass
class BackboneSpec:
    """Which backbone to use: what a config names, and what a checkpoint records.

    Attributes:
        model_name: open_clip architecture (``open_clip.list_models()``) or a shipped tiny config.
        pretrained: open_clip tag, local checkpoint path, or None for random weights.
        precision: open_clip precision for loading (``fp32``, ``bf16``, ...).
    """

    model_name: str = "RL-Tiny-ViT-64"
    pretrained: str | None = None
    precision: str = "fp32"

    @property
    def weights_id(self) -> str:
        """Identity of the weights: the tag, ``file-<sha256>`` of a local file, or ``random``."""
        if self.pretrained is None:
            return "random-seed0"
        if os.path.isfile(self.pretrained):
            return f"file-{file_digest(self.pretrained)}"
        return self.pretrained

    def load(self, device: str | torch.device = "cpu") -> Backbone:
        """Load it with `load_backbone`."""
        return load_backbone(self.model_name, self.pretrained, self.precision, device)  # type: ignore[arg-type]


@dataclass
class Backbone:
    """A loaded open_clip model with what is needed to feed and describe it.

    Attributes:
        model: the open_clip model, in eval mode, frozen.
        transform: open_clip's eval preprocessing.
        tokenizer: open_clip's tokenizer for the text tower.
        model_name: the architecture name.
        pretrained: the tag, local path or None (random weights).
        weights_id: a stable identity of the weights (tag, or the checkpoint's sha256 prefix).
    """

    model: nn.Module
    transform: object
    tokenizer: object
    model_name: str
    pretrained: str | None
    weights_id: str


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """First 16 hex digits of a file's sha256 (identifies local checkpoints in cache keys).

    Memoised per (path, size, mtime): cache keys ask for it several times at start-up.
    """
    st = os.stat(path)
    return _file_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def load_backbone(
    model_name: str,
    pretrained: str | None = None,
    precision: Precision = "fp32",
    device: str | torch.device = "cpu",
) -> Backbone:
    """Load an open_clip model, its eval transform and tokenizer.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``), or one of the tiny
            configs this package ships (``RL-Tiny-ViT-64``).
        pretrained: ``None`` for random weights, an open_clip tag (e.g. ``"laion2b_s34b_b88k"``)
            or the path of a local checkpoint file.
        precision: open_clip's precision argument (``"fp32"``, ``"bf16"``, ...).
        device: where to put the model.

    Raises:
        ValueError: unknown model name (with close matches) or unknown pretrained tag.
        RuntimeError: weights could not be fetched (the message says how to use a local file).
    """
    import open_clip

    register_model_configs()
    models = open_clip.list_models()
    if model_name not in models and not model_name.startswith(("hf-hub:", "local-dir:")):
        close = difflib.get_close_matches(model_name, models, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown open_clip model {model_name!r}.{hint} See open_clip.list_models() for all "
            f"{len(models)} names."
        )
    weights_id = "random-seed0"
    if pretrained is not None:
        if (
            os.path.sep in pretrained
            or os.path.exists(pretrained)
            or pretrained.endswith((".pt", ".bin", ".safetensors"))
        ):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained checkpoint file {pretrained!r} does not exist")
            weights_id = f"file-{file_digest(pretrained)}"
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                close = difflib.get_close_matches(pretrained, tags, n=3, cutoff=0.4)
                raise ValueError(
                    f"unknown pretrained tag {pretrained!r} for {model_name}; valid tags: "
                    f"{', '.join(tags) or 'none (use a local checkpoint path)'}"
                    + (f". Did you mean: {', '.join(close)}?" if close else "")
                )
            weights_id = pretrained
    try:
        # Random weights are drawn from a fixed seed, so that "random" names one set of weights:
        # caches, classifiers and checkpoints made with it stay consistent across processes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, precision=precision, device=device
            )
    except (OSError, RuntimeError, ConnectionError) as err:
        if pretrained is None or os.path.isfile(pretrained):
            raise
        raise RuntimeError(
            f"could not fetch the weights {model_name}/{pretrained!r}: {type(err).__name__}: {err}. "
            "The machine appears to be offline or the hub unreachable. Download the checkpoint "
            "elsewhere and pass its local path as `pretrained` (e.g. "
            "--model.backbone.pretrained /path/to/open_clip_model.safetensors)."
        ) from err
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    return Backbone(model, transform, tokenizer, model_name, pretrained, weights_id)

"""Reader: an open_clip `VisionTransformer` as a `CanonicalViT`.

Read, in open_clip's own words, for open_clip 2.24 to 3.x and the coming 4.x (its main branch):

- ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj``),
  as open_clip up to 3.x builds it;
- ``ResidualAttentionBlock`` with open_clip's own ``Attention``, as 4.x builds every ViT;
- ``CustomResidualAttentionBlock`` with open_clip's ``Attention`` (vision config
  ``block_type="custom"``): ``qk_norm`` (``ln_q``/``ln_k``), ``scale_heads`` (``head_scale``),
  ``scale_attn_inner`` (``ln_inner``), ``scale_attn`` (the block's ``ln_attn``) and ``scale_fc``
  (a LayerNorm inside the MLP, which the engine uses as a function).

open_clip's ``Attention`` is read with either in-projection layout: the fused ``in_proj_weight``
(3W, W), or 4.x's separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` (W, W) with the
fused ``in_proj_bias`` (3W,) split in three. ``scaled_cosine_attn`` (``logit_scale``, Swin v2's
scaled cosine attention) is read when the module's forward is 4.x's (it takes ``k_x``): q and k
are L2-normalised per head and the logits are ``cos * exp(min(logit_scale_h, logit_scale_max))``,
expressed through the canonical `Attention` as ``q_norm`` = normalise and multiply by the head's
scale, ``k_norm`` = normalise, ``scale=1``.

Refused with `UnsupportedModelError` naming the attribute: ``logit_scale`` on open_clip 3.x's
``Attention`` (its forward calls ``torch.bmm`` on 4-D tensors and fails, so there is no forward to
match), ``logit_scale`` together with ``ln_q``/``ln_k``, separate q/k/v weights of another input
width (``kdim``/``vdim``: cross-attention), attentional poolers (``attn_pool``),
``pool_type`` other than ``'tok'``/``'avg'`` (``'none'``, 4.x's ``'avg_all'``), no ``proj``,
cross-attention blocks (``ln_1_kv``), ``nn.MultiheadAttention`` with
``bias_k``/``add_zero_attn``/separate kdim, and any sub-module or parameter this reader does not know.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual_lightning.backbones.canonical import (
    Attention,
    Block,
    CanonicalViT,
    Embed,
    Readout,
    UnsupportedModelError,
    layer_norm_or_none,
    optional_module,
)

__all__ = ["is_supported", "read_open_clip"]

_CUSTOM_BLOCK_CHILDREN = {"ln_1", "attn", "ln_attn", "ls_1", "ln_2", "mlp", "ls_2"}
_BLOCK_CHILDREN = {"ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"}  # 4.x ResidualAttentionBlock
_ATTENTION_CHILDREN = {"ln_q", "ln_k", "attn_drop", "ln_inner", "out_proj", "out_drop"}
_ATTENTION_PARAMS = {
    "in_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "in_proj_bias",
    "logit_scale",
    "head_scale",
}


def _visual(model: nn.Module) -> nn.Module:
    return model.visual if hasattr(model, "visual") else model


def _layer_scale(module: nn.Module, where: str) -> Tensor | None:
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        raise UnsupportedModelError(f"{where} is an unknown LayerScale module {type(module).__name__}")
    return gamma


def _per_head(weight: Tensor, bias: Tensor | None, heads: int) -> list:
    """Split a fused (3W, W) in-projection into q, k, v weights (H, d, W) and biases (H, d)."""
    width = weight.shape[1]
    out = []
    for i in range(3):
        w = weight[i * width : (i + 1) * width].reshape(heads, width // heads, width)  # (H, d, W)
        b = None if bias is None else bias[i * width : (i + 1) * width].reshape(heads, -1)  # (H, d)
        out += [w, b]
    return out


class CosineQueryNorm(nn.Module):
    """Scaled cosine attention's query side: q / |q| times its head's logit scale.

    ``exp(min(logit_scale_h, max_log))`` per head; with `CosineKeyNorm` on the keys and an
    attention scale of 1 the logits are open_clip's ``cos(q, k) * exp(clamp(logit_scale))``.

    Args:
        logit_scale: the model's (H, 1, 1) ``logit_scale`` parameter (shared, not copied).
        max_log: the clamp on it (open_clip's ``logit_scale_max``, log(1 / 0.01)).
    """

    def __init__(self, logit_scale: Tensor, max_log: float):
        super().__init__()
        self.logit_scale = logit_scale
        self.max_log = float(max_log)

    def head_scale(self) -> Tensor:
        """The (H, 1, 1) multiplier of each head's cosine logits."""
        return torch.clamp(self.logit_scale, max=self.max_log).exp()

    def forward(self, q: Tensor) -> Tensor:  # q: (N, H, T, d)
        return F.normalize(q, dim=-1) * self.head_scale().to(q.dtype)


class CosineKeyNorm(nn.Module):
    """Scaled cosine attention's key side: k / |k| per head vector."""

    def forward(self, k: Tensor) -> Tensor:  # k: (N, H, T, d)
        return F.normalize(k, dim=-1)


def _read_mha(i: int, block: nn.Module) -> Block:
    attn: nn.MultiheadAttention = block.attn
    if attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
        raise UnsupportedModelError(
            f"block {i}: nn.MultiheadAttention with bias_k/add_zero_attn/separate kdim is not supported"
        )
    if hasattr(block, "ln_1_kv"):
        raise UnsupportedModelError(f"block {i} is a cross-attention block (ln_1_kv)")
    qw, qb, kw, kb, vw, vb = _per_head(attn.in_proj_weight, attn.in_proj_bias, attn.num_heads)
    attention = Attention(
        qw, kw, vw, qb, kb, vb, attn.out_proj.weight, attn.out_proj.bias, scale=attn.head_dim**-0.5
    )
    return Block(
        norm1=block.ln_1,
        attention=attention,
        ls1=_layer_scale(block.ls_1, f"block {i} ls_1"),
        norm2=block.ln_2,
        mlp=block.mlp,
        ls2=_layer_scale(block.ls_2, f"block {i} ls_2"),
    )


def _cosine_forward_works(attn: nn.Module) -> bool:
    """Whether the module's forward is 4.x's (it takes ``k_x``), whose scaled-cosine path works;
    3.x's forward calls ``torch.bmm`` on 4-D tensors there and fails."""
    try:
        return "k_x" in inspect.signature(attn.forward).parameters
    except (TypeError, ValueError):
        return False


def _in_projection(i: int, attn: nn.Module) -> list:
    """q, k, v weights (H, d, W) and biases (H, d) of open_clip's `Attention`, fused or separate."""
    heads = attn.num_heads
    if getattr(attn, "in_proj_weight", None) is not None:
        return _per_head(attn.in_proj_weight, attn.in_proj_bias, heads)
    weights = [getattr(attn, f"{w}_proj_weight", None) for w in "qkv"]
    if any(w is None for w in weights):
        raise UnsupportedModelError(f"block {i}.attn has neither in_proj_weight nor q/k/v_proj_weight")
    width = attn.out_proj.weight.shape[0]
    if any(tuple(w.shape) != (width, width) for w in weights):
        shapes = [tuple(w.shape) for w in weights]
        raise UnsupportedModelError(
            f"block {i}.attn q/k/v_proj_weight shapes {shapes} are not ({width}, {width}): "
            "kdim/vdim (cross-attention) is not supported"
        )
    bias = attn.in_proj_bias
    out = []
    for j, w in enumerate(weights):
        out.append(w.reshape(heads, width // heads, width))  # (H, d, W)
        out.append(None if bias is None else bias[j * width : (j + 1) * width].reshape(heads, -1))  # (H, d)
    return out


def _read_attention(i: int, attn: nn.Module) -> Attention:
    """open_clip's own `Attention` (3.x or 4.x) in per-head form."""
    from open_clip.transformer import Attention as OpenClipAttention

    if not isinstance(attn, OpenClipAttention):
        raise UnsupportedModelError(f"block {i}.attn is {type(attn).__name__}, not open_clip's Attention")
    unknown = {n for n, _ in attn.named_children()} - _ATTENTION_CHILDREN
    unknown |= {n for n, _ in attn.named_parameters(recurse=False)} - _ATTENTION_PARAMS
    if unknown:
        raise UnsupportedModelError(f"block {i}.attn has unknown attributes {sorted(unknown)}")
    qw, qb, kw, kb, vw, vb = _in_projection(i, attn)
    head_scale = None if attn.head_scale is None else attn.head_scale.reshape(attn.num_heads)
    q_norm, k_norm = optional_module(attn.ln_q), optional_module(attn.ln_k)
    scale = attn.scale
    if attn.logit_scale is not None:
        if not _cosine_forward_works(attn):
            raise UnsupportedModelError(
                f"block {i}.attn.logit_scale (scaled_cosine_attn) is not supported on open_clip 3.x: its "
                "Attention.forward fails on it (torch.bmm on 4-D tensors), so it has no forward to match"
            )
        if q_norm is not None or k_norm is not None:
            raise UnsupportedModelError(f"block {i}.attn has both logit_scale and ln_q/ln_k")
        q_norm = CosineQueryNorm(attn.logit_scale, attn.logit_scale_max)
        k_norm, scale = CosineKeyNorm(), 1.0
    return Attention(
        qw,
        kw,
        vw,
        qb,
        kb,
        vb,
        attn.out_proj.weight,
        attn.out_proj.bias,
        scale=scale,
        q_norm=q_norm,
        k_norm=k_norm,
        head_scale=head_scale,
        inner_norm=layer_norm_or_none(attn.ln_inner, f"block {i}.attn.ln_inner"),
    )


def _read_block(i: int, block: nn.Module, children: set[str]) -> Block:
    """A (Custom)ResidualAttentionBlock with open_clip's `Attention`."""
    unknown = {name for name, _ in block.named_children()} - children
    if "ln_1_kv" in unknown:
        raise UnsupportedModelError(f"block {i} is a cross-attention block (ln_1_kv)")
    if unknown:
        raise UnsupportedModelError(f"block {i} has unknown sub-modules {sorted(unknown)}")
    return Block(
        norm1=block.ln_1,
        attention=_read_attention(i, block.attn),
        ls1=_layer_scale(block.ls_1, f"block {i} ls_1"),
        norm2=block.ln_2,
        mlp=block.mlp,
        ls2=_layer_scale(block.ls_2, f"block {i} ls_2"),
        post_attn_norm=layer_norm_or_none(getattr(block, "ln_attn", None), f"block {i}.ln_attn"),
    )


def read_open_clip(model: nn.Module) -> CanonicalViT:
    """Describe an open_clip CLIP's vision tower (or a `VisionTransformer`) as a `CanonicalViT`.

    The description shares the model's tensors and modules; the model must be in eval mode.

    Args:
        model: an open_clip `CLIP`/`CustomTextCLIP` or its `VisionTransformer`.

    Raises:
        UnsupportedModelError: naming the class, option or attribute that is not supported.
    """
    from open_clip.transformer import (
        CustomResidualAttentionBlock,
        ResidualAttentionBlock,
        VisionTransformer,
    )

    visual = _visual(model)
    cls = type(visual).__name__
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(f"cannot read a vision tower of class {type(visual).__module__}.{cls}")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"{cls} uses an attentional pooler (attn_pool)")
    if visual.pool_type not in ("tok", "avg"):
        raise UnsupportedModelError(f"{cls} has pool_type={visual.pool_type!r}")
    if visual.proj is None:
        raise UnsupportedModelError(f"{cls} has no projection (proj is None)")
    ln_post = layer_norm_or_none(visual.ln_post, f"{cls}.ln_post")
    if ln_post is None:
        raise UnsupportedModelError(f"{cls}.ln_post is absent")
    blocks = []
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is ResidualAttentionBlock and isinstance(block.attn, nn.MultiheadAttention):
            blocks.append(_read_mha(i, block))
        elif type(block) is ResidualAttentionBlock:  # open_clip 4.x: its own Attention
            blocks.append(_read_block(i, block, _BLOCK_CHILDREN))
        elif type(block) is CustomResidualAttentionBlock:
            blocks.append(_read_block(i, block, _CUSTOM_BLOCK_CHILDREN))
        else:
            raise UnsupportedModelError(
                f"block {i} is {type(block).__name__} with attention {type(getattr(block, 'attn', None)).__name__}"
            )
    readout = Readout(
        pool=visual.pool_type,
        norm=ln_post,
        proj=visual.proj,
        norm_after_pool=bool(visual.final_ln_after_pool),
        num_prefix_tokens=1,
    )
    embed = Embed(visual._embeds, dtype=visual.conv1.weight.dtype)
    return CanonicalViT(embed, blocks, readout, library="open_clip", name=cls)


def is_supported(model: nn.Module) -> bool:
    """Whether `read_open_clip` can read `model` (no exception raised)."""
    try:
        read_open_clip(model)
    except UnsupportedModelError:
        return False
    return True

"""Reader: a timm `Eva` (EVA, EVA-02, EVA-CLIP and PE towers, timm's RoPE ViTs) as a `CanonicalViT`.

The embedding read is ``model.forward_head(model.forward_features(x), pre_logits=True)``: the
pooled, normed features before the classifier head, so the readout's projection is the identity
(W, W) and D = W. Read, in timm's own words (``timm/models/eva.py``, timm 1.0.x):

- the ``emb`` unit: ``patch_embed``, ``_pos_embed`` (class token, ``reg_token`` register tokens,
  ``pos_embed`` with or without ``no_embed_class`` or none, ``pos_drop``, ``patch_drop``) and
  ``norm_pre`` (``use_pre_transformer_norm``), run through the model's own modules (so
  ``dynamic_img_size`` works as the model does);
- the rotary embedding (``use_rot_pos_emb``, every ``rope_type``): the ``rot_pos_embed`` tensor
  that the model's ``_pos_embed`` returns for the images in hand (``model.rope.get_embed()``, or
  built for the grid shape), applied to q and k after ``q_norm``/``k_norm`` on the tokens after the
  ``num_prefix_tokens`` exactly as the attention does (``apply_rot_embed_cat``, interleaved or
  ``rotate_half``); with ``rope_type='mixed'`` block i uses its slice ``rot_pos_embed[i]``. The
  ``emb`` unit stores the tensor at each forward and the blocks' `rope` hooks read it, so the
  rotation is the model's own, computed once per forward as timm does;
- blocks of ``EvaBlock`` with ``EvaAttention`` (fused ``qkv`` with ``q_bias``/``k_bias``/
  ``v_bias``, ``k_bias`` the zero buffer, or separate ``q_proj``/``k_proj``/``v_proj``; with or
  without biases) or ``AttentionRope`` (``attn_type='rope'``: ``qkv`` with its own bias or separate
  projections, ``num_kv_heads`` grouped-query attention read as k/v weights repeated per query
  head, a copy), ``q_norm``/``k_norm`` (``qk_norm``), ``norm`` (``scale_attn_inner``, a LayerNorm
  over the concatenated heads before ``proj``), ``proj`` (with or without bias), the layer scales
  ``gamma_1``/``gamma_2`` (``init_values``, ``attn_only_layer_scale``), ``norm1``/``norm2`` and
  ``mlp`` (``Mlp``, ``GluMlp``, ``SwiGLU``, with or without ``scale_mlp``) used as functions;
- the readout: ``global_pool='token'`` or ``'avg'`` (over the tokens after the
  ``num_prefix_tokens``), with the final LayerNorm either before pooling (``norm``) or after it
  (``fc_norm``); or ``'map'``: the per-token ``norm``, then ``attn_pool`` (timm's
  ``AttentionPoolLatent``, read by `residual_lightning.backbones.timm`) over every token, prefix
  tokens included, as Eva's ``pool`` does.

Refused with `UnsupportedModelError` naming the class or option: subclasses and other model
classes, ``EvaBlockPostNorm`` (``use_post_norm``) and any other block, any attention other than
``EvaAttention`` and ``AttentionRope``, gated attention (``attn.gate``), a fused ``qkv`` that has
both its own bias and ``q_bias``, ``attn.norm`` that is not a LayerNorm, ``global_pool``
``'max'``, ``'avgmax'`` and ``''``, an ``attn_pool`` followed by an ``fc_norm`` or without the
per-token ``norm``, what `residual_lightning.backbones.timm` refuses of an ``AttentionPoolLatent``,
no final norm or both ``norm`` and ``fc_norm``, a final norm that is not a LayerNorm, and unknown
sub-modules or parameters of the blocks and attentions.
"""

from __future__ import annotations

import torch
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
from residual_lightning.backbones.timm import read_map_pool, token_or_avg_readout

__all__ = ["is_supported_timm_eva", "read_timm_eva"]

_BLOCK_CHILDREN = {"norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2"}
_BLOCK_PARAMS = {"gamma_1", "gamma_2"}
_ATTENTION_CHILDREN = {
    "qkv",
    "q_proj",
    "k_proj",
    "v_proj",
    "q_norm",
    "k_norm",
    "attn_drop",
    "norm",
    "proj",
    "proj_drop",
}
_ATTENTION_PARAMS = {"q_bias", "v_bias"}


class _RopeState:
    """The ``rot_pos_embed`` of the images in hand, as the model's ``_pos_embed`` returned it.

    ``Embed`` stores it at the start of every forward; each block's `rope` hook reads it.
    """

    def __init__(self) -> None:
        self.embed: Tensor | None = None

    def get(self) -> Tensor:
        if self.embed is None:
            raise RuntimeError(
                "the rotary embedding is set by the embed unit: run canonical.embed(images) first"
            )
        return self.embed


def _rope_hook(state: _RopeState, prefix: int, half: bool, block: int | None):
    """``rope(t, rows)`` as ``EvaAttention`` applies it to q or k (N, H, T', d) of token rows ``rows``.

    Token p < ``prefix`` is left alone; token p >= ``prefix`` is rotated by the embedding's row
    p - ``prefix`` (``apply_rot_embed_cat``). ``block`` picks block i's embedding (mixed RoPE).
    """
    from timm.layers import apply_rot_embed_cat

    def rope(t: Tensor, rows: slice) -> Tensor:
        emb = state.get()
        if block is not None:
            emb = emb[block]
        start = rows.start or 0
        skip = min(max(prefix - start, 0), t.shape[2])  # leading prefix rows of t
        if skip == t.shape[2]:
            return t
        first = start + skip - prefix  # embedding row of t's first rotated token
        emb = emb[..., first : first + t.shape[2] - skip, :]
        rotated = apply_rot_embed_cat(t[:, :, skip:], emb, half=half)
        return torch.cat([t[:, :, :skip], rotated], dim=2) if skip else rotated

    return rope


def _read_attention(i: int, attn: nn.Module, rope) -> Attention:
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    if type(attn) not in (EvaAttention, AttentionRope):
        raise UnsupportedModelError(
            f"block {i}.attn is {type(attn).__module__}.{type(attn).__name__}, "
            "not timm's EvaAttention or AttentionRope"
        )
    unknown = {name for name, _ in attn.named_children()} - _ATTENTION_CHILDREN
    unknown |= {name for name, _ in attn.named_parameters(recurse=False)} - _ATTENTION_PARAMS
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(f"block {i}.attn.gate (gated attention) is not supported")
    if unknown:
        raise UnsupportedModelError(f"block {i}.attn has unknown sub-modules or parameters {sorted(unknown)}")
    heads, d = attn.num_heads, attn.head_dim
    inner = heads * d
    if attn.qkv is not None:
        weight = attn.qkv.weight  # (3*H*d, W)
        if getattr(attn, "q_bias", None) is not None:  # EvaAttention(qkv_bias=True)
            if attn.qkv.bias is not None:
                raise UnsupportedModelError(f"block {i}.attn.qkv has a bias besides q_bias/k_bias/v_bias")
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))  # as EvaAttention.forward
        else:
            bias = attn.qkv.bias
        # timm reshapes qkv(x) to (N, T, 3, H, d): rows in q/k/v, then head, then head-dim order.
        w = [weight[j * inner : (j + 1) * inner].reshape(heads, d, -1) for j in range(3)]  # (H, d, W)
        b = [None if bias is None else bias[j * inner : (j + 1) * inner].reshape(heads, d) for j in range(3)]
    else:
        linears = (attn.q_proj, attn.k_proj, attn.v_proj)
        w = [lin.weight.reshape(-1, d, lin.weight.shape[1]) for lin in linears]  # (H or H_kv, d, W)
        b = [None if lin.bias is None else lin.bias.reshape(-1, d) for lin in linears]
        groups = getattr(attn, "num_kv_groups", 1)
        if groups > 1:
            # AttentionRope(num_kv_heads) repeats each k/v head after its norm and rope (per head,
            # per token), so query head h uses k/v head h // groups: repeat the weights instead.
            for j in (1, 2):
                w[j] = w[j].repeat_interleave(groups, 0)
                b[j] = None if b[j] is None else b[j].repeat_interleave(groups, 0)
    return Attention(
        w[0],
        w[1],
        w[2],
        b[0],
        b[1],
        b[2],
        attn.proj.weight,
        attn.proj.bias,
        scale=float(attn.scale),
        q_norm=optional_module(attn.q_norm),
        k_norm=optional_module(attn.k_norm),
        inner_norm=layer_norm_or_none(getattr(attn, "norm", None), f"block {i}.attn.norm"),
        rope=rope,
    )


def _read_block(i: int, block: nn.Module, rope) -> Block:
    from timm.models.eva import EvaBlock

    if type(block) is not EvaBlock:
        raise UnsupportedModelError(
            f"block {i} is {type(block).__module__}.{type(block).__name__}, not timm's pre-norm EvaBlock"
        )
    unknown = {name for name, _ in block.named_children()} - _BLOCK_CHILDREN
    unknown |= {name for name, _ in block.named_parameters(recurse=False)} - _BLOCK_PARAMS
    if unknown:
        raise UnsupportedModelError(f"block {i} has unknown sub-modules or parameters {sorted(unknown)}")
    return Block(
        norm1=block.norm1,
        attention=_read_attention(i, block.attn, rope),
        ls1=block.gamma_1,
        norm2=block.norm2,
        mlp=block.mlp,
        ls2=block.gamma_2,
    )


def _read_readout(model: nn.Module) -> Readout:
    cls = type(model).__name__
    pool = model.global_pool
    width = model.embed_dim
    device = next(model.parameters()).device
    if pool == "map" or getattr(model, "attn_pool", None) is not None:
        # Eva's attn_pool attends to every token, prefix tokens included, after the per-token norm.

        norm = layer_norm_or_none(model.norm, f"{cls}.norm")
        if pool != "map" or optional_module(model.fc_norm) is not None:
            raise UnsupportedModelError(
                f"{cls} has global_pool={pool!r} with an attn_pool and an fc_norm after it; not supported"
            )
        if norm is None:
            raise UnsupportedModelError(f"{cls} has no final norm (use_post_transformer_norm off)")
        return Readout(
            pool="map",
            norm=norm,
            proj=torch.eye(width, device=device),  # pre_logits: no projection
            num_prefix_tokens=0,
            map_pool=read_map_pool(cls, model.attn_pool, width, 0),
        )
    return token_or_avg_readout(model, model.num_prefix_tokens, "use_post_transformer_norm/use_fc_norm off")


def read_timm_eva(model: nn.Module) -> CanonicalViT:
    """Describe a timm `Eva` as a `CanonicalViT` of its pre-logits embedding.

    ``read_timm_eva(model).forward(x)`` is ``model.forward_head(model.forward_features(x),
    pre_logits=True)``. The description shares the model's tensors and modules; the model must be
    in eval mode.

    Args:
        model: a `timm.models.eva.Eva` (exactly that class).

    Raises:
        UnsupportedModelError: naming the class or option that is not supported.
    """
    from timm.models.eva import Eva

    cls = type(model).__name__
    if type(model) is not Eva:
        raise UnsupportedModelError(
            f"cannot read a model of class {type(model).__module__}.{cls}; only timm.models.eva.Eva"
        )
    readout = _read_readout(model)
    state = _RopeState()
    mixed = bool(getattr(model, "rope_mixed", False))
    blocks = []
    for i, block in enumerate(model.blocks):
        rope = None
        if model.rope is not None:
            half = bool(getattr(block.attn, "rotate_half", False))
            rope = _rope_hook(state, block.attn.num_prefix_tokens, half, i if mixed else None)
        blocks.append(_read_block(i, block, rope))

    def embed(images: Tensor) -> Tensor:
        x = model.patch_embed(images)
        x, state.embed = model._pos_embed(x)  # tokens, rot_pos_embed (None without RoPE)
        return model.norm_pre(x)  # (N, T, W)

    embed_dtype = next(model.patch_embed.parameters()).dtype
    return CanonicalViT(Embed(embed, dtype=embed_dtype), blocks, readout, library="timm", name=cls)


def is_supported_timm_eva(model: nn.Module) -> bool:
    """Whether `read_timm_eva` can read `model` (no exception raised)."""
    try:
        read_timm_eva(model)
    except UnsupportedModelError:
        return False
    return True

"""Reader: a timm `VisionTransformer` as a `CanonicalViT`.

The embedding read is ``model.forward_head(model.forward_features(x), pre_logits=True)``: the
pooled, normed features before the classifier head, so the readout's projection is the identity
(W, W) and D = W. Read, in timm's own words:

- the ``emb`` unit: ``patch_embed``, ``_pos_embed`` (class token, ``reg_token`` register tokens,
  ``pos_embed`` with or without ``no_embed_class``, ``pos_drop``), ``patch_drop`` and ``norm_pre``,
  run through the model's own modules (so ``dynamic_img_size`` works as the model does);
- blocks of timm's pre-norm ``Block`` with timm's ``Attention``: ``attn.qkv`` (with or without
  bias), ``attn.q_norm``/``attn.k_norm`` (``qk_norm``), ``attn.norm`` (``scale_attn_norm``, a
  LayerNorm over the concatenated heads), ``attn.proj`` (with or without bias), ``ls1``/``ls2``
  (LayerScale ``gamma``), ``norm1``/``norm2`` and ``mlp`` used as functions;
- the readout: ``global_pool='token'`` or ``'avg'`` over the tokens after the ``num_prefix_tokens``
  (all tokens with ``pool_include_prefix=True``), with the final LayerNorm either before pooling
  (``norm``) or after it (``fc_norm``);
- or ``global_pool='map'``: ``model.norm`` per token, then timm's ``AttentionPoolLatent``
  (``attn_pool``) over the tokens after the ``num_prefix_tokens`` (all with
  ``pool_include_prefix=True``; SigLIP style ``class_token=False`` has none) as a `MapPool`:
  ``latent`` (any ``latent_len``), ``q`` (or no q-projection), ``kv``, ``q_norm``/``k_norm``,
  ``scale``, ``proj``, ``norm`` and ``mlp``; its ``pool`` ``'token'`` reads latent query 0,
  ``'avg'`` the mean over the latent queries. The engine adds the pool's MLP as the unit
  ``pool.mlp``.

Refused with `UnsupportedModelError` naming the class or option: subclasses and other model
classes (``VisionTransformerDistilled``, Eva, ...), ``global_pool`` ``'prr'``, ``'max'``,
``'avgmax'`` and ``''``, ``'map'`` with an ``fc_norm`` after the pool, an ``attn_pool`` other than
``AttentionPoolLatent``, with unknown sub-modules, a ``pos_embed`` (``pos_embed='abs'``), another
``pool_type``, a ``latent_dim`` or ``out_features`` other than the width, or a ``norm`` that is
not a LayerNorm; ``final_norm=False`` or a final norm that is not a LayerNorm, any block other
than ``Block`` (``ResPostBlock``, ``ParallelScalingBlock``, ``ParallelThingsBlock``, ...), any
attention other than timm's ``Attention`` (``DiffAttention``, ``AttentionRope``, ...), gated
attention (``attn.gate``), ``attn.norm`` that is not a LayerNorm, unknown LayerScale modules and
unknown sub-modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual_lightning.backbones.canonical import (
    Attention,
    Block,
    CanonicalViT,
    Embed,
    MapPool,
    Readout,
    UnsupportedModelError,
    layer_norm_or_none,
    optional_module,
)

__all__ = ["is_supported_timm", "read_timm"]

_BLOCK_CHILDREN = {"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"}
_ATTENTION_CHILDREN = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}
_POOL_CHILDREN = {"q", "kv", "q_norm", "k_norm", "proj", "proj_drop", "norm", "mlp"}


def _layer_scale(module: nn.Module, where: str) -> Tensor | None:
    from timm.layers import LayerScale

    if isinstance(module, nn.Identity):
        return None
    if type(module) is not LayerScale:
        raise UnsupportedModelError(f"{where} is an unknown LayerScale module {type(module).__name__}")
    return module.gamma


def _read_attention(i: int, attn: nn.Module) -> Attention:
    from timm.layers import Attention as TimmAttention

    if type(attn) is not TimmAttention:
        raise UnsupportedModelError(
            f"block {i}.attn is {type(attn).__module__}.{type(attn).__name__}, not timm's Attention"
        )
    unknown = {name for name, _ in attn.named_children()} - _ATTENTION_CHILDREN
    if unknown:
        raise UnsupportedModelError(f"block {i}.attn has unknown sub-modules {sorted(unknown)}")
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(f"block {i}.attn.gate (gated attention) is not supported")
    heads, d = attn.num_heads, attn.head_dim
    inner = heads * d
    qkv_w, qkv_b = attn.qkv.weight, attn.qkv.bias  # (3*H*d, W), (3*H*d,)
    # timm reshapes qkv(x) to (N, T, 3, H, d): rows in q/k/v, then head, then head-dim order.
    w = [qkv_w[j * inner : (j + 1) * inner].reshape(heads, d, -1) for j in range(3)]  # (H, d, W)
    b = [None if qkv_b is None else qkv_b[j * inner : (j + 1) * inner].reshape(heads, d) for j in range(3)]
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
    )


def _read_block(i: int, block: nn.Module) -> Block:
    from timm.models.vision_transformer import Block as TimmBlock

    if type(block) is not TimmBlock:
        raise UnsupportedModelError(
            f"block {i} is {type(block).__module__}.{type(block).__name__}, not timm's pre-norm Block"
        )
    unknown = {name for name, _ in block.named_children()} - _BLOCK_CHILDREN
    if unknown:
        raise UnsupportedModelError(f"block {i} has unknown sub-modules {sorted(unknown)}")
    return Block(
        norm1=block.norm1,
        attention=_read_attention(i, block.attn),
        ls1=_layer_scale(block.ls1, f"block {i}.ls1"),
        norm2=block.norm2,
        mlp=block.mlp,
        ls2=_layer_scale(block.ls2, f"block {i}.ls2"),
    )


def read_map_pool(cls: str, pool: nn.Module, width: int, skip: int) -> MapPool:
    """timm's ``AttentionPoolLatent`` as a `MapPool` attending to the tokens after `skip`."""
    from timm.layers import AttentionPoolLatent

    where = f"{cls}.attn_pool"
    if type(pool) is not AttentionPoolLatent:
        raise UnsupportedModelError(
            f"{where} is {type(pool).__module__}.{type(pool).__name__}, not timm's AttentionPoolLatent"
        )
    unknown = {name for name, _ in pool.named_children()} - _POOL_CHILDREN
    if unknown:
        raise UnsupportedModelError(f"{where} has unknown sub-modules {sorted(unknown)}")
    if getattr(pool, "pos_embed", None) is not None:
        raise UnsupportedModelError(f"{where}.pos_embed (pos_embed='abs') is not supported")
    if pool.pool not in ("token", "avg"):
        raise UnsupportedModelError(
            f"{where} has pool_type={pool.pool!r}; only 'token' and 'avg' are supported"
        )
    heads, d = pool.num_heads, pool.head_dim
    inner = heads * d
    latent = pool.latent  # (1, Q, latent_dim)
    if latent.shape[-1] != width or pool.kv.in_features != width:
        raise UnsupportedModelError(f"{where}: latent_dim {latent.shape[-1]} or input width is not {width}")
    device = latent.device
    if isinstance(pool.q, nn.Identity):  # q_proj=False: the latent is the query
        q_w, q_b = torch.eye(inner, device=device, dtype=latent.dtype), None
    else:
        q_w, q_b = pool.q.weight, pool.q.bias  # (H*d, W), (H*d,)
    if isinstance(pool.proj, nn.Identity):  # out_features=0: no out-projection
        o_w, o_b = torch.eye(inner, device=device, dtype=latent.dtype), None
    else:
        o_w, o_b = pool.proj.weight, pool.proj.bias
    if o_w.shape[0] != width:
        raise UnsupportedModelError(f"{where} has out_features={o_w.shape[0]}, not the width {width}")
    kv_w, kv_b = pool.kv.weight, pool.kv.bias  # (2*H*d, W), (2*H*d,)
    # timm reshapes kv(x) to (N, T, 2, H, d): k rows first, then v, each head-major.
    k_w, v_w = (kv_w[j * inner : (j + 1) * inner].reshape(heads, d, -1) for j in range(2))
    k_b, v_b = (
        None if kv_b is None else kv_b[j * inner : (j + 1) * inner].reshape(heads, d) for j in range(2)
    )
    attention = Attention(
        q_w.reshape(heads, d, -1),
        k_w,
        v_w,
        None if q_b is None else q_b.reshape(heads, d),
        k_b,
        v_b,
        o_w,
        o_b,
        scale=float(pool.scale),
        q_norm=optional_module(pool.q_norm),
        k_norm=optional_module(pool.k_norm),
    )
    return MapPool(
        latent=latent,
        attention=attention,
        norm=layer_norm_or_none(pool.norm, f"{where}.norm"),
        mlp=pool.mlp,
        reduce="first" if pool.pool == "token" else "mean",
        num_prefix_tokens=skip,
    )


def _read_readout(model: nn.Module) -> Readout:
    cls = type(model).__name__
    pool = model.global_pool
    width = model.embed_dim
    device = next(model.parameters()).device
    if pool == "map":
        norm = layer_norm_or_none(model.norm, f"{cls}.norm")
        if optional_module(model.fc_norm) is not None:
            raise UnsupportedModelError(
                f"{cls} has global_pool='map' with an fc_norm after the attention pool"
            )
        if norm is None:
            raise UnsupportedModelError(f"{cls} has no final norm (final_norm=False)")
        skip = 0 if model.pool_include_prefix else model.num_prefix_tokens
        return Readout(
            pool="map",
            norm=norm,
            proj=torch.eye(width, device=device),  # pre_logits: no projection
            num_prefix_tokens=skip,
            map_pool=read_map_pool(cls, model.attn_pool, width, skip),
        )
    if getattr(model, "attn_pool", None) is not None or pool == "prr":
        raise UnsupportedModelError(
            f"{cls} has global_pool={pool!r} (attention pooling, attn_pool); of attention pools only 'map'"
            " is supported"
        )
    skip = 0 if model.pool_include_prefix else model.num_prefix_tokens
    return token_or_avg_readout(model, skip, "final_norm=False")


def token_or_avg_readout(model: nn.Module, num_prefix_tokens: int, no_norm_hint: str) -> Readout:
    """The pre-logits readout of a timm ViT or Eva with ``global_pool`` ``token`` or ``avg``.

    One final LayerNorm: ``norm`` on every token before pooling, or ``fc_norm`` after it; the
    projection is the identity (pre-logits). `no_norm_hint` names the option that removes both.

    Raises:
        UnsupportedModelError: another pool, both norms, or neither.
    """
    cls, pool = type(model).__name__, model.global_pool
    if pool not in ("token", "avg"):
        raise UnsupportedModelError(
            f"{cls} has global_pool={pool!r}; only 'token', 'avg' and 'map' are supported"
        )
    norm = layer_norm_or_none(model.norm, f"{cls}.norm")
    fc_norm = layer_norm_or_none(model.fc_norm, f"{cls}.fc_norm")
    if norm is not None and fc_norm is not None:
        raise UnsupportedModelError(f"{cls} has both a final norm and an fc_norm")
    if norm is None and fc_norm is None:
        raise UnsupportedModelError(f"{cls} has no final norm ({no_norm_hint})")
    return Readout(
        pool="tok" if pool == "token" else "avg",
        norm=norm if norm is not None else fc_norm,
        proj=torch.eye(model.embed_dim, device=next(model.parameters()).device),  # pre_logits
        norm_after_pool=fc_norm is not None,
        num_prefix_tokens=num_prefix_tokens,
    )


def read_timm(model: nn.Module) -> CanonicalViT:
    """Describe a timm `VisionTransformer` as a `CanonicalViT` of its pre-logits embedding.

    ``read_timm(model).forward(x)`` is ``model.forward_head(model.forward_features(x),
    pre_logits=True)``. The description shares the model's tensors and modules; the model must be
    in eval mode.

    Args:
        model: a `timm.models.vision_transformer.VisionTransformer` (exactly that class).

    Raises:
        UnsupportedModelError: naming the class or option that is not supported.
    """
    from timm.models.vision_transformer import VisionTransformer

    cls = type(model).__name__
    if type(model) is not VisionTransformer:
        raise UnsupportedModelError(
            f"cannot read a model of class {type(model).__module__}.{cls}; "
            "only timm.models.vision_transformer.VisionTransformer"
        )
    readout = _read_readout(model)
    blocks = [_read_block(i, block) for i, block in enumerate(model.blocks)]

    def embed(images: Tensor) -> Tensor:
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)  # (N, T, W)

    embed_dtype = next(model.patch_embed.parameters()).dtype
    return CanonicalViT(Embed(embed, dtype=embed_dtype), blocks, readout, library="timm", name=cls)


def is_supported_timm(model: nn.Module) -> bool:
    """Whether `read_timm` can read `model` (no exception raised)."""
    try:
        read_timm(model)
    except UnsupportedModelError:
        return False
    return True

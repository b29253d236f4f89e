"""Reader: an open_clip `VisionTransformer` as a `CanonicalViT`.

Two block types are read, in open_clip's own words:

- ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj``);
- ``CustomResidualAttentionBlock`` with open_clip's ``Attention`` (vision config
  ``block_type="custom"``): ``qk_norm`` (``ln_q``/``ln_k``), ``scale_heads`` (``head_scale``),
  ``scale_attn_inner`` (``ln_inner``), ``scale_attn`` (the block's ``ln_attn``) and ``scale_fc``
  (a LayerNorm inside the MLP, which the engine uses as a function).

Refused with `UnsupportedModelError` naming the attribute: ``scaled_cosine_attn``
(``logit_scale``: open_clip 3.3.0's ``Attention.forward`` calls ``torch.bmm`` on 4-D tensors and
fails, so there is no forward to match), attentional poolers (``attn_pool``), ``pool_type='none'``,
no ``proj``, cross-attention blocks (``ln_1_kv``), ``nn.MultiheadAttention`` with
``bias_k``/``add_zero_attn``/separate kdim, and any sub-module or parameter this reader does not know.
"""

from __future__ import annotations

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
_ATTENTION_CHILDREN = {"ln_q", "ln_k", "attn_drop", "ln_inner", "out_proj", "out_drop"}
_ATTENTION_PARAMS = {"in_proj_weight", "in_proj_bias", "logit_scale", "head_scale"}


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


def _read_custom(i: int, block: nn.Module) -> Block:
    from open_clip.transformer import Attention as OpenClipAttention

    unknown = {name for name, _ in block.named_children()} - _CUSTOM_BLOCK_CHILDREN
    if unknown:
        raise UnsupportedModelError(f"block {i} has unknown sub-modules {sorted(unknown)}")
    attn = block.attn
    if not isinstance(attn, OpenClipAttention):
        raise UnsupportedModelError(f"block {i}.attn is {type(attn).__name__}, not open_clip's Attention")
    unknown = {n for n, _ in attn.named_children()} - _ATTENTION_CHILDREN
    unknown |= {n for n, _ in attn.named_parameters(recurse=False)} - _ATTENTION_PARAMS
    if unknown:
        raise UnsupportedModelError(f"block {i}.attn has unknown attributes {sorted(unknown)}")
    if attn.logit_scale is not None:
        raise UnsupportedModelError(
            f"block {i}.attn.logit_scale (scaled_cosine_attn) is not supported: open_clip 3.3.0's "
            "Attention.forward fails on it (torch.bmm on 4-D tensors), so it has no forward to match"
        )
    qw, qb, kw, kb, vw, vb = _per_head(attn.in_proj_weight, attn.in_proj_bias, attn.num_heads)
    head_scale = None if attn.head_scale is None else attn.head_scale.reshape(attn.num_heads)
    attention = Attention(
        qw,
        kw,
        vw,
        qb,
        kb,
        vb,
        attn.out_proj.weight,
        attn.out_proj.bias,
        scale=attn.scale,
        q_norm=optional_module(attn.ln_q),
        k_norm=optional_module(attn.ln_k),
        head_scale=head_scale,
        inner_norm=layer_norm_or_none(attn.ln_inner, f"block {i}.attn.ln_inner"),
    )
    return Block(
        norm1=block.ln_1,
        attention=attention,
        ls1=_layer_scale(block.ls_1, f"block {i} ls_1"),
        norm2=block.ln_2,
        mlp=block.mlp,
        ls2=_layer_scale(block.ls_2, f"block {i} ls_2"),
        post_attn_norm=layer_norm_or_none(block.ln_attn, f"block {i}.ln_attn"),
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
        elif type(block) is CustomResidualAttentionBlock:
            blocks.append(_read_custom(i, block))
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

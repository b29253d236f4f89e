"""Reader: a transformers (Hugging Face) vision tower as a `CanonicalViT`.

Families read (transformers 5.x class and attribute names), with the embedding each decomposes
(`hf_image_features`, which ``read_hf(model).forward(x)`` equals):

- ``CLIPModel``: ``get_image_features(pixel_values=x).pooler_output`` (in 5.x the method returns a
  ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the *projected* embedding);
  ``CLIPVisionModelWithProjection``: ``model(x).image_embeds``; ``CLIPVisionModel``:
  ``model(x).pooler_output`` (no projection). Read: ``embeddings`` (``CLIPVisionEmbeddings``: class,
  patch and position embeddings) and ``pre_layrnorm`` (the ``emb`` unit), ``CLIPEncoderLayer``
  (``layer_norm1``, ``self_attn`` = ``CLIPAttention`` with ``q_proj``/``k_proj``/``v_proj``/``out_proj``,
  ``layer_norm2``, ``mlp``), ``post_layernorm`` on the class token, ``visual_projection`` (no bias).
- ``BlipForImageTextRetrieval``: ``vision_proj(vision_model(x).last_hidden_state[:, 0])``. (Not
  ``pooler_output``: 5.x's ``BlipVisionModel`` applies ``post_layernorm`` to every token and then
  again to the pooled token.) Read: ``BlipVisionEmbeddings``, ``BlipEncoderLayer`` with
  ``BlipAttention`` (fused ``qkv``, ``projection``), ``post_layernorm`` (per token; a class-token
  readout), ``vision_proj`` (with bias).
- ``Dinov2Model`` and ``Dinov2WithRegistersModel``: ``model(x).pooler_output`` (= ``layernorm`` of
  the class token). Read: ``embeddings`` (class, register and position tokens), ``Dinov2Layer``
  (``norm1``, ``attention`` = ``Dinov2Attention`` with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` --
  5.x flattened the former ``attention.attention.query``/``attention.output.dense`` --,
  ``layer_scale1``/``layer_scale2`` (``lambda1``), ``norm2``, ``mlp`` = ``Dinov2MLP`` or
  ``Dinov2SwiGLUFFN``), ``layernorm``.
- ``ViTModel``: ``model(x).last_hidden_state[:, 0]`` (the class token after ``layernorm``; not the
  tanh ``pooler``). 5.x's ``ViTModel`` holds its ``ViTLayer`` s in ``model.layers`` (no encoder), and
  ``ViTLayer`` has ``layernorm_before``, ``attention`` = ``ViTAttention`` (``q_proj``/``k_proj``/
  ``v_proj``/``o_proj``), ``layernorm_after`` and ``mlp`` = ``ViTMLP`` (the branch only: the residual
  is added in ``ViTLayer``, no longer inside a ``ViTOutput``).
- ``SiglipModel`` / ``SiglipVisionModel``: ``vision_model(x).pooler_output``, i.e. the
  ``SiglipMultiheadAttentionPoolingHead`` (``probe``, ``attention`` = ``nn.MultiheadAttention``,
  ``layernorm``, ``mlp``) on ``post_layernorm(last_hidden_state)``: a ``map`` readout (the engine
  decomposes it once it supports ``pool="map"``). No class token: ``num_prefix_tokens=0``.

The attention implementation (``config._attn_implementation``: "eager" or "sdpa") does not
matter: the description computes attention itself. The model must be in eval mode (a model in
training mode raises ``ValueError``).

Refused with `UnsupportedModelError` naming the class or sub-module: every other model class
(``BlipModel``, ``Siglip2*``, ``ResNetModel``, ``SwinModel``, ...), subclasses of the classes above,
any layer, attention, MLP, embeddings or layer-scale class other than the family's own, unknown
sub-modules of a tower, layer, attention or pooling head, a SigLIP tower without its head
(``vision_use_head=False``), an ``nn.MultiheadAttention`` head with ``bias_k``/``add_zero_attn``/
separate kdim, and norms that are not LayerNorms.
"""

from __future__ import annotations

from collections.abc import Callable

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
)

__all__ = ["SUPPORTED_HF_CLASSES", "hf_image_features", "is_supported_hf", "read_hf"]

SUPPORTED_HF_CLASSES = (
    "CLIPModel",
    "CLIPVisionModelWithProjection",
    "CLIPVisionModel",
    "BlipForImageTextRetrieval",
    "Dinov2Model",
    "Dinov2WithRegistersModel",
    "ViTModel",
    "SiglipModel",
    "SiglipVisionModel",
)


def _name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _family(model: nn.Module) -> str:
    """The supported class name of `model` (exact class match), else UnsupportedModelError."""
    import transformers

    for name in SUPPORTED_HF_CLASSES:
        cls = getattr(transformers, name, None)
        if cls is not None and type(model) is cls:
            return name
    raise UnsupportedModelError(
        f"cannot read a model of class {_name(model)}; supported transformers classes (exactly): "
        + ", ".join(SUPPORTED_HF_CLASSES)
    )


def _expect(module: nn.Module, cls: type, where: str) -> None:
    if type(module) is not cls:
        raise UnsupportedModelError(f"{where} is {_name(module)}, not {cls.__module__}.{cls.__name__}")


def _children(module: nn.Module, allowed: set[str], where: str) -> None:
    unknown = {name for name, _ in module.named_children()} - allowed
    if unknown:
        raise UnsupportedModelError(f"{where} has unknown sub-modules {sorted(unknown)}")


def _layer_norm(module: nn.Module, where: str) -> nn.LayerNorm:
    norm = layer_norm_or_none(module, where)
    if norm is None:
        raise UnsupportedModelError(f"{where} is absent; a LayerNorm is required")
    return norm


def _split(linear: nn.Linear, heads: int) -> tuple[Tensor, Tensor | None]:
    """A (H*d, W) projection as weights (H, d, W) and bias (H, d): transformers' head-major view."""
    w = linear.weight.reshape(heads, -1, linear.weight.shape[1])
    b = None if linear.bias is None else linear.bias.reshape(heads, -1)
    return w, b


def _separate_attention(
    attn: nn.Module, heads: int, head_dim: int, scale: float, out: nn.Linear
) -> Attention:
    """q_proj/k_proj/v_proj Linear layers (CLIP, SigLIP, DINOv2, ViT) in per-head form."""
    (qw, qb), (kw, kb), (vw, vb) = (_split(getattr(attn, p), heads) for p in ("q_proj", "k_proj", "v_proj"))
    if qw.shape[1] != head_dim:
        raise UnsupportedModelError(f"{type(attn).__name__}: head width {qw.shape[1]} != head_dim {head_dim}")
    return Attention(qw, kw, vw, qb, kb, vb, out.weight, out.bias, scale=float(scale))


def _fused_attention(weight: Tensor, bias: Tensor | None, heads: int) -> list[Tensor | None]:
    """A fused (3*H*d, W) in-projection (q, k, v row blocks, each head-major) as q/k/v weights and biases."""
    inner = weight.shape[0] // 3
    out: list[Tensor | None] = []
    for j in range(3):
        out.append(weight[j * inner : (j + 1) * inner].reshape(heads, -1, weight.shape[1]))  # (H, d, W)
        out.append(None if bias is None else bias[j * inner : (j + 1) * inner].reshape(heads, -1))  # (H, d)
    return out


# --- families -----------------------------------------------------------------------------------


def _clip_blocks(tower: nn.Module, where: str) -> list[Block]:
    from transformers.models.clip import modeling_clip as m

    return _encoder_blocks(tower.encoder.layers, where, m.CLIPEncoderLayer, m.CLIPAttention, m.CLIPMLP)


def _encoder_blocks(layers, where: str, layer_cls: type, attn_cls: type, mlp_cls: type) -> list[Block]:
    """Blocks of CLIP-style encoder layers (CLIP, SigLIP): ``layer_norm1`` -> ``self_attn`` with
    separate q/k/v and ``out_proj`` -> ``layer_norm2`` -> ``mlp``, no layer scale."""
    blocks = []
    for i, layer in enumerate(layers):
        at = f"{where}.encoder.layers[{i}]"
        _expect(layer, layer_cls, at)
        _children(layer, {"self_attn", "layer_norm1", "mlp", "layer_norm2"}, at)
        attn = layer.self_attn
        _expect(attn, attn_cls, f"{at}.self_attn")
        _children(attn, {"q_proj", "k_proj", "v_proj", "out_proj"}, f"{at}.self_attn")
        _expect(layer.mlp, mlp_cls, f"{at}.mlp")
        blocks.append(
            Block(
                norm1=_layer_norm(layer.layer_norm1, f"{at}.layer_norm1"),
                attention=_separate_attention(attn, attn.num_heads, attn.head_dim, attn.scale, attn.out_proj),
                ls1=None,
                norm2=_layer_norm(layer.layer_norm2, f"{at}.layer_norm2"),
                mlp=layer.mlp,
                ls2=None,
            )
        )
    return blocks


def _read_clip(model: nn.Module, family: str) -> CanonicalViT:
    from transformers.models.clip import modeling_clip as m

    tower = model if family == "CLIPVisionModel" else model.vision_model
    where = "model" if family == "CLIPVisionModel" else "vision_model"
    _expect(tower, m.CLIPVisionModel, where)
    _children(tower, {"embeddings", "pre_layrnorm", "encoder", "post_layernorm"}, where)
    _expect(tower.embeddings, m.CLIPVisionEmbeddings, f"{where}.embeddings")
    _expect(tower.encoder, m.CLIPEncoder, f"{where}.encoder")
    pre = _layer_norm(tower.pre_layrnorm, f"{where}.pre_layrnorm")
    if family == "CLIPVisionModel":
        width = tower.config.hidden_size
        proj = torch.eye(width, device=pre.weight.device, dtype=pre.weight.dtype)
    else:
        if model.visual_projection.bias is not None:
            raise UnsupportedModelError("visual_projection has a bias; CLIP's has none")
        proj = model.visual_projection.weight.t()  # (W, D)

    def embed(images: Tensor) -> Tensor:
        return pre(tower.embeddings(images))  # (N, T, W)

    readout = Readout(
        pool="tok", norm=_layer_norm(tower.post_layernorm, f"{where}.post_layernorm"), proj=proj
    )
    dtype = tower.embeddings.patch_embedding.weight.dtype
    return CanonicalViT(Embed(embed, dtype), _clip_blocks(tower, where), readout, library="hf", name=family)


def _read_blip(model: nn.Module, family: str) -> CanonicalViT:
    from transformers.models.blip import modeling_blip as m

    tower = model.vision_model
    _expect(tower, m.BlipVisionModel, "vision_model")
    _children(tower, {"embeddings", "encoder", "post_layernorm"}, "vision_model")
    _expect(tower.embeddings, m.BlipVisionEmbeddings, "vision_model.embeddings")
    _expect(tower.encoder, m.BlipEncoder, "vision_model.encoder")
    blocks = []
    for i, layer in enumerate(tower.encoder.layers):
        at = f"vision_model.encoder.layers[{i}]"
        _expect(layer, m.BlipEncoderLayer, at)
        _children(layer, {"self_attn", "layer_norm1", "mlp", "layer_norm2"}, at)
        attn = layer.self_attn
        _expect(attn, m.BlipAttention, f"{at}.self_attn")
        _children(attn, {"dropout", "qkv", "projection"}, f"{at}.self_attn")
        _expect(layer.mlp, m.BlipMLP, f"{at}.mlp")
        qw, qb, kw, kb, vw, vb = _fused_attention(attn.qkv.weight, attn.qkv.bias, attn.num_heads)
        attention = Attention(
            qw, kw, vw, qb, kb, vb, attn.projection.weight, attn.projection.bias, scale=float(attn.scale)
        )
        blocks.append(
            Block(
                norm1=_layer_norm(layer.layer_norm1, f"{at}.layer_norm1"),
                attention=attention,
                ls1=None,
                norm2=_layer_norm(layer.layer_norm2, f"{at}.layer_norm2"),
                mlp=layer.mlp,
                ls2=None,
            )
        )
    readout = Readout(
        pool="tok",
        norm=_layer_norm(tower.post_layernorm, "vision_model.post_layernorm"),
        proj=model.vision_proj.weight.t(),  # (W, D)
        proj_bias=model.vision_proj.bias,
    )
    dtype = tower.embeddings.patch_embedding.weight.dtype
    return CanonicalViT(Embed(tower.embeddings, dtype), blocks, readout, library="hf", name=family)


def _read_dinov2(model: nn.Module, family: str) -> CanonicalViT:
    if family == "Dinov2Model":
        from transformers.models.dinov2 import modeling_dinov2 as m

        p = "Dinov2"
    else:
        from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as m

        p = "Dinov2WithRegisters"
    _children(model, {"embeddings", "encoder", "layernorm"}, "model")
    _expect(model.embeddings, getattr(m, f"{p}Embeddings"), "embeddings")
    _expect(model.encoder, getattr(m, f"{p}Encoder"), "encoder")
    scale_cls, drop_cls = getattr(m, f"{p}LayerScale"), getattr(m, f"{p}DropPath")
    mlps = (getattr(m, f"{p}MLP"), getattr(m, f"{p}SwiGLUFFN"))
    blocks = []
    for i, layer in enumerate(model.encoder.layer):
        at = f"encoder.layer[{i}]"
        _expect(layer, getattr(m, f"{p}Layer"), at)
        _children(
            layer, {"norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2"}, at
        )
        attn = layer.attention
        _expect(attn, getattr(m, f"{p}Attention"), f"{at}.attention")
        _children(attn, {"q_proj", "k_proj", "v_proj", "o_proj"}, f"{at}.attention")
        if type(layer.mlp) not in mlps:
            raise UnsupportedModelError(
                f"{at}.mlp is {_name(layer.mlp)}, not {' or '.join(c.__name__ for c in mlps)}"
            )
        if type(layer.drop_path) not in (nn.Identity, drop_cls):
            raise UnsupportedModelError(f"{at}.drop_path is {_name(layer.drop_path)}")
        for name in ("layer_scale1", "layer_scale2"):
            _expect(getattr(layer, name), scale_cls, f"{at}.{name}")
        blocks.append(
            Block(
                norm1=_layer_norm(layer.norm1, f"{at}.norm1"),
                attention=_separate_attention(
                    attn, attn.num_attention_heads, attn.head_dim, attn.scaling, attn.o_proj
                ),
                ls1=layer.layer_scale1.lambda1,
                norm2=_layer_norm(layer.norm2, f"{at}.norm2"),
                mlp=layer.mlp,
                ls2=layer.layer_scale2.lambda1,
            )
        )
    norm = _layer_norm(model.layernorm, "layernorm")
    width = model.config.hidden_size
    readout = Readout(
        pool="tok",
        norm=norm,
        proj=torch.eye(width, device=norm.weight.device, dtype=norm.weight.dtype),
        num_prefix_tokens=1 + int(getattr(model.config, "num_register_tokens", 0)),
    )
    dtype = model.embeddings.patch_embeddings.projection.weight.dtype
    return CanonicalViT(Embed(model.embeddings, dtype), blocks, readout, library="hf", name=family)


def _read_vit(model: nn.Module, family: str) -> CanonicalViT:
    from transformers.models.vit import modeling_vit as m

    _children(model, {"embeddings", "layers", "layernorm", "pooler"}, "model")
    _expect(model.embeddings, m.ViTEmbeddings, "embeddings")
    blocks = []
    for i, layer in enumerate(model.layers):
        at = f"layers[{i}]"
        _expect(layer, m.ViTLayer, at)
        _children(layer, {"attention", "layernorm_before", "layernorm_after", "mlp", "dropout"}, at)
        attn = layer.attention
        _expect(attn, m.ViTAttention, f"{at}.attention")
        _children(attn, {"q_proj", "k_proj", "v_proj", "o_proj"}, f"{at}.attention")
        _expect(layer.mlp, m.ViTMLP, f"{at}.mlp")
        blocks.append(
            Block(
                norm1=_layer_norm(layer.layernorm_before, f"{at}.layernorm_before"),
                attention=_separate_attention(
                    attn, attn.num_attention_heads, attn.head_dim, attn.scaling, attn.o_proj
                ),
                ls1=None,
                norm2=_layer_norm(layer.layernorm_after, f"{at}.layernorm_after"),
                mlp=layer.mlp,
                ls2=None,
            )
        )
    norm = _layer_norm(model.layernorm, "layernorm")
    width = model.config.hidden_size
    readout = Readout(
        pool="tok", norm=norm, proj=torch.eye(width, device=norm.weight.device, dtype=norm.weight.dtype)
    )
    dtype = model.embeddings.patch_embeddings.projection.weight.dtype
    return CanonicalViT(Embed(model.embeddings, dtype), blocks, readout, library="hf", name=family)


def _read_siglip_head(head: nn.Module) -> MapPool:
    from transformers.models.siglip import modeling_siglip as m

    where = "vision_model.head"
    _expect(head, m.SiglipMultiheadAttentionPoolingHead, where)
    _children(head, {"attention", "layernorm", "mlp"}, where)
    mha = head.attention
    _expect(mha, nn.MultiheadAttention, f"{where}.attention")
    if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
        raise UnsupportedModelError(
            f"{where}.attention: nn.MultiheadAttention with bias_k/add_zero_attn/separate kdim is not supported"
        )
    _expect(head.mlp, m.SiglipMLP, f"{where}.mlp")
    qw, qb, kw, kb, vw, vb = _fused_attention(mha.in_proj_weight, mha.in_proj_bias, mha.num_heads)
    attention = Attention(
        qw, kw, vw, qb, kb, vb, mha.out_proj.weight, mha.out_proj.bias, scale=mha.head_dim**-0.5
    )
    latent = head.probe.reshape(-1, head.probe.shape[-1])  # (Q, W)
    norm = _layer_norm(head.layernorm, f"{where}.layernorm")
    return MapPool(latent=latent, attention=attention, norm=norm, mlp=head.mlp, reduce="first")


def _read_siglip(model: nn.Module, family: str) -> CanonicalViT:
    from transformers.models.siglip import modeling_siglip as m

    tower = model if family == "SiglipVisionModel" else model.vision_model
    where = "model" if family == "SiglipVisionModel" else "vision_model"
    _expect(tower, m.SiglipVisionModel, where)
    _children(tower, {"embeddings", "encoder", "post_layernorm", "head"}, where)
    if not tower.use_head or getattr(tower, "head", None) is None:
        raise UnsupportedModelError(
            f"{where} has no pooling head (vision_use_head=False): no pooled embedding"
        )
    _expect(tower.embeddings, m.SiglipVisionEmbeddings, f"{where}.embeddings")
    _expect(tower.encoder, m.SiglipEncoder, f"{where}.encoder")
    blocks = _encoder_blocks(
        tower.encoder.layers, where, m.SiglipEncoderLayer, m.SiglipAttention, m.SiglipMLP
    )
    norm = _layer_norm(tower.post_layernorm, f"{where}.post_layernorm")
    width = tower.config.hidden_size
    readout = Readout(
        pool="map",
        norm=norm,
        proj=torch.eye(width, device=norm.weight.device, dtype=norm.weight.dtype),
        num_prefix_tokens=0,
        map_pool=_read_siglip_head(tower.head),
    )
    dtype = tower.embeddings.patch_embedding.weight.dtype
    return CanonicalViT(Embed(tower.embeddings, dtype), blocks, readout, library="hf", name=family)


_READERS: dict[str, Callable[[nn.Module, str], CanonicalViT]] = {
    "CLIPModel": _read_clip,
    "CLIPVisionModelWithProjection": _read_clip,
    "CLIPVisionModel": _read_clip,
    "BlipForImageTextRetrieval": _read_blip,
    "Dinov2Model": _read_dinov2,
    "Dinov2WithRegistersModel": _read_dinov2,
    "ViTModel": _read_vit,
    "SiglipModel": _read_siglip,
    "SiglipVisionModel": _read_siglip,
}


def read_hf(model: nn.Module) -> CanonicalViT:
    """Describe a transformers vision model as a `CanonicalViT` of its `hf_image_features`.

    ``read_hf(model).forward(x)`` equals ``hf_image_features(model, x)``. The description shares
    the model's tensors and modules.

    Args:
        model: one of `SUPPORTED_HF_CLASSES` (exactly that class), in eval mode.

    Raises:
        UnsupportedModelError: naming the class or sub-module that is not supported.
        ValueError: the model is in training mode.
    """
    family = _family(model)
    canonical = _READERS[family](model, family)
    if model.training:
        raise ValueError(f"{family} is in training mode (dropout, drop-path): call model.eval() first")
    return canonical


def is_supported_hf(model: nn.Module) -> bool:
    """Whether `read_hf` can describe `model` (no `UnsupportedModelError`; training mode aside)."""
    try:
        family = _family(model)
        _READERS[family](model, family)
    except UnsupportedModelError:
        return False
    return True


def _pooled(out) -> Tensor:
    """The tensor of a ``get_*_features`` result: 5.x returns a model output (``pooler_output``)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def hf_image_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """The reference image embedding (N, D) of a supported model, unnormalised.

    Per family (see the module docstring): CLIP ``get_image_features(...).pooler_output`` /
    ``image_embeds`` / ``pooler_output``; BLIP retrieval ``vision_proj(last_hidden_state[:, 0])``;
    DINOv2 ``pooler_output``; ViT ``last_hidden_state[:, 0]``; SigLIP the vision tower's
    ``pooler_output``.

    Raises:
        UnsupportedModelError: an unsupported class.
    """
    family = _family(model)
    x = pixel_values
    if family == "CLIPModel":
        return _pooled(model.get_image_features(pixel_values=x))
    if family == "CLIPVisionModelWithProjection":
        return model(pixel_values=x).image_embeds
    if family in ("CLIPVisionModel", "Dinov2Model", "Dinov2WithRegistersModel", "SiglipVisionModel"):
        return model(pixel_values=x).pooler_output
    if family == "BlipForImageTextRetrieval":
        return model.vision_proj(model.vision_model(pixel_values=x).last_hidden_state[:, 0])
    if family == "ViTModel":
        return model(pixel_values=x).last_hidden_state[:, 0]
    if family == "SiglipModel":
        return model.vision_model(pixel_values=x).pooler_output
    raise AssertionError(family)  # pragma: no cover

"""A stand-in for open_clip 4.x's vision-tower attention, on top of the installed open_clip 3.3.0.

Mirrors ``src/open_clip/transformer.py`` of open_clip's main branch as stored at commit
086ba09fe9936820eb57a13415e3b9544fa0b190 (github.com/mlfoundations/open_clip; read through the
code index, not copied). Only what 4.x changes relative to 3.3.0 for a ViT image tower is mirrored:

- ``Attention`` gains ``kdim``/``vdim``: with kdim == vdim == dim it keeps the fused
  ``in_proj_weight`` (3W, W) and sets ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` to plain
  ``None`` attributes; otherwise ``in_proj_weight`` is ``None`` and the three are separate
  parameters named as in ``nn.MultiheadAttention``. ``in_proj_bias`` stays fused (3W,) in both
  layouts and is split in three for separate weights. Here ``separate_qkv=True`` forces the separate
  layout at kdim == vdim == dim, so that 4.x's self-attention path over separate weights is exercised
  (main takes it whenever ``in_proj_weight`` is None).
- ``Attention.forward(x, k_x=None, v_x=None, attn_mask=None)``: the fused projection for
  self-attention, split weights when ``k_x``/``v_x`` are given; heads reshaped with an explicit
  ``head_dim`` (query and key lengths may differ).
- scaled cosine attention works (3.3.0's ``torch.bmm`` on 4-D tensors fails): logits are
  ``normalize(q) @ normalize(k).T * exp(clamp(logit_scale, max=logit_scale_max))`` with
  ``logit_scale`` (H, 1, 1), then softmax and ``@ v``; ``ln_q``/``ln_k`` are not applied on that path
  (the constructor forbids combining them anyway).
- the non-cosine path calls SDPA with an explicit ``scale=self.scale``; the flag is ``use_sdpa``
  (3.3.0: ``use_fsdpa``); init is ``nn.MultiheadAttention``'s (xavier-uniform in-projection, zero
  biases).
- ``ResidualAttentionBlock`` holds this ``Attention`` instead of ``nn.MultiheadAttention`` and its
  ``attention`` calls ``self.attn(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)`` with ``k_x``/``v_x``
  defaulting to ``q_x`` (so the split-weight path runs, numerically the same as the fused one).

Not mirrored (unchanged for a ViT image tower, or outside what a reader sees): ``CustomResidualAttentionBlock``
(only its ``batch_first`` argument is gone), the transformer's block selection, ``VisionTransformer``
(new ``pool_type='avg_all'``, CoCa paper poolers with ``proj=None``; the reader refuses both),
``AttentionalPooler`` (now this ``Attention`` with kdim/vdim), mask handling (boolean masks now mean
"keep"), and the text towers.

How it is built: a 3.3.0 ``VisionTransformer`` whose blocks' ``attn`` is replaced by
`StandinAttention` (a subclass of 3.3.0's ``open_clip.transformer.Attention``, so that
``isinstance`` checks written against open_clip's class hold as they will for 4.x's) and, for the
default ``ResidualAttentionBlock``, whose ``attention`` method is rebound on the instance to 4.x's
call. The block classes are open_clip's own, so a reader's exact-type checks see what they will see
under 4.x.
"""

from __future__ import annotations

import math
import types

import open_clip.transformer as oct
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StandinAttention", "build_standin_vit", "randomise_standin_"]


class StandinAttention(oct.Attention):
    """open_clip 4.x's ``Attention``, as described in this module's docstring."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        kdim: int | None = None,
        vdim: int | None = None,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scaled_cosine: bool = False,
        scale_heads: bool = False,
        inner_norm: bool = False,
        logit_scale_max: float = math.log(1.0 / 0.01),
        norm_layer: type[nn.Module] = oct.LayerNormFp32,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        use_sdpa: bool = True,
        separate_qkv: bool = False,
    ):
        nn.Module.__init__(self)  # 3.3.0's __init__ would build its own (fused-only) parameters
        assert not (scaled_cosine and qk_norm), "scaled cosine and qk_norm exclude each other"
        assert dim % num_heads == 0
        self.scaled_cosine, self.scale_heads = scaled_cosine, scale_heads
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.logit_scale_max = logit_scale_max
        self.use_sdpa = use_sdpa
        kdim, vdim = kdim or dim, vdim or dim
        if kdim == dim and vdim == dim and not separate_qkv:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        else:
            self.in_proj_weight = None
            self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
            self.k_proj_weight = nn.Parameter(torch.empty(dim, kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(dim, vdim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim)) if qkv_bias else None
        self.ln_q = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.ln_k = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.logit_scale = (
            nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0))) if scaled_cosine else None
        )
        self.attn_drop = nn.Dropout(attn_drop)
        self.head_scale = nn.Parameter(torch.ones(num_heads, 1, 1)) if scale_heads else None
        self.ln_inner = norm_layer(dim) if inner_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)
        self.out_drop = nn.Dropout(proj_drop)
        with torch.no_grad():
            for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                if w is not None:
                    nn.init.xavier_uniform_(w)
            if self.in_proj_bias is not None:
                self.in_proj_bias.zero_()
            self.out_proj.bias.zero_()

    def _projections(
        self, x: Tensor, k_x: Tensor | None, v_x: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if k_x is None and v_x is None and self.in_proj_weight is not None:
            return F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # one fused matmul
        k_x = x if k_x is None else k_x
        v_x = x if v_x is None else v_x
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        if self.in_proj_weight is not None:
            weights = self.in_proj_weight.chunk(3, dim=0)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return tuple(F.linear(t, w, b) for t, w, b in zip((x, k_x, v_x), weights, biases, strict=True))

    def forward(
        self,
        x: Tensor,
        k_x: Tensor | None = None,
        v_x: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        n, lq, c = x.shape
        q, k, v = (
            t.reshape(n, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, L, d)
            for t in self._projections(x, k_x, v_x)
        )
        if self.logit_scale is not None:
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)  # (N, H, Lq, Lk)
            logits = logits * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            if attn_mask is not None:
                logits = logits + attn_mask.to(logits.dtype)
            out = self.attn_drop(logits.softmax(dim=-1)) @ v
        else:
            q, k = self.ln_q(q), self.ln_k(k)
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=drop, scale=self.scale
            )
        if self.head_scale is not None:
            out = out * self.head_scale
        out = out.transpose(1, 2).reshape(n, lq, c)
        return self.out_drop(self.out_proj(self.ln_inner(out)))


def _attention_4x(self, q_x, k_x=None, v_x=None, attn_mask=None):
    """4.x's ``ResidualAttentionBlock.attention``: keyword call into open_clip's ``Attention``."""
    k_x = q_x if k_x is None else k_x
    v_x = q_x if v_x is None else v_x
    attn_mask = None if attn_mask is None else attn_mask.to(q_x.dtype)
    return self.attn(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)


def randomise_standin_(visual: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise what open_clip initialises to 0/1 (biases, norm affines, LayerScale, head_scale)
    and the cosine logit scales; one head of each block is put above the clamp (log 100)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in visual.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("bias", "in_proj_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif leaf == "weight" and p.ndim == 1:  # LayerNorm gammas
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif leaf in ("gamma", "head_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif leaf == "logit_scale":
                p.copy_(math.log(10.0) + torch.randn(p.shape, generator=g))
                p[0] = math.log(1.0 / 0.01) + 0.5  # clamped
    return visual


def build_standin_vit(
    *,
    seed: int = 0,
    separate_qkv: bool = False,
    qk_norm: bool = False,
    scaled_cosine: bool = False,
    scale_heads: bool = False,
    scale_attn_inner: bool = False,
    block_type: str | None = None,
    **vision,
) -> nn.Module:
    """A tiny randomised open_clip ``VisionTransformer`` with 4.x attention, in eval mode.

    Args:
        seed: weights seed.
        separate_qkv: 4.x's separate ``q/k/v_proj_weight`` layout instead of ``in_proj_weight``.
        qk_norm, scaled_cosine, scale_heads, scale_attn_inner: the attention options (open_clip's
            ``qk_norm``, ``scaled_cosine_attn``, ``scale_heads``, ``scale_attn_inner``).
        block_type: ``"default"`` (``ResidualAttentionBlock``) or ``"custom"``; None: custom when an
            attention option or ``scale_attn``/``scale_fc`` asks for it, as open_clip picks.
        **vision: other ``VisionTransformer`` arguments (``scale_attn``, ``scale_fc``,
            ``ls_init_value``, ``pool_type``, ``final_ln_after_pool``, sizes, ...).
    """
    torch.manual_seed(seed)
    attn_opts = dict(
        qk_norm=qk_norm, scaled_cosine=scaled_cosine, scale_heads=scale_heads, inner_norm=scale_attn_inner
    )
    if block_type is None:
        custom = any(attn_opts.values()) or vision.get("scale_attn") or vision.get("scale_fc")
        block_type = "custom" if custom else "default"
    if block_type == "default" and any(attn_opts.values()):
        raise ValueError("ResidualAttentionBlock takes no attention options; use block_type='custom'")
    cfg = dict(image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=4.0, output_dim=48)
    cfg.update(vision)
    visual = oct.VisionTransformer(block_type=block_type, **cfg)
    width, heads = cfg["width"], cfg["heads"]
    for block in visual.transformer.resblocks:
        block.attn = StandinAttention(
            width, heads, norm_layer=oct.LayerNorm, separate_qkv=separate_qkv, **attn_opts
        )
        if type(block) is oct.ResidualAttentionBlock:
            block.attention = types.MethodType(_attention_4x, block)
    return randomise_standin_(visual, seed).eval()

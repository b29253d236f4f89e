"""The exact decomposition engine on a `CanonicalViT`.

Splits ``canonical.forward(images)`` into the direct contributions of its residual units
(``emb``, ``l{l}.mlp``, ``l{l}.h{h}``; names from `UnitLayout`), read at the readout tokens.
Every LayerNorm met after the residual stream is linear once its per-token statistics are
frozen, so the split is exact:

- an inner norm over the concatenated heads (``ln_inner``) becomes, per head, the head's slice
  of ``W_O diag(gamma) C`` (C centres over the H*d features) applied to ``a_h / sigma_inner``;
  its beta goes through ``W_O`` into the layer's constant;
- a norm after the attention (``ln_attn``) becomes ``diag(gamma) C`` on each head's map, with the
  head's coordinates divided by that token's sigma; the layer's constant then has a fixed part
  (beta) and a part scaled by 1/sigma per image (gamma times the centred out-projection bias);
- the final norm is linearised as `residual_lightning.units` does, under both conventions
  (``default``: own-mean centring, constants into ``emb``; ``equal_share``: the authors' equal
  shares, heads carry 3 extra compact coordinates). Under ``equal_share`` the per-image part of a
  layer's constant (only present with ``ln_attn``, which the authors' models do not have) goes to
  ``emb``: the 3 shared extra coordinates have no room for it, and its fixed part is shared over
  the heads as the out-projection bias is.

Head coordinates include ``head_scale``. Letters as in `residual_lightning.units`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual_lightning.backbones.canonical import Block, CanonicalViT, UnsupportedModelError
from residual_lightning.contributions import CONVENTIONS, Contributions, Convention, UnitContributions

__all__ = ["decompose", "decompose_compact"]


def _affine(norm: nn.LayerNorm, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(gamma, beta) of a LayerNorm in float32 (ones / zeros when it has no affine)."""
    gamma = norm.weight.float() if norm.weight is not None else torch.ones(width, device=device)
    beta = norm.bias.float() if norm.bias is not None else torch.zeros(width, device=device)
    return gamma, beta


def _inv_sigma(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """1 / sigma per token (..., 1), as the LayerNorm computes it, in float32."""
    if len(norm.normalized_shape) != 1:
        raise ValueError(f"a LayerNorm over {tuple(norm.normalized_shape)} cannot be linearised per token")
    x = x.float()
    return torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)


def _block_maps(block: Block, width: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fixed per-head maps into the stream, the fixed constant, and the per-image constant direction.

    Returns (H, W, d) maps (head h's coordinates -> stream), a (W,) constant, and a (W,) direction
    that is scaled by each token's 1/sigma of ``post_attn_norm`` (None without that norm). float32.
    """
    attn = block.attention
    heads, d = attn.heads, attn.head_width
    w_o = attn.out_weight.float()  # (W, H*d)
    dev = w_o.device
    b = attn.out_bias.float() if attn.out_bias is not None else torch.zeros(width, device=dev)  # (W,)
    if attn.inner_norm is not None:
        g_i, b_i = _affine(attn.inner_norm, heads * d, dev)
        b = w_o @ b_i + b
        w_o = w_o * g_i  # (W, H*d)
        w_o = w_o - w_o.mean(1, keepdim=True)  # centring over the H*d inputs
    direction = None
    if block.post_attn_norm is not None:
        g_a, b_a = _affine(block.post_attn_norm, width, dev)
        w_o = g_a[:, None] * (w_o - w_o.mean(0, keepdim=True))  # centring over the W outputs
        direction = g_a * (b - b.mean())
        b = b_a
    if block.ls1 is not None:
        ls = block.ls1.float()
        w_o, b = ls[:, None] * w_o, ls * b
        direction = None if direction is None else ls * direction
    maps = w_o.reshape(width, heads, d).permute(1, 0, 2)  # (H, W, d)
    return maps, b, direction


def _run(canonical: CanonicalViT, images: Tensor) -> dict[str, Tensor]:
    """One forward pass collecting each unit's value at the readout tokens (float32).

    Returns ``emb`` (N, R, W), ``mlps`` (N, L, R, W), ``coords`` (N, L, R, H*d) head
    coordinates (context over the per-token sigmas of the attention's norms), ``scales``
    (N, L, R, 1) the 1/sigma of ``post_attn_norm`` (ones without it) and ``stream`` (N, R, W).

    In the last block only the readout rows are computed (queries, out-projection, MLP): for a
    ``tok`` readout that is the CLS row alone, which makes the pass cheaper than the model's own
    forward. Every kept value is a copy, not a view, so no layer's (N, T, W) tensors stay alive.
    """
    readout = canonical.readout
    x = canonical.embed(images)  # (N, T, W)
    emb = readout.tokens(x).float().clone()
    mlps, coords, scales = [], [], []
    last = len(canonical.blocks) - 1
    for i, block in enumerate(canonical.blocks):
        attn = block.attention
        rows = readout.rows if i == last else None  # query rows this block must produce
        ctx = attn.context(block.norm1(x), rows)  # (N, H, Tq, d)
        x = x if rows is None else x[:, rows]  # (N, Tq, W)
        n, t, _ = x.shape
        ctx = ctx.transpose(1, 2).reshape(n, t, -1)  # (N, Tq, H*d)
        coord = ctx.float()
        pre = ctx
        if attn.inner_norm is not None:
            coord = coord * _inv_sigma(ctx, attn.inner_norm)
            pre = attn.inner_norm(ctx)
        a = torch.nn.functional.linear(pre, attn.out_weight, attn.out_bias)  # (N, Tq, W)
        scale = torch.ones_like(coord[..., :1])  # (N, Tq, 1)
        if block.post_attn_norm is not None:
            scale = _inv_sigma(a, block.post_attn_norm)
            coord = coord * scale
            a = block.post_attn_norm(a)
        x = x + (a * block.ls1 if block.ls1 is not None else a)
        mlp_out = block.mlp_branch(x)  # (N, Tq, W)
        x = x + mlp_out
        read = readout.tokens if rows is None else readout.pool_rows
        coords.append(read(coord).clone())
        scales.append(read(scale).clone())
        mlps.append(read(mlp_out).float().clone())
    return {
        "emb": emb,
        "mlps": torch.stack(mlps, 1),  # (N, L, R, W)
        "coords": torch.stack(coords, 1),  # (N, L, R, H*d)
        "scales": torch.stack(scales, 1),  # (N, L, R, 1)
        "stream": (readout.tokens(x) if last < 0 else readout.pool_rows(x)).float(),  # (N, R, W)
    }


def decompose_compact(
    canonical: CanonicalViT, images: Tensor, convention: Convention = "default"
) -> Contributions:
    """Exact compact contributions of ``canonical.forward(images)``.

    Args:
        canonical: the model's description (`read_open_clip`, ...), its modules in eval mode.
        images: (N, C, S, S) preprocessed images.
        convention: ``"default"`` or ``"equal_share"`` (see `residual_lightning.units`).

    Raises:
        ValueError: an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    if canonical.readout.pool == "map":
        raise UnsupportedModelError(
            f"{canonical.library} {canonical.name}: attention-pooled (MAP) readouts are not decomposed yet"
        )
    layout = canonical.layout(convention)
    acts = _run(canonical, images)
    with torch.autocast(device_type=images.device.type, enabled=False):
        return _linearise(canonical, layout, acts, convention)


def _linearise(canonical: CanonicalViT, layout, acts: dict, convention: str) -> Contributions:
    """Split the final LayerNorm and projection over the units (float32), as `units` documents."""
    readout, width = canonical.readout, layout.width
    stream = acts["stream"]  # (N, R, W)
    gamma, beta = _affine(readout.norm, width, stream.device)
    proj = readout.proj.float()  # (W, D)
    gp = gamma[:, None] * proj  # (W, D)
    beta_p = beta @ proj  # (D,)
    if readout.proj_bias is not None:
        beta_p = beta_p + readout.proj_bias.float()
    mu = stream.mean(-1, keepdim=True)  # (N, R, 1)
    inv_sigma = _inv_sigma(stream, readout.norm)  # (N, R, 1)
    per_block = [_block_maps(b, width) for b in canonical.blocks]
    head_w = torch.stack([m for m, _, _ in per_block])  # (L, H, W, d)
    head_b = torch.stack([b for _, b, _ in per_block])  # (L, W)
    dirs = torch.stack([torch.zeros_like(b) if v is None else v for _, b, v in per_block])  # (L, W)
    # The per-image part of each layer's constant, over the final sigma, summed over layers.
    varying = torch.einsum("nlrs,lw->nrw", acts["scales"], dirs) * inv_sigma  # (N, R, W)
    layers, heads, d = layout.layers, layout.heads, layout.head_width

    def centre(v: Tensor) -> Tensor:
        return v - v.mean(-1, keepdim=True) if convention == "default" else v

    emb_v = acts["emb"] * inv_sigma  # (N, R, W)
    mlp_v = acts["mlps"] * inv_sigma[:, None]  # (N, L, R, W)
    y = (acts["coords"] * inv_sigma[:, None]).mean(2)  # (N, L, H*d)
    y = y.reshape(y.shape[0], layers, heads, d)  # (N, L, H, d)
    cmaps = head_w - head_w.mean(2, keepdim=True) if convention == "default" else head_w
    maps = torch.einsum("lhwk,wd->lhdk", cmaps, gp)  # (L, H, D, d)

    if convention == "default":
        bias_v = head_b.sum(0) * inv_sigma + varying  # (N, R, W)
        emb = centre(emb_v + bias_v).mean(1) @ gp + beta_p  # (N, D)
        mlps = centre(mlp_v).mean(2) @ gp  # (N, L, D)
        heads_y = y
    else:
        share = 1.0 / (2 * layers + 1)
        share_h = share / heads
        mu_sigma = mu * inv_sigma  # (N, R, 1)
        g = gamma @ proj  # (D,)
        emb = (emb_v + varying).mean(1) @ gp - share * mu_sigma.mean(1) * g + share * beta_p  # (N, D)
        mlps = mlp_v.mean(2) @ gp - share * mu_sigma.mean(1)[:, None] * g + share * beta_p  # (N, L, D)
        n = y.shape[0]
        inv_m, mu_m = inv_sigma.mean((1, 2)), mu_sigma.mean((1, 2))  # (N,)
        extra_y = torch.stack([inv_m, mu_m, torch.ones_like(mu_m)], -1)  # (N, 3)
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


def decompose(
    canonical: CanonicalViT, images: Tensor, convention: Convention = "default"
) -> UnitContributions:
    """Exact (N, U, D) unit contributions; ``contributions.sum(1)`` equals ``canonical.forward(images)``.

    Args:
        canonical: the model's description.
        images: (N, C, S, S) preprocessed images.
        convention: ``"default"`` or ``"equal_share"``.
    """
    compact = decompose_compact(canonical, images, convention)
    return UnitContributions(contributions=compact.expand(), names=compact.names)

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

MAP readouts (``Readout.pool == "map"``: a per-token final norm, then a `MapPool` over the
tokens after its ``num_prefix_tokens``) are split the same way per token: with each token's final
mean and sigma, the pool's attention weights (one row per pool head and latent query, summing to
one) and the sigma of the pool's inner norm (if any) frozen per image, a unit's per-token stream
values map linearly through the final norm, the pool's value projection, the attention weights,
``head_scale``, the inner norm, the out-projection, the mean over the latent queries (or query 0)
and the readout projection. The pool's MLP branch ``mlp(norm(p))`` is not linear: it is one more
unit, ``pool.mlp`` (`Readout.pooler_units`, after the heads; absent when the pool has no MLP),
stored in ``Contributions.extra``. A head has no compact form through the pool (the pool mixes
its per-token outputs with per-pool-head weights), so heads are stored in full: ``heads`` is
(N, L, H, D) and ``head_maps`` the identity expanded over (L, H) (a view), and the layout has
``compact=False``. The per-token values of every unit (N, L, T, W) are held once (as for
per-token-normed average pools); the pool part is applied layer by layer, a head's fixed maps
folded into the pool's value projection first, so nothing per head is materialised per token.
Constants:

- ``default``: every unit is centred by its own per-token mean; the constants (the final beta
  through the value projection plus its bias, which pass unchanged as the attention weights sum
  to one; the inner norm's beta; the out-projection bias; the readout projection's bias; the
  blocks' biases as above) go into ``emb``;
- ``equal_share``: per token, the final norm's mean term ``-gamma mu / sigma`` is shared as at one
  token (1/(2L+1) to ``emb`` and each MLP, 1/((2L+1)H) to each head), and so is the whole
  constant above (the final beta and every bias of the pool and projection, which per image are
  one (D,) vector); each layer's out-projection bias goes to its heads in equal parts (over each
  token's sigma, then through the pool); the per-image part of a layer's constant (``ln_attn``)
  goes to ``emb``. ``pool.mlp`` carries its own output only.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from residual_lightning.backbones.canonical import Block, CanonicalViT, MapPool
from residual_lightning.contributions import (
    CONVENTIONS,
    Contributions,
    Convention,
    UnitContributions,
    UnitLayout,
)

__all__ = ["decompose", "decompose_compact", "images_per_pass"]

# Tokens in one pass through the blocks on a CPU (16 ViT-B/16 images of 197 tokens): bounds the
# per-token activations held at once (a 39 MB MLP hidden layer in float32 at width 768).
CPU_TOKENS_PER_PASS = 16 * 197


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


def _run(canonical: CanonicalViT, x: Tensor) -> dict[str, Tensor]:
    """One forward pass from the embedded tokens x (N, T, W), collecting each unit's value at the
    readout tokens (float32).

    Returns ``emb`` (N, R, W), ``mlps`` (N, L, R, W), ``coords`` (N, L, R, H*d) head
    coordinates (context over the per-token sigmas of the attention's norms), ``scales``
    (N, L, R, 1) the 1/sigma of ``post_attn_norm`` (ones without it) and ``stream`` (N, R, W).

    In the last block only the readout rows are computed (queries, out-projection, MLP): for a
    ``tok`` readout that is the CLS row alone, which makes the pass cheaper than the model's own
    forward. Every kept value is a copy, not a view, so no layer's (N, T, W) tensors stay alive.
    """
    readout = canonical.readout
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
    final = readout.tokens(x) if last < 0 else readout.pool_rows(x)  # (N, R, W)
    acts = {
        "emb": emb,
        "mlps": torch.stack(mlps, 1),  # (N, L, R, W)
        "coords": torch.stack(coords, 1),  # (N, L, R, H*d)
        "scales": torch.stack(scales, 1),  # (N, L, R, 1)
        "stream": final.float(),  # (N, R, W)
    }
    if readout.pool == "map":
        acts.update(_run_pool(readout.map_pool, readout.norm(final)))
    return acts


def _run_pool(pool: MapPool, normed: Tensor) -> dict[str, Tensor]:
    """The frozen quantities of a MAP pool over the normed readout tokens (N, R, W), in the model's dtype.

    Returns ``pool_attn`` (N, H', Q', R) the pool's attention weights, ``pool_inv_sigma`` (N, Q')
    the 1/sigma of its inner norm (ones without one) and ``pool_mlp`` (N, W) its MLP branch after
    the reduction over the latent queries (absent without an MLP); Q' is 1 for ``reduce="first"``
    (only latent query 0 is read), Q otherwise. float32.
    """
    attn = pool.attention
    n, r, w = normed.shape
    latent = pool.latent.to(normed.dtype).reshape(1, -1, w).expand(n, -1, -1)  # (N, Q, W)
    queries = 1 if pool.reduce == "first" else latent.shape[1]
    q = attn.project(latent[:, :queries], "q").float()  # (N, H', Q', d)
    k = attn.project(normed, "k", slice(0, r)).float()  # (N, H', R, d)
    with torch.autocast(device_type=normed.device.type, enabled=False):  # frozen in float32
        weights = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # (N, H', Q', R)
    out = {"pool_attn": weights}
    if attn.inner_norm is not None:
        ctx = attn.context(normed, query_tokens=latent[:, :queries])  # (N, H', Q', d)
        ctx = ctx.transpose(1, 2).reshape(n, queries, -1)  # (N, Q', H'*d)
        out["pool_inv_sigma"] = _inv_sigma(ctx, attn.inner_norm)[..., 0]  # (N, Q')
    else:
        out["pool_inv_sigma"] = torch.ones(n, queries, device=normed.device)
    if pool.mlp is not None:
        p = pool.attend(normed)  # (N, Q, W)
        m = pool.mlp(pool.norm(p) if pool.norm is not None else p)  # (N, Q, W)
        out["pool_mlp"] = (m[:, 0] if pool.reduce == "first" else m.mean(1)).float()  # (N, W)
    return out


def images_per_pass(tokens: Tensor) -> int:
    """Images per pass through the blocks by default, for embedded tokens (N, T, W): all of them
    on an accelerator; on a CPU as many as hold `CPU_TOKENS_PER_PASS` tokens, at least one."""
    if tokens.device.type != "cpu":
        return max(1, tokens.shape[0])
    return max(1, CPU_TOKENS_PER_PASS // tokens.shape[1])


def _run_in_passes(canonical: CanonicalViT, images: Tensor, per_pass: int | None) -> dict[str, Tensor]:
    """`_run` over slices of at most `per_pass` images (None: `images_per_pass`), concatenated
    (every value is per image); the patch embedding runs once on the whole batch."""
    x = canonical.embed(images)  # (N, T, W)
    per_pass = per_pass or images_per_pass(x)
    if x.shape[0] <= per_pass:
        return _run(canonical, x)
    parts = [_run(canonical, x[i : i + per_pass]) for i in range(0, x.shape[0], per_pass)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def decompose_compact(
    canonical: CanonicalViT,
    images: Tensor,
    convention: Convention = "default",
    per_pass: int | None = None,
) -> Contributions:
    """Exact compact contributions of ``canonical.forward(images)``.

    For a MAP readout the heads are in the full form and ``pool.mlp`` is in ``extra`` (see the
    module docstring); `Contributions.embedding` and `Contributions.expand` include it.

    Args:
        canonical: the model's description (`read_open_clip`, ...), its modules in eval mode.
        images: (N, C, S, S) preprocessed images.
        convention: ``"default"`` or ``"equal_share"`` (see `residual_lightning.units`).
        per_pass: images per forward pass (None: `images_per_pass`). Images never interact, so
            the result does not depend on it beyond float rounding; smaller passes bound the
            per-token activations held at once (on a CPU they cost no speed: the matmuls of
            3,152 tokens are as efficient as those of twice as many).

    Raises:
        ValueError: an unknown convention, or a `per_pass` that is not a positive integer.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    if per_pass is not None and (isinstance(per_pass, bool) or not isinstance(per_pass, int) or per_pass < 1):
        raise ValueError(f"per_pass must be a positive number of images, got {per_pass!r}")
    layout = _layout(canonical, convention)
    acts = _run_in_passes(canonical, images, per_pass)
    with torch.autocast(device_type=images.device.type, enabled=False):
        if canonical.readout.pool == "map":
            return _linearise_map(canonical, layout, acts, convention)
        return _linearise(canonical, layout, acts, convention)


def _layout(canonical: CanonicalViT, convention: str) -> UnitLayout:
    """The model's `UnitLayout`, with the readout's pooler units and, for MAP, the full head form."""
    layout = canonical.layout(convention)
    readout = canonical.readout
    if readout.pool != "map":
        return layout
    return replace(layout, pooler_units=readout.pooler_units, compact=False)


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


def _linearise_map(canonical: CanonicalViT, layout: UnitLayout, acts: dict, convention: str) -> Contributions:
    """Split a MAP readout over the units (float32): per-token final norm, pool, projection.

    Every map between a unit's per-token stream value and the embedding is linear once the
    per-token sigmas, the pool's attention weights and its inner norm's sigmas are frozen; it is
    applied per unit kind without materialising (N, T, W) per head. Heads come out in the full
    (N, L, H, D) form with identity head maps (a view).
    """
    readout, width = canonical.readout, layout.width
    pool = readout.map_pool
    attn = pool.attention
    stream = acts["stream"]  # (N, R, W)
    dev = stream.device
    n, layers, heads = stream.shape[0], layout.layers, layout.heads
    gamma, beta = _affine(readout.norm, width, dev)
    mu = stream.mean(-1, keepdim=True)  # (N, R, 1)
    inv_sigma = _inv_sigma(stream, readout.norm)  # (N, R, 1)
    weights = acts["pool_attn"]  # (N, G, Q', R): G pool heads
    inv_inner = acts["pool_inv_sigma"]  # (N, Q')
    pool_heads, pool_d = attn.heads, attn.head_width
    inner = pool_heads * pool_d

    # Fixed maps. In: a token's stream vector z (already over its sigma) -> pool values Vg z.
    v_w = attn.v_weight.float().reshape(inner, -1)  # (G*e, W)
    v_b = attn.v_bias.float().reshape(-1) if attn.v_bias is not None else torch.zeros(inner, device=dev)
    vg = (v_w * gamma).reshape(pool_heads, pool_d, width)  # (G, e, W)
    # Out: a latent query's context (G*e) -> embedding: head_scale, inner norm (times the frozen
    # 1/sigma of that query), out-projection, readout projection.
    proj = readout.proj.float()  # (W, D)
    w_o = attn.out_weight.float()  # (W, G*e)
    b_o = attn.out_bias.float() if attn.out_bias is not None else torch.zeros(w_o.shape[0], device=dev)
    if attn.inner_norm is not None:
        g_i, b_i = _affine(attn.inner_norm, inner, dev)
        b_o = w_o @ b_i + b_o
        w_o = w_o * g_i
        w_o = w_o - w_o.mean(1, keepdim=True)  # centring over the G*e inputs
    if attn.head_scale is not None:
        w_o = w_o * attn.head_scale.float().repeat_interleave(pool_d)
    out_map = w_o.T @ proj  # (G*e, D)
    out_b = b_o @ proj  # (D,)
    if readout.proj_bias is not None:
        out_b = out_b + readout.proj_bias.float()

    def out(ctx: Tensor) -> Tensor:
        """(N, B, Q', G*e) contexts -> (N, B, D), over the queries' inner sigmas and reduced."""
        return ((ctx * inv_inner[:, None, :, None]) @ out_map).mean(2)

    def through(z: Tensor) -> Tensor:
        """(N, B, R, W) per-token stream vectors over sigma -> (N, B, D), exactly linear."""
        mixed = torch.einsum("ngqr,nbrw->nbgqw", weights, z)  # (N, B, G, Q', W)
        ctx = torch.einsum("gew,nbgqw->nbqge", vg, mixed)  # (N, B, Q', G, e)
        return out(ctx.flatten(-2))

    def through_outer(scalars: Tensor, vectors: Tensor) -> Tensor:
        """`through` of the per-token vectors ``scalars[n, r] * vectors[b]``: (N, R), (B, W) -> (N, B, D)."""
        mixed = torch.einsum("ngqr,nr->ngq", weights, scalars)  # (N, G, Q')
        ctx = torch.einsum("ngq,gew,bw->nbqge", mixed, vg, vectors)  # (N, B, Q', G, e)
        return out(ctx.flatten(-2))

    def centre(v: Tensor) -> Tensor:
        return v - v.mean(-1, keepdim=True) if convention == "default" else v

    per_block = [_block_maps(b, width) for b in canonical.blocks]
    dirs = torch.stack([torch.zeros_like(b) if v is None else v for _, b, v in per_block])  # (L, W)
    varying = torch.einsum("nlrs,lw->nrw", acts["scales"], dirs) * inv_sigma  # (N, R, W)
    # The constant: beta through the values (the attention weights sum to one), the biases.
    const = out((v_w @ beta + v_b).expand(n, 1, inv_inner.shape[1], inner))[:, 0] + out_b  # (N, D)

    mlps = torch.stack(
        [through(centre(acts["mlps"][:, i : i + 1] * inv_sigma[:, None]))[:, 0] for i in range(layers)], 1
    )  # (N, L, D)
    head_out = []
    for i, (maps, _, _) in enumerate(per_block):
        cmaps = maps - maps.mean(1, keepdim=True) if convention == "default" else maps  # (H, W, d)
        fold = torch.einsum("gew,hwk->hgek", vg, cmaps)  # (H, G, e, d)
        c = acts["coords"][:, i] * inv_sigma  # (N, R, H*d)
        c = c.reshape(n, c.shape[1], heads, -1)  # (N, R, H, d)
        mixed = torch.einsum("ngqr,nrhk->nhgqk", weights, c)  # (N, H, G, Q', d)
        ctx = torch.einsum("hgek,nhgqk->nhqge", fold, mixed)  # (N, H, Q', G, e)
        head_out.append(out(ctx.flatten(-2)))  # (N, H, D)
    heads_c = torch.stack(head_out, 1)  # (N, L, H, D)
    head_b = torch.stack([b for _, b, _ in per_block])  # (L, W)

    if convention == "default":
        bias_v = head_b.sum(0) * inv_sigma + varying  # (N, R, W)
        emb = through(centre(acts["emb"] * inv_sigma + bias_v)[:, None])[:, 0] + const  # (N, D)
    else:
        share = 1.0 / (2 * layers + 1)
        shared = through_outer((-mu * inv_sigma)[..., 0], torch.ones_like(beta)[None])[:, 0] + const  # (N, D)
        emb = through((acts["emb"] * inv_sigma + varying)[:, None])[:, 0] + share * shared
        mlps = mlps + share * shared[:, None]
        layer_b = through_outer(inv_sigma[..., 0], head_b)  # (N, L, D): each layer's constant
        heads_c = heads_c + layer_b[:, :, None] / heads + (share / heads) * shared[:, None, None]
    extra = {}
    if "pool_mlp" in acts:
        extra["pool.mlp"] = acts["pool_mlp"] @ proj  # (N, D)
    d_out = proj.shape[1]
    return Contributions(
        heads=heads_c,
        mlps=mlps,
        emb=emb,
        head_maps=torch.eye(d_out, device=dev).expand(layers, heads, d_out, d_out),
        names=layout.names,
        convention=convention,
        extra=extra,
    )


def decompose(
    canonical: CanonicalViT, images: Tensor, convention: Convention = "default"
) -> UnitContributions:
    """Exact (N, U, D) unit contributions; ``contributions.sum(1)`` equals ``canonical.forward(images)``.

    U is 1 + L + L*H, plus the readout's pooler units (``pool.mlp`` of a MAP pool with an MLP).

    Args:
        canonical: the model's description.
        images: (N, C, S, S) preprocessed images.
        convention: ``"default"`` or ``"equal_share"``.
    """
    compact = decompose_compact(canonical, images, convention)
    return UnitContributions(contributions=compact.expand(), names=compact.names)

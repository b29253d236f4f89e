"""The canonical pre-norm ViT: one library-neutral description every reader produces.

A reader (`backbones/open_clip.py`, later timm and transformers) turns a library's vision tower
into a `CanonicalViT`; the engine (`backbones/engine.py`) decomposes only this description, so
the exact decomposition is written once. The description holds the library's own tensors and
modules (views, no copies), and `CanonicalViT.forward` is a plain reference forward of it that
the tests hold equal to the library's own forward.

    x = embed(images)                                         # (N, T, W), pre-norm included
    for each block:
        a = attention(norm1(x))                               # heads, optional q/k norms,
                                                              # head_scale, inner norm, out-proj
        x = x + ls1 * post_attn_norm(a)
        x = x + ls2 * mlp(norm2(x))
    z = proj(final_norm(pool(x)))  or  proj(pool(final_norm(x)))

Letters as in `residual_lightning.units`: N images, T tokens, W width, H heads, d head width,
D output size, L layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual_lightning.contributions import Convention, UnitLayout

Module = Callable[[Tensor], Tensor]


class UnsupportedModelError(TypeError):
    """The model is not a pre-norm ViT a reader can describe (and the engine decompose) exactly."""


@dataclass
class Embed:
    """What enters block 0 (the ``emb`` unit).

    Attributes:
        fn: images (N, C, S, S) -> token stream (N, T, W), with any pre-norm applied.
        dtype: the dtype images are cast to before `fn` (the patch embedding's weights).
    """

    fn: Module
    dtype: torch.dtype = torch.float32

    def __call__(self, images: Tensor) -> Tensor:
        return self.fn(images.to(self.dtype))


@dataclass
class Attention:
    """Multi-head self-attention in per-head form.

    Attributes:
        q_weight: (H, d, W) query weights; ``k_weight``, ``v_weight`` likewise.
        q_bias: (H, d) or None; ``k_bias``, ``v_bias`` likewise.
        out_weight: (W, H*d) output projection, head h in columns h*d:(h+1)*d.
        out_bias: (W,) or None.
        scale: the logit scale (d ** -0.5 for standard attention).
        q_norm: module applied to q as (N, H, T, d) (a per-head-vector norm), or None.
        k_norm: likewise for k.
        head_scale: (H,) factor of each head's output, or None.
        inner_norm: a LayerNorm over the H*d concatenated head outputs before `out_weight`, or None.
        rope: a position-dependent map applied to q and k after their norms (rotary embeddings),
            called as ``rope(t, rows)`` with t (N, H, T', d) holding the token rows ``rows`` (a
            slice of the token positions), or None.
    """

    q_weight: Tensor
    k_weight: Tensor
    v_weight: Tensor
    q_bias: Tensor | None
    k_bias: Tensor | None
    v_bias: Tensor | None
    out_weight: Tensor
    out_bias: Tensor | None
    scale: float
    q_norm: Module | None = None
    k_norm: Module | None = None
    head_scale: Tensor | None = None
    inner_norm: nn.LayerNorm | None = None
    rope: Callable[[Tensor, slice], Tensor] | None = None

    @property
    def heads(self) -> int:
        return self.q_weight.shape[0]

    @property
    def head_width(self) -> int:
        return self.q_weight.shape[1]

    def project(self, x: Tensor, which: str, rows: slice | None = None) -> Tensor:
        """q, k or v of tokens x (N, T, W) as (N, H, T, d).

        ``rows`` says which token positions x holds (all: None), for `rope`; query tokens that are
        not image tokens (an attention pooler's latent) pass ``rows=None`` and get no `rope`.
        """
        weight, bias = getattr(self, f"{which}_weight"), getattr(self, f"{which}_bias")
        n, t, w = x.shape
        # One (H*d, W) matmul per projection, as the libraries compute it.
        bias = None if bias is None else bias.reshape(-1).to(x.dtype)
        out = F.linear(x, weight.reshape(-1, w).to(x.dtype), bias)  # (N, T, H*d)
        out = out.reshape(n, t, self.heads, -1).transpose(1, 2)  # (N, H, T, d)
        norm = getattr(self, f"{which}_norm", None)
        out = norm(out) if norm is not None else out
        if self.rope is not None and which != "v" and rows is not None:
            out = self.rope(out, rows)
        return out

    def context(
        self, x: Tensor, queries: int | slice | None = None, query_tokens: Tensor | None = None
    ) -> Tensor:
        """Per-head attention outputs (N, H, Tq, d) for the query rows `queries` (all: None).

        Args:
            x: the normed tokens (N, T, W); keys and values are always all of them.
            queries: None (every token), n (the first n) or a slice of the token rows.
            query_tokens: (N, Q, W) tokens the queries come from instead of x's rows (an
                attention pooler's latent queries); no `rope` is applied to them.
        """
        if isinstance(queries, int):
            queries = slice(0, queries)
        every = slice(0, x.shape[1])
        if query_tokens is not None:
            q = self.project(query_tokens, "q")  # (N, H, Q, d)
        else:
            q = self.project(x if queries is None else x[:, queries], "q", queries or every)  # (N, H, Tq, d)
        k, v = self.project(x, "k", every), self.project(x, "v")  # (N, H, T, d)
        ctx = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (N, H, Tq, d)
        if self.head_scale is not None:
            ctx = ctx * self.head_scale.to(ctx.dtype)[None, :, None, None]
        return ctx

    def __call__(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        ctx = self.context(x).transpose(1, 2).reshape(n, t, -1)  # (N, T, H*d)
        if self.inner_norm is not None:
            ctx = self.inner_norm(ctx)
        return F.linear(ctx, self.out_weight, self.out_bias)  # (N, T, W)


@dataclass
class Block:
    """One pre-norm residual block.

    Attributes:
        norm1: the norm before attention (a module used as a function).
        attention: the attention.
        ls1: (W,) LayerScale of the attention branch, or None.
        post_attn_norm: a LayerNorm on the attention output before `ls1`, or None.
        norm2: the norm before the MLP.
        mlp: the library's MLP module, used as a function (N, T, W) -> (N, T, W).
        ls2: (W,) LayerScale of the MLP branch, or None.
    """

    norm1: Module
    attention: Attention
    ls1: Tensor | None
    norm2: Module
    mlp: Module
    ls2: Tensor | None
    post_attn_norm: nn.LayerNorm | None = None

    def attention_branch(self, x: Tensor) -> Tensor:
        a = self.attention(self.norm1(x))
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        return a * self.ls1 if self.ls1 is not None else a

    def mlp_branch(self, x: Tensor) -> Tensor:
        m = self.mlp(self.norm2(x))
        return m * self.ls2 if self.ls2 is not None else m

    def __call__(self, x: Tensor) -> Tensor:
        x = x + self.attention_branch(x)
        return x + self.mlp_branch(x)


@dataclass
class MapPool:
    """An attention pooler (MAP: timm's ``AttentionPoolLatent``, SigLIP's pooling head).

    Learned latent queries attend over the (per-token normed) tokens; the result goes through
    the out-projection, then through its own pre-norm MLP with a residual:

        p = attention(latent -> tokens)        # (N, Q, W)
        p = p + mlp(norm(p))                   # norm/mlp absent: p
        pooled = p[:, 0]  or  p.mean(1)        # (N, W)

    Attributes:
        latent: (Q, W) learned query tokens.
        attention: the pool's attention in per-head form (q from `latent`, k/v from the tokens).
        norm: the LayerNorm before the pool's MLP, or None.
        mlp: the pool's MLP used as a function, or None (no MLP branch).
        reduce: ``"first"`` (latent query 0) or ``"mean"`` (mean over the Q latent queries).
        num_prefix_tokens: leading tokens (class/register) the pool does not attend to (timm's
            ``attn_pool`` without ``pool_include_prefix``); 0: every token.
    """

    latent: Tensor
    attention: Attention
    norm: nn.LayerNorm | None
    mlp: Module | None
    reduce: Literal["first", "mean"] = "first"
    num_prefix_tokens: int = 0

    def attend(self, x: Tensor) -> Tensor:
        """The attention part (N, Q, W) over tokens x (N, T, W), before the MLP branch."""
        n = x.shape[0]
        latent = self.latent.to(x.dtype).reshape(1, -1, x.shape[-1]).expand(n, -1, -1)  # (N, Q, W)
        ctx = self.attention.context(x, query_tokens=latent)  # (N, H, Q, d)
        ctx = ctx.transpose(1, 2).reshape(n, latent.shape[1], -1)  # (N, Q, H*d)
        if self.attention.inner_norm is not None:
            ctx = self.attention.inner_norm(ctx)
        return F.linear(ctx, self.attention.out_weight, self.attention.out_bias)  # (N, Q, W)

    def __call__(self, x: Tensor) -> Tensor:
        p = self.attend(x[:, self.num_prefix_tokens :])  # (N, Q, W)
        if self.mlp is not None:
            p = p + self.mlp(self.norm(p) if self.norm is not None else p)
        return p[:, 0] if self.reduce == "first" else p.mean(1)  # (N, W)


@dataclass
class Readout:
    """How the image embedding is read from the final stream.

    Attributes:
        pool: ``"tok"`` (token 0), ``"avg"`` (mean of the tokens after the prefix tokens) or
            ``"map"`` (`map_pool` over every token after a per-token final norm).
        norm: the final LayerNorm.
        norm_after_pool: True: pool, then norm (one sigma per image); False: norm every token,
            then pool (identical for ``tok``).
        proj: (W, D) projection.
        proj_bias: (D,) or None.
        num_prefix_tokens: class/register tokens skipped by ``avg``.
        map_pool: the attention pooler of ``pool="map"`` (None otherwise).
    """

    pool: Literal["tok", "avg", "map"]
    norm: nn.LayerNorm
    proj: Tensor
    norm_after_pool: bool = False
    proj_bias: Tensor | None = None
    num_prefix_tokens: int = 1
    map_pool: MapPool | None = None

    @property
    def layout_pool(self) -> Literal["tok", "avg_ln", "ln_avg", "map"]:
        """The `UnitLayout.pool` name of this readout."""
        if self.pool in ("tok", "map"):
            return self.pool
        return "avg_ln" if self.norm_after_pool else "ln_avg"

    @property
    def pooler_units(self) -> tuple[str, ...]:
        """Units the readout adds after the heads: ``pool.mlp``, a MAP pool's own MLP branch."""
        has_mlp = self.pool == "map" and self.map_pool is not None and self.map_pool.mlp is not None
        return ("pool.mlp",) if has_mlp else ()

    @property
    def rows(self) -> slice:
        """The token rows the readout reads: token 0, or every token after the prefix."""
        if self.pool == "map":
            return slice(self.map_pool.num_prefix_tokens if self.map_pool is not None else 0, None)
        return slice(0, 1) if self.pool == "tok" else slice(self.num_prefix_tokens, None)

    def pool_rows(self, rows: Tensor) -> Tensor:
        """The readout tokens (N, R, W) from the rows (N, T', W) already cut by `rows`."""
        return rows.mean(1, keepdim=True) if self.pool == "avg" and self.norm_after_pool else rows

    def tokens(self, x: Tensor) -> Tensor:
        """The readout tokens (N, R, W) of a stream (N, T, W): one row, or every pooled token
        when a per-token norm comes first (each has its own sigma)."""
        return self.pool_rows(x[:, self.rows])

    def __call__(self, x: Tensor) -> Tensor:
        if self.pool == "map":
            pooled = self.map_pool(self.norm(x))  # (N, W)
        else:
            pooled = self.norm(self.tokens(x)).mean(1)  # (N, W)
        out = pooled @ self.proj.to(pooled.dtype)  # (N, D)
        return out + self.proj_bias.to(out.dtype) if self.proj_bias is not None else out


@dataclass
class CanonicalViT:
    """A pre-norm ViT in library-neutral terms.

    Attributes:
        embed: the ``emb`` unit (patch/class/position embeddings and pre-norm).
        blocks: the L residual blocks.
        readout: pooling, final norm and projection.
        library: where it was read from (``open_clip``, ...).
        name: a free label (the class or config name).
    """

    embed: Embed
    blocks: list[Block]
    readout: Readout
    library: str = "open_clip"
    name: str = ""

    @property
    def width(self) -> int:
        return self.readout.proj.shape[0]

    def layout(self, convention: Convention = "default") -> UnitLayout:
        """The `UnitLayout` of the units the engine splits this model into."""
        attn = self.blocks[0].attention
        return UnitLayout(
            layers=len(self.blocks),
            heads=attn.heads,
            head_width=attn.head_width,
            output_dim=self.readout.proj.shape[1],
            convention=convention,
            width=self.width,
            pool=self.readout.layout_pool,
            library=self.library,
            pooler_units=self.readout.pooler_units,
            compact=self.readout.pool != "map",
        )

    def forward(self, images: Tensor) -> Tensor:
        """Reference forward (no decomposition): images (N, C, S, S) -> embeddings (N, D)."""
        x = self.embed(images)  # (N, T, W)
        for block in self.blocks:
            x = block(x)
        return self.readout(x)

    __call__ = forward


def optional_module(module: nn.Module | None) -> nn.Module | None:
    """None for an absent or identity module (how libraries switch a norm or scale off)."""
    return None if module is None or isinstance(module, nn.Identity) else module


def layer_norm_or_none(module: nn.Module | None, where: str) -> nn.LayerNorm | None:
    """A norm the engine linearises per token: a LayerNorm over the last dim, or absent.

    Raises:
        UnsupportedModelError: any other norm, naming `where` and its class.
    """
    module = optional_module(module)
    if module is not None and not isinstance(module, nn.LayerNorm):
        raise UnsupportedModelError(f"{where} is {type(module).__name__}, not a LayerNorm")
    return module

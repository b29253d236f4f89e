"""MAP (attention-pooled) readouts: timm ``global_pool='map'`` read and decomposed exactly.

Tiny random-weight timm ViTs built offline; every bias, norm affine, LayerScale, token and latent
is randomised first, so that a misplaced constant shows.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.layers import AttentionPoolLatent  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from residual_lightning.backbones import decompose, decompose_compact  # noqa: E402
from residual_lightning.backbones.canonical import UnsupportedModelError  # noqa: E402
from residual_lightning.backbones.timm import is_supported_timm, read_timm  # noqa: E402
from residual_lightning.contributions import Contributions  # noqa: E402
from tests.backbones.engine_helpers import images, pre_logits, rel_err  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10)
CONVENTIONS = ("default", "equal_share")

CONFIGS = {
    "map_class_token": dict(global_pool="map"),
    "map_siglip_no_class_token": dict(class_token=False, global_pool="map"),
    "map_registers": dict(global_pool="map", reg_tokens=4, no_embed_class=True),
    "map_registers_include_prefix": dict(global_pool="map", reg_tokens=2, pool_include_prefix=True),
    "map_qk_norm_layerscale": dict(global_pool="map", qk_norm=True, init_values=0.1),
    "map_everything": dict(
        global_pool="map",
        reg_tokens=2,
        qk_norm=True,
        init_values=0.1,
        scale_attn_norm=True,
        scale_mlp_norm=True,
        pre_norm=True,
    ),
    # attn_pool replaced by POOLS[name] (options timm's VisionTransformer does not pass on)
    "map_latent2_avg": dict(class_token=False, global_pool="map"),
    "map_latent2_token": dict(global_pool="map"),
    "map_pool_qk_norm": dict(global_pool="map", reg_tokens=1, init_values=0.1),
}
POOLS = {
    "map_latent2_avg": dict(latent_len=2, pool_type="avg"),
    "map_latent2_token": dict(latent_len=2, pool_type="token"),
    "map_pool_qk_norm": dict(qk_norm=True, norm_layer=torch.nn.LayerNorm),
}

REFUSED = {
    "prr": (dict(global_pool="prr"), "'prr'"),
    "max": (dict(global_pool="max"), "'max'"),
    "avgmax": (dict(global_pool="avgmax"), "'avgmax'"),
    "map_fc_norm": (dict(global_pool="map", fc_norm=True), "fc_norm"),
    "map_final_norm_false": (dict(global_pool="map", final_norm=False), "final_norm=False"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_timm_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise every bias, norm affine, LayerScale gamma, class/register/position token and MAP latent."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif leaf == "weight" and p.ndim == 1:  # norm gammas
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif leaf == "gamma":  # LayerScale
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif leaf in ("cls_token", "reg_token", "pos_embed", "latent"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def build_vit(name: str, seed: int = 0) -> VisionTransformer:
    """A tiny randomised timm ViT of `CONFIGS[name]` in eval mode (no download)."""
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **CONFIGS[name]})
    if name in POOLS:
        model.attn_pool = AttentionPoolLatent(64, num_heads=4, **POOLS[name])
    return randomise_timm_(model, seed).eval()


@functools.cache
def model_for(name: str) -> VisionTransformer:
    return build_vit(name)


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_reference_forward_matches_pre_logits(cfg):
    model = model_for(cfg)
    x = images()
    with torch.no_grad():
        assert rel_err(read_timm(model).forward(x), pre_logits(model, x)) <= 1e-5


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_contributions_sum_to_pre_logits(cfg):
    model = model_for(cfg)
    x = images()
    canonical = read_timm(model)
    with torch.no_grad():
        ref = pre_logits(model, x)
        for convention in CONVENTIONS:
            compact = decompose_compact(canonical, x, convention)
            layout = canonical.layout(convention)
            assert compact.names == ["emb", *layout.mlp_names, *layout.head_names, "pool.mlp"]
            assert compact.heads.shape == (4, 3, 4, 64)
            assert compact.head_maps.shape == (3, 4, 64, 64) and compact.head_maps.stride()[:2] == (0, 0)
            assert set(compact.extra) == {"pool.mlp"} and compact.extra["pool.mlp"].shape == (4, 64)
            assert rel_err(compact.embedding(), ref) <= 1e-5, convention
            full = decompose(canonical, x, convention)
            assert full.names == compact.names
            assert full.contributions.shape == (4, 1 + 3 + 12 + 1, 64)
            assert rel_err(full.contributions.sum(1), ref) <= 1e-5, convention
            assert torch.equal(full.contributions, compact.expand())
            assert torch.equal(full.unit("pool.mlp"), compact.extra["pool.mlp"])


def test_readout_reads_the_pool():
    readout = read_timm(model_for("map_registers")).readout
    assert readout.pool == "map" and readout.layout_pool == "map"
    assert readout.map_pool.num_prefix_tokens == 5 and readout.rows == slice(5, None)
    assert readout.map_pool.reduce == "first" and readout.pooler_units == ("pool.mlp",)
    assert read_timm(model_for("map_registers_include_prefix")).readout.rows == slice(0, None)
    assert read_timm(model_for("map_siglip_no_class_token")).readout.rows == slice(0, None)
    assert read_timm(model_for("map_latent2_avg")).readout.map_pool.reduce == "mean"
    assert read_timm(model_for("map_latent2_avg")).readout.map_pool.latent.shape == (1, 2, 64)
    assert read_timm(model_for("map_pool_qk_norm")).readout.map_pool.attention.q_norm is not None


def _pool_weights(model: VisionTransformer, normed: torch.Tensor) -> torch.Tensor:
    """The pool's attention weights (N, G, Q, R) from timm's own modules."""
    pool = model.attn_pool
    n, r, _ = normed.shape
    q = pool.q(pool.latent.expand(n, -1, -1)).reshape(n, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
    k = pool.kv(normed)[..., : pool.num_heads * pool.head_dim]
    k = k.reshape(n, r, pool.num_heads, pool.head_dim).transpose(1, 2)
    return torch.softmax(pool.q_norm(q) @ pool.k_norm(k).transpose(-1, -2) * pool.scale, -1)


@pytest.mark.parametrize(
    "cfg", ["map_registers", "map_qk_norm_layerscale", "map_latent2_avg", "map_pool_qk_norm"]
)
def test_units_match_a_naive_per_token_reference(cfg):
    """Under ``default`` each unit is its own-mean-centred per-token stream value pushed through the
    frozen final norm, the pool's value projection, attention weights and out-projection; the pool's
    MLP is its own unit. Built here from timm's modules, materialising every head's per-token value."""
    model = model_for(cfg)
    x = images(n=2)
    with torch.no_grad():
        s = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))  # (N, T, W)
        units = [s]
        mlps, heads = [], []
        for block in model.blocks:
            attn = block.attn
            h_, d = attn.num_heads, attn.head_dim
            qkv = attn.qkv(block.norm1(s)).reshape(s.shape[0], s.shape[1], 3, h_, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            ctx = torch.softmax(attn.q_norm(q) @ attn.k_norm(k).transpose(-1, -2) * attn.scale, -1) @ v
            w_o = attn.proj.weight.reshape(64, h_, d)
            per_head = torch.einsum("wik,nitk->nitw", w_o, ctx)  # (N, H, T, W)
            ls1 = block.ls1.gamma if hasattr(block.ls1, "gamma") else torch.ones(64)
            heads.append(per_head * ls1)
            units[0] = units[0] + attn.proj.bias * ls1  # the biases: constant, emb's under default
            s = s + (per_head.sum(1) + attn.proj.bias) * ls1
            m = block.ls2(block.mlp(block.norm2(s)))
            mlps.append(m)
            s = s + m
        skip = model.num_prefix_tokens
        rows = slice(skip, None)
        stream = s[:, rows]
        mu, var = stream.mean(-1, keepdim=True), stream.var(-1, unbiased=False, keepdim=True)
        inv = torch.rsqrt(var + model.norm.eps)
        weights = _pool_weights(model, model.norm(stream))  # (N, G, Q, R)
        pool = model.attn_pool
        v_w = pool.kv.weight[64:].reshape(4, 16, 64)

        def push(v: torch.Tensor) -> torch.Tensor:
            """Per-token stream values (N, R, W), centred and over sigma, without constants -> (N, D)."""
            z = model.norm.weight * (v - v.mean(-1, keepdim=True)) * inv
            vals = torch.einsum("gew,nrw->ngre", v_w, z)
            ctx = (weights @ vals).transpose(1, 2).flatten(-2)  # (N, Q, W)
            return (
                (ctx @ pool.proj.weight.T).mean(1) if pool.pool == "avg" else ctx[:, 0] @ pool.proj.weight.T
            )

        compact = decompose_compact(read_timm(model), x, "default")
        for i in range(3):
            assert rel_err(compact.mlps[:, i], push(mlps[i][:, rows])) <= 1e-5
            for h in range(4):
                assert rel_err(compact.heads[:, i, h], push(heads[i][:, h, rows])) <= 1e-5
        p = pool.proj(
            (weights @ pool.kv(model.norm(stream))[..., 64:].reshape(2, -1, 4, 16).transpose(1, 2))
            .transpose(1, 2)
            .flatten(-2)
        )
        m = pool.mlp(pool.norm(p))
        assert rel_err(compact.extra["pool.mlp"], m.mean(1) if pool.pool == "avg" else m[:, 0]) <= 1e-5
        assert torch.allclose(mu, stream.mean(-1, keepdim=True))


def test_bf16_autocast_smoke():
    model = model_for("map_qk_norm_layerscale")
    x = images()
    canonical = read_timm(model)
    with torch.no_grad():
        ref = pre_logits(model, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for convention in CONVENTIONS:
                compact = decompose_compact(canonical, x, convention)
                assert compact.heads.dtype == torch.float32
                out = compact.embedding()
                assert torch.isfinite(out).all()
                assert rel_err(out, ref) <= 0.1, convention
                full = decompose(canonical, x, convention).contributions
                assert torch.isfinite(full).all() and rel_err(full.sum(1), ref) <= 0.1


def _hand_built(mlp: bool):
    """A timm MAP model's description with the pool's MLP removed (or kept), head_scale and an
    inner norm added to the pool's attention and a norm after block 1's attention (``ln_attn``):
    paths timm's models never take."""
    torch.manual_seed(3)
    canonical = read_timm(build_vit("map_registers", seed=3))
    pool = canonical.readout.map_pool
    if not mlp:
        pool.mlp, pool.norm = None, None

    def norm() -> torch.nn.LayerNorm:
        module = torch.nn.LayerNorm(64).eval()
        with torch.no_grad():
            module.weight.copy_(1 + 0.5 * torch.randn(64))
            module.bias.copy_(0.5 * torch.randn(64))
        return module

    pool.attention.inner_norm = norm()
    pool.attention.head_scale = 0.5 + torch.rand(4)
    canonical.blocks[1].post_attn_norm = norm()
    return canonical


@pytest.mark.parametrize("mlp", [False, True])
def test_hand_built_map_pool(mlp):
    canonical = _hand_built(mlp)
    x = images()
    with torch.no_grad():
        ref = canonical.forward(x)
        for convention in CONVENTIONS:
            compact = decompose_compact(canonical, x, convention)
            assert (compact.names[-1] == "pool.mlp") is mlp
            assert set(compact.extra) == ({"pool.mlp"} if mlp else set())
            assert rel_err(compact.embedding(), ref) <= 1e-5, convention
            full = decompose(canonical, x, convention).contributions
            assert full.shape == (4, 1 + 3 + 12 + int(mlp), 64)
            assert rel_err(full.sum(1), ref) <= 1e-5, convention


def test_contributions_carry_pooler_units():
    canonical = read_timm(model_for("map_class_token"))
    x = images()
    with torch.no_grad():
        compact = decompose_compact(canonical, x)
        ref = compact.embedding()
        sub = compact[1:3]
        assert sub.extra["pool.mlp"].shape == (2, 64)
        assert torch.equal(sub.embedding(), ref[1:3])
        half = compact.to(torch.float64).float()
        assert half.extra["pool.mlp"].dtype == torch.float32 and torch.allclose(half.embedding(), ref)
        broken = Contributions(
            compact.heads, compact.mlps, compact.emb, head_maps=compact.head_maps, names=compact.names
        )
        with pytest.raises(ValueError, match="pool.mlp"):
            broken.embedding()


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_options_are_refused_by_name(case):
    options, message = REFUSED[case]
    model = VisionTransformer(**{**TINY, **options}).eval()
    with pytest.raises(UnsupportedModelError, match=message):
        read_timm(model)
    assert not is_supported_timm(model)


def test_unknown_pool_parts_are_refused_by_name():
    model = build_vit("map_class_token")
    model.attn_pool.extra = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match="extra"):
        read_timm(model)
    model = build_vit("map_class_token")
    model.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(16, 64))
    with pytest.raises(UnsupportedModelError, match="pos_embed"):
        read_timm(model)
    model = build_vit("map_class_token")
    model.attn_pool.pool = ""
    with pytest.raises(UnsupportedModelError, match="pool_type"):
        read_timm(model)
    model = build_vit("map_class_token")
    model.attn_pool.norm = torch.nn.BatchNorm1d(64)
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d"):
        read_timm(model)
    assert is_supported_timm(model_for("map_everything"))

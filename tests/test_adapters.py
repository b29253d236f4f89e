"""Adapters on cached contributions: identities, parameter counts, factory errors, learning."""

from __future__ import annotations

import functools
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from conftest import build_clip

from residual_lightning import transform
from residual_lightning.adapters import (
    METHODS,
    OPTIONS,
    PRESETS,
    CoarseAdapter,
    CoarseOptions,
    LinearAdapter,
    ResidualAdapter,
    ResidualOptions,
    ResidualStarOptions,
    SpectralAdapter,
    ZeroShotAdapter,
    build_adapter,
    options_for,
)
from residual_lightning.contributions import Contributions
from residual_lightning.spectral import PCABasis, UnitBases, fit_unit_bases
from residual_lightning.units import decompose_compact

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@functools.cache
def tiny(convention: str = "default"):
    """Float64 reference and held-out batches of a tiny random CLIP, and bases fitted on the reference."""
    model = build_clip()
    size = model.visual.image_size[0]
    images = torch.randn(96, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cc = decompose_compact(model, images, convention)
    heads, mlps, emb, maps = (t.double() for t in (cc.heads, cc.mlps, cc.emb, cc.head_maps))
    label = torch.zeros(96, dtype=torch.long)
    ref = Contributions(heads[:80], mlps[:80], emb[:80], label[:80])
    held = Contributions(heads[80:], mlps[80:], emb[80:], label[80:])
    head_components = 18 if convention == "equal_share" else None  # every direction of a head
    bases = fit_unit_bases(
        [ref], maps, convention=convention, head_components=head_components, dtype=torch.float64
    )
    return bases, maps, ref, held


def synthetic_bases(
    layers: int, heads: int, d: int, dim: int, seed: int = 0
) -> tuple[UnitBases, torch.Tensor]:
    """Full-rank bases of a given layout (random orthonormal components, positive variances)."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(layers, heads, dim, d, generator=g) / d**0.5  # (L, H, D, d)

    def basis(units: tuple[int, ...], k: int, mean: torch.Tensor | None = None) -> PCABasis:
        q, _ = torch.linalg.qr(torch.randn(dim, k, generator=g))  # (D, K), shared by the units
        ev = torch.sort(torch.rand(*units, k, generator=g) + 0.01, descending=True).values
        return PCABasis(
            mean=torch.randn(*units, dim, generator=g) if mean is None else mean,
            components=q.mT.expand(*units, k, dim).contiguous(),
            explained_variance=ev,
            explained_variance_ratio=ev / ev.sum(-1, keepdim=True),
            mask=torch.ones(*units, k, dtype=torch.bool),
        )

    ybar = torch.randn(layers, heads, d, generator=g)
    bases = UnitBases(
        heads=basis((layers, heads), d, torch.einsum("lhdk,lhk->lhd", maps, ybar)),
        mlps=basis((layers,), dim),
        emb=basis((), dim),
        head_coord_mean=ybar,
        n_samples=1000,
        output=basis((), dim),
    )
    return bases, maps


def random_batch(bases: UnitBases, n: int = 3, seed: int = 0) -> Contributions:
    g = torch.Generator().manual_seed(seed)
    layers, heads, k, dim = bases.num_layers, bases.num_heads, bases.head_dim, bases.output_dim
    return Contributions(
        torch.randn(n, layers, heads, k, generator=g),
        torch.randn(n, layers, dim, generator=g),
        torch.randn(n, dim, generator=g),
        torch.zeros(n, dtype=torch.long),
    )


def head_sum(batch: Contributions, maps: torch.Tensor) -> torch.Tensor:
    return torch.einsum("lhdk,nlhk->nd", maps, batch.heads)  # (N, D)


# --------------------------------------------------------------------------------------------
# Identities on a real (tiny, random) CLIP's contributions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["default", "equal_share"])
@pytest.mark.parametrize(
    "transform", ["all", ("heads", "mlps", "emb"), "heads", (1, 3), ("l0.h1", "l2.mlp", "emb")]
)
def test_identity_with_unit_lambdas(convention, transform):
    """ones + add_mean + all components: every unit transformed or kept gives the embedding back."""
    bases, maps, ref, held = tiny(convention)
    adapter = ResidualAdapter(bases, maps, transform=transform, others="keep", init="ones", add_mean=True)
    for batch in (ref, held):
        torch.testing.assert_close(adapter(batch), batch.embedding(maps), rtol=1e-5, atol=1e-6)

    # Without add_mean the transformed units' means are missing.
    adapter = ResidualAdapter(bases, maps, transform=transform, others="keep", init="ones", add_mean=False)
    th, tm, te = adapter.head_transformed, adapter.mlp_transformed, bool(adapter.emb_transformed)
    means = (bases.heads.mean * th[..., None]).sum((0, 1)) + (bases.mlps.mean * tm[:, None]).sum(0)
    means = means + (bases.emb.mean if te else 0)
    torch.testing.assert_close(adapter(held), held.embedding(maps) - means, rtol=1e-5, atol=1e-6)


def test_others_zero_and_mean():
    bases, maps, _, held = tiny()
    kw = dict(transform="heads", init="ones", add_mean=True)
    zero = ResidualAdapter(bases, maps, others="zero", **kw)
    torch.testing.assert_close(zero(held), head_sum(held, maps), rtol=1e-5, atol=1e-6)
    mean = ResidualAdapter(bases, maps, others="mean", **kw)
    expected = head_sum(held, maps) + bases.mlps.mean.sum(0) + bases.emb.mean
    torch.testing.assert_close(mean(held), expected, rtol=1e-5, atol=1e-6)


def test_baselines_identities():
    bases, maps, _, held = tiny()
    emb = held.embedding(maps)
    torch.testing.assert_close(ZeroShotAdapter(maps)(held), emb)
    torch.testing.assert_close(LinearAdapter(maps, identity_init=True)(held), emb)
    spectral = SpectralAdapter.from_bases(bases, maps, init="ones", add_mean=True)
    assert spectral.num_learned() == 48
    torch.testing.assert_close(spectral(held), emb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(CoarseAdapter(maps, init="ones")(held), head_sum(held, maps))
    coarse = CoarseAdapter(maps, init="normal", seed=3)
    w = coarse.head_weights.detach()
    torch.testing.assert_close(coarse(held), torch.einsum("lhdk,lh,nlhk->nd", maps, w, held.heads))


def test_zeroed_components_do_not_contribute():
    """Components not selected (and heads not transformed) have lambda fixed at 0."""
    bases, maps, _, held = tiny()
    adapter = ResidualAdapter(bases, maps, transform="heads", components=2, others="zero", init="ones")
    assert adapter.num_learned() == 3 * 4 * 2
    phi = bases.heads.components[:, :, :2]  # (L, H, 2, D)
    c = torch.einsum("lhdk,nlhk->nlhd", maps, held.heads) - bases.heads.mean
    expected = torch.einsum("lhkd,lhke,nlhe->nd", phi, phi, c)
    torch.testing.assert_close(adapter(held), expected, rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        adapter.head_lambdas[..., 2:] = 123.0  # masked: no effect
    torch.testing.assert_close(adapter(held), expected, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Parameter counts (method.md table) on bases fitted on data, with rank-deficient units
# --------------------------------------------------------------------------------------------

LAYOUTS = {"ViT-B/16": (12, 12, 64, 512), "ViT-L/14": (24, 16, 64, 768)}
EXPECTED = {
    "ViT-B/16": {"residual": 15_360, "coarse": 144, "linear": 262_656, "spectral": 512, "zeroshot": 0},
    "ViT-L/14": {"residual": 43_008, "coarse": 384, "linear": 590_592, "spectral": 768, "zeroshot": 0},
}
HEAD_RANK, MLP_RANK = 10, 100  # of head l0.h1 and MLP l1 in `fitted_bases`


def fitted_bases(layers: int, heads: int, d: int, dim: int, seed: int = 0) -> tuple[UnitBases, torch.Tensor]:
    """Bases fitted (`fit_unit_bases`) on random contributions: every unit full rank except head
    l0.h1 (rank HEAD_RANK) and MLP l1 (rank MLP_RANK), whose masks must drop the other components."""
    g = torch.Generator().manual_seed(seed)
    n = dim + 64  # more samples than any unit's dimension: full rank where the data is
    maps = torch.randn(layers, heads, dim, d, generator=g) / d**0.5  # (L, H, D, d), full column rank
    y = torch.randn(n, layers, heads, d, generator=g) + torch.randn(layers, heads, d, generator=g)
    y[:, 0, 1] = torch.randn(n, HEAD_RANK, generator=g) @ torch.randn(HEAD_RANK, d, generator=g)
    mlps = torch.randn(n, layers, dim, generator=g)
    mlps[:, 1] = torch.randn(n, MLP_RANK, generator=g) @ torch.randn(MLP_RANK, dim, generator=g)
    batch = Contributions(y, mlps, torch.randn(n, dim, generator=g), torch.zeros(n, dtype=torch.long))
    return fit_unit_bases([batch], maps, dtype=torch.float32), maps


@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_learned_parameter_counts(arch):
    layers, heads, d, dim = LAYOUTS[arch]
    bases, maps = fitted_bases(layers, heads, d, dim)
    # The fit found the rank-deficient units: their masks are not all ones.
    assert int(bases.heads.mask[0, 1].sum()) == HEAD_RANK
    assert int(bases.mlps.mask[1].sum()) == MLP_RANK
    assert int(bases.heads.mask.sum()) == layers * heads * d - (d - HEAD_RANK)
    assert int(bases.output.mask.sum()) == dim
    # The table's counts are for full-rank units; a rank-deficient unit learns only its rank.
    deficit = {"residual": (d - HEAD_RANK) + (dim - MLP_RANK)}
    batch = random_batch(bases)
    for method, full in EXPECTED[arch].items():
        expected = full - deficit.get(method, 0)
        adapter = build_adapter(method, bases, maps)
        assert adapter.num_learned() == expected, method
        assert adapter(batch).shape == (3, dim), method
        if method in ("coarse", "linear", "spectral", "zeroshot"):  # no padding: every entry learned
            assert sum(p.numel() for p in adapter.parameters()) == expected, method
        weights = adapter.unit_weights()
        if method != "linear":  # NaN marks a masked (not learned) component
            assert sum(int((~torch.isnan(w)).sum()) for w in weights.values()) == expected, method
    residual = build_adapter("residual", bases, maps).unit_weights()
    assert int((~torch.isnan(residual["heads"][0, 1])).sum()) == HEAD_RANK
    assert int((~torch.isnan(residual["mlps"][1])).sum()) == MLP_RANK
    star = build_adapter("residual_star", bases, maps)
    selected = int(bases.heads.select(0.9).sum())
    assert star.num_learned() == selected
    assert 0 < selected < layers * heads * d - (d - HEAD_RANK)
    assert set(star.unit_weights()) == {"heads"}
    assert int((~torch.isnan(star.unit_weights()["heads"])).sum()) == selected
    assert int((~torch.isnan(star.unit_weights()["heads"][0, 1])).sum()) <= HEAD_RANK


def test_forward_shapes_dtype_and_unit_weights():
    bases, maps = synthetic_bases(2, 3, 8, 16)
    batch = random_batch(bases, n=5)
    half = Contributions(batch.heads.half(), batch.mlps.half(), batch.emb.half(), batch.label)
    for method in METHODS:
        adapter = build_adapter(method, bases, maps)
        out = adapter(half)  # float16 caches are cast to the adapter's dtype
        assert out.shape == (5, 16) and out.dtype == torch.float32, method
        weights = adapter.unit_weights()
        learned = sum(int((~torch.isnan(w)).sum()) for w in weights.values())
        if method != "linear":
            assert learned == adapter.num_learned(), method
    weights = build_adapter("residual", bases, maps).unit_weights()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"heads": (2, 3, 8), "mlps": (2, 16)}


def test_state_dict_restores_everything():
    bases, maps = synthetic_bases(2, 3, 8, 16)
    batch = random_batch(bases)
    a = build_adapter("residual_star", bases, maps, seed=0)
    with torch.no_grad():
        a.head_lambdas.mul_(2.5)
    state = a.state_dict()
    for name in ("head_components", "head_coords", "head_offset", "head_select", "const", "head_lambdas"):
        assert name in state
    b = build_adapter("residual_star", bases, maps, seed=1)
    assert not torch.allclose(a(batch), b(batch))
    b.load_state_dict(state)
    torch.testing.assert_close(a(batch), b(batch))


# --------------------------------------------------------------------------------------------
# Factory and option errors
# --------------------------------------------------------------------------------------------


def test_build_adapter_errors():
    bases, maps = synthetic_bases(2, 3, 8, 16)
    with pytest.raises(
        ValueError,
        match=r"unknown adapter method 'residul' \(did you mean residual.*valid methods: residual, residual_star, coarse",
    ):
        build_adapter("residul", bases, maps)
    with pytest.raises(
        ValueError, match="option 'others' does not apply to method 'coarse'; its options: init, seed"
    ):
        build_adapter("coarse", bases, maps, others="keep")
    with pytest.raises(ValueError, match="option 'init' does not apply to method 'zeroshot'"):
        build_adapter("zeroshot", None, maps, init="ones")
    with pytest.raises(ValueError, match="needs PCA bases"):
        build_adapter("residual", None, maps)
    with pytest.raises(ValueError, match="unknown unit 'l2.h0' in transform"):
        build_adapter("residual", bases, maps, transform=["l2.h0"])
    with pytest.raises(ValueError, match="did you mean heads"):
        build_adapter("residual", bases, maps, transform=["hedas"])
    with pytest.raises(ValueError, match="selects no layer"):
        build_adapter("residual", bases, maps, transform=(5, 7))
    with pytest.raises(ValueError, match="unknown kind"):
        build_adapter("residual", bases, maps, components={"head": 0.9})
    with pytest.raises(ValueError, match="unknown others"):
        build_adapter("residual", bases, maps, others="drop")
    with pytest.raises(ValueError, match="unknown init"):
        build_adapter("residual", bases, maps, init="zeros")
    with pytest.raises(ValueError, match="does not match the bases"):
        build_adapter("residual", bases, maps[:, :2])
    other_bases, _ = synthetic_bases(2, 3, 8, 16, seed=5)
    with pytest.raises(ValueError, match="fitted on a cache with other head maps"):
        build_adapter("residual", other_bases, maps)
    no_output = UnitBases(bases.heads, bases.mlps, bases.emb, bases.head_coord_mean, 10)
    with pytest.raises(ValueError, match="fit_output=True"):
        build_adapter("spectral", no_output, maps)
    # Presets fix options, overrides are allowed where they apply.
    star = build_adapter("residual_star", bases, maps, others="keep")
    assert star.others == "keep" and star.num_learned() == int(bases.heads.select(0.9).sum())
    assert build_adapter("coarse", None, maps).num_learned() == 6
    assert build_adapter("linear", None, maps).num_learned() == 16 * 16 + 16


def test_init_options():
    bases, maps = synthetic_bases(2, 3, 8, 16)
    variance = build_adapter("residual", bases, maps, init="explained_variance")
    torch.testing.assert_close(variance.head_lambdas.detach(), bases.heads.explained_variance)
    singular = build_adapter("residual", bases, maps, init="singular")
    torch.testing.assert_close(singular.mlp_lambdas.detach(), (bases.mlps.explained_variance * 999).sqrt())
    # `eigen` is the authors' name for the singular values; it meant the explained variances until
    # this release, so it warns once per process that the meaning changed.
    transform._eigen_warned = False
    with pytest.warns(UserWarning, match="init: eigen now means the singular values") as record:
        eigen = build_adapter("residual", bases, maps, init="eigen")
        build_adapter("spectral", bases, maps, init="eigen")
    assert sum("init: eigen" in str(w.message) for w in record) == 1
    torch.testing.assert_close(eigen.mlp_lambdas.detach(), singular.mlp_lambdas.detach())
    torch.testing.assert_close(eigen.head_lambdas.detach(), singular.head_lambdas.detach())
    a, b = (build_adapter("residual", bases, maps, seed=s).head_lambdas for s in (0, 1))
    assert not torch.equal(a, b)
    assert torch.equal(a, build_adapter("residual", bases, maps, seed=0).head_lambdas)


# --------------------------------------------------------------------------------------------
# Typed options: the presets are their defaults; every spelling of model.adapter
# --------------------------------------------------------------------------------------------


def test_options_defaults_are_the_method_presets():
    star = ResidualStarOptions()
    assert (star.transform, star.components, star.others, star.init, star.seed) == (
        "heads",
        {"heads": 0.9},
        "zero",
        "normal",
        0,
    )
    assert asdict(ResidualOptions()) == {
        "transform": "all",
        "components": "all",
        "others": "keep",
        "init": "normal",
        "add_mean": False,
        "seed": 0,
        "threshold_fallback": None,  # None: the model's switch (docs/reproducing.md)
        "released_full": False,
    }
    assert set(OPTIONS) == set(METHODS) and all(OPTIONS[m].method == m for m in METHODS)
    assert PRESETS["residual_star"] == asdict(star) and PRESETS["zeroshot"] == {}
    bases, maps = synthetic_bases(2, 3, 8, 16)
    batch = random_batch(bases)
    by_name = build_adapter("residual_star", bases, maps)
    by_options = build_adapter(ResidualStarOptions(), bases, maps)
    torch.testing.assert_close(by_name(batch), by_options(batch), rtol=0, atol=0)
    overridden = build_adapter(ResidualStarOptions(others="keep"), bases, maps, seed=3)
    assert overridden.others == "keep" and not torch.equal(overridden.head_lambdas, by_name.head_lambdas)


def test_every_spelling_of_model_adapter(tmp_path):
    assert options_for("coarse", None) == CoarseOptions()
    typed = ResidualStarOptions(components={"heads": 0.95}, init="ones")
    assert options_for("residual_star", typed) is typed
    # What a checkpoint stores: plain values only, so it survives a weights-only load.
    stored = typed.to_hparams()
    torch.save({"adapter": stored}, tmp_path / "h.pt")
    loaded = torch.load(tmp_path / "h.pt", weights_only=True)["adapter"]
    assert loaded["class_path"] == "residual_lightning.residual.ResidualStarOptions"
    assert options_for("residual_star", loaded) == typed
    short = {"class_path": "residual_lightning.adapters.ResidualStarOptions", "init_args": {"seed": 2}}
    assert options_for("residual_star", short) == ResidualStarOptions(seed=2)
    # The old spelling: a plain dict beside the method, for one release, naming the new one.
    with pytest.warns(FutureWarning, match=r"class_path: residual_lightning\.adapters\.ResidualStarOptions"):
        old = options_for("residual_star", {"components": {"heads": 0.95}, "init": "ones"})
    assert old == typed
    with pytest.raises(
        ValueError, match="holds CoarseOptions, the options of method 'coarse', but model.method"
    ):
        options_for("residual", CoarseOptions())
    with pytest.raises(ValueError, match="not an adapter options class"):
        options_for("residual", {"class_path": "os.system", "init_args": {}})
    with pytest.raises(ValueError, match=r"\['compnents'\] are not options of"):
        options_for("residual", {"class_path": "ResidualOptions", "init_args": {"compnents": 1}})
    with pytest.raises(ValueError, match="unknown init='zeros' for method 'coarse'; valid: ones, normal"):
        CoarseOptions(init="zeros")


# --------------------------------------------------------------------------------------------
# Initial λs: recorded at construction, rebuilt for state dicts written before
# --------------------------------------------------------------------------------------------


def _old(state: dict) -> dict:
    """A state dict as written before the initial λs were recorded."""
    return {k: v for k, v in state.items() if not k.endswith("_init")}


@pytest.mark.parametrize("method", ["residual_star", "coarse", "spectral"])
def test_initial_lambdas_are_recorded_and_rebuilt_for_old_state_dicts(method):
    bases, maps = synthetic_bases(2, 3, 8, 16)
    a = build_adapter(method, bases, maps, seed=4)
    start = {k: v.clone() for k, v in a.initial_unit_weights().items()}
    torch.testing.assert_close(start, a.unit_weights(), equal_nan=True)  # the Parameters' start
    with torch.no_grad():
        for p in a.parameters():
            p.mul_(3.0).add_(1.0)
    torch.testing.assert_close(a.initial_unit_weights(), start, equal_nan=True)  # training leaves it
    # Rebuilt like the model does on load: an adapter of the same options on placeholder bases.
    fresh = build_adapter(method, UnitBases.zeros(bases.layout), maps, seed=4)
    fresh.load_state_dict(_old(a.state_dict()))
    torch.testing.assert_close(fresh.initial_unit_weights(), start, equal_nan=True)
    torch.testing.assert_close(fresh.unit_weights(), a.unit_weights(), equal_nan=True)
    if method != "coarse":  # eigen λs come from the spectra, which a checkpoint does not hold
        eigen = build_adapter(method, bases, maps, init="eigen")
        again = build_adapter(method, UnitBases.zeros(bases.layout), maps, init="eigen")
        again.load_state_dict(_old(eigen.state_dict()))
        assert all(torch.isnan(w).all() for w in again.initial_unit_weights().values())
        again.load_state_dict(eigen.state_dict())  # a new checkpoint holds them
        torch.testing.assert_close(again.initial_unit_weights(), eigen.initial_unit_weights(), equal_nan=True)


# --------------------------------------------------------------------------------------------
# Learning: the label lives in one head's 3rd principal component
# --------------------------------------------------------------------------------------------


def test_residual_star_learns_the_planted_component():
    g = torch.Generator().manual_seed(0)
    layers, heads, k, dim = 2, 4, 8, 16
    planted = (1, 2)
    maps = torch.randn(layers, heads, dim, k, generator=g) / k**0.5  # (L, H, D, k)
    sd = torch.tensor([2.0, 1.6, 1.3, 1.0, 0.7, 0.5, 0.3, 0.2])  # decreasing variances of y

    def sample(n: int) -> tuple[torch.Tensor, ...]:
        y = torch.randn(n, layers, heads, k, generator=g) * sd + 0.3  # (N, L, H, k)
        return y, torch.randn(n, layers, dim, generator=g) * 0.5, torch.randn(n, dim, generator=g) * 0.1 + 1

    train, test = sample(1000), sample(500)
    bases = fit_unit_bases([train], maps)
    phi = bases.heads.components[planted][2]  # the planted head's 3rd principal component (D,)
    mu = bases.heads.mean[planted]

    def batch(data):
        c = torch.einsum("dk,nk->nd", maps[planted], data[0][:, planted[0], planted[1]])  # (N, D)
        return Contributions(*data, ((c - mu) @ phi > 0).long())

    train_b, test_b = batch(train), batch(test)
    assert 0.4 < train_b.label.float().mean() < 0.6
    classifier = F.normalize(torch.randn(dim, 2, generator=g), dim=0)  # a fixed "text" classifier (D, 2)

    adapter = build_adapter("residual_star", bases, maps, init="ones")
    assert bool(adapter.head_select[planted][2])  # the 0.9 threshold keeps the 3rd component
    init = adapter.head_lambdas.detach().clone()
    opt = torch.optim.Adam(adapter.parameters(), lr=0.1)
    for _ in range(150):
        logits = 20.0 * F.normalize(adapter(train_b), dim=-1) @ classifier
        loss = F.cross_entropy(logits, train_b.label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (F.normalize(adapter(test_b), dim=-1) @ classifier).argmax(-1)
    assert (pred == test_b.label).float().mean() >= 0.9
    change = (adapter.head_lambdas.detach() - init).abs() * adapter.head_select  # (L, H, K)
    assert torch.nonzero(change == change.max()).tolist() == [[*planted, 2]]


def test_spectral_standard_basis_scales_each_coordinate():
    """``basis: standard`` (the authors' code): ``lambda * (e - mu)`` elementwise, D scales."""
    bases, maps = fitted_bases(2, 3, 8, 16)
    batch = random_batch(bases, n=5)
    e = batch.embedding(maps)
    standard = build_adapter("spectral", bases, maps, basis="standard", seed=3)
    assert standard.num_learned() == 16
    expected = standard.lambdas.detach() * (e - bases.output.mean)
    torch.testing.assert_close(standard(batch).detach(), expected, rtol=1e-5, atol=1e-5)
    pca = build_adapter("spectral", bases, maps, seed=3)  # output_pca, the default
    phi = bases.output.components
    expected = ((e - bases.output.mean) @ phi.T * pca.lambdas.detach()) @ phi
    torch.testing.assert_close(pca(batch).detach(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pca(batch), standard(batch))
    # explained_variance in the standard basis: each coordinate's variance on the reference data
    var = build_adapter("spectral", bases, maps, basis="standard", init="explained_variance")
    coord_var = (phi.pow(2) * bases.output.explained_variance[:, None]).sum(0)
    torch.testing.assert_close(var.lambdas.detach(), coord_var)
    with pytest.raises(ValueError, match="basis"):
        build_adapter("spectral", bases, maps, basis="other")

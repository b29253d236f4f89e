"""Streaming per-unit PCA (spectral.py), component selection (unit_bases.py) and the compact ResiDual
transform (transform.py)."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import build_clip
from sklearn.decomposition import PCA

from residual_lightning.contributions import Contributions
from residual_lightning.spectral import MomentAccumulator, UnitBases, fit_unit_bases, select_components
from residual_lightning.transform import compact_projection, transform_dense, transform_heads
from residual_lightning.units import decompose_compact

N_REF = 80


@functools.cache
def _compact(convention: str, n: int = N_REF, seed: int = 1):
    """Float64 compact contributions of a tiny random CLIP (L=3, H=4, d=16, D=48); shared, read-only."""
    model = build_clip()
    size = model.visual.image_size[0]
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cc = decompose_compact(model, images, convention)
    cc.heads, cc.mlps, cc.emb, cc.head_maps = (t.double() for t in (cc.heads, cc.mlps, cc.emb, cc.head_maps))
    return cc


@pytest.fixture(scope="module", params=["default", "equal_share"])
def compact(request):
    return _compact(request.param)


def _fit(cc, batches=None, **kw):
    batches = batches or [(cc.heads, cc.mlps, cc.emb)]
    return fit_unit_bases(batches, cc.head_maps, convention=cc.convention, dtype=torch.float64, **kw)


def _assert_matches_sklearn(data: np.ndarray, basis, k_expected: int | None = None):
    ref = PCA(svd_solver="full").fit(data)
    k = int(basis.rank())
    if k_expected is not None:
        assert k == k_expected
    ev = basis.explained_variance.numpy()
    np.testing.assert_allclose(ev[:k], ref.explained_variance_[:k], rtol=1e-6)
    np.testing.assert_allclose(
        basis.explained_variance_ratio.numpy()[:k], ref.explained_variance_ratio_[:k], rtol=1e-6
    )
    np.testing.assert_allclose(basis.mean.numpy(), ref.mean_, rtol=1e-9, atol=1e-12)
    ours, theirs = basis.components.numpy()[:k], ref.components_[:k]
    signs = np.sign((ours * theirs).sum(1, keepdims=True))
    np.testing.assert_allclose(ours, signs * theirs, atol=1e-6 * np.abs(theirs).max())
    # Beyond the numerical rank (not a cut at K): nothing, and sklearn sees only noise there.
    assert (ev[k:] == 0).all()
    if k < basis.num_components and k < len(ref.explained_variance_):
        assert ref.explained_variance_[k] < 1e-9 * ref.explained_variance_[0]


def test_pca_parity_with_sklearn(compact):
    """Head (compact coordinates), MLP, emb and output PCA equal sklearn's full-SVD PCA."""
    bases = _fit(compact)
    full = compact.expand().numpy()  # (N, U, D), float64 (heads expanded in float64)
    layers, heads = compact.heads.shape[1:3]
    d = 16
    assert bases.heads.num_components == d  # top d components under both conventions
    for layer, h in [(0, 0), (1, 2), (2, 3)]:
        idx = 1 + layers + layer * heads + h
        _assert_matches_sklearn(full[:, idx], bases.heads[layer, h], k_expected=d)
    for layer in range(layers):
        _assert_matches_sklearn(full[:, 1 + layer], bases.mlps[layer], k_expected=48)
    # emb is rank 1 (default: a fixed vector over sigma) or 2 (equal_share: its mean share too).
    _assert_matches_sklearn(full[:, 0], bases.emb, k_expected=1 if compact.convention == "default" else 2)
    _assert_matches_sklearn(full.sum(1), bases.output)


def test_components_orthonormal_sorted_and_sign_fixed(compact):
    bases = _fit(compact)
    for basis in (bases.heads, bases.mlps, bases.emb):
        comps = basis.components  # (*U, K, D)
        gram = comps @ comps.mT
        eye = torch.diag_embed(basis.mask.double())
        torch.testing.assert_close(gram, eye, atol=1e-10, rtol=0)
        ev = basis.explained_variance
        assert (ev[..., :-1] >= ev[..., 1:]).all()
        peak = comps.gather(-1, comps.abs().argmax(-1, keepdim=True)).squeeze(-1)
        assert (peak[basis.mask] > 0).all()
    # The kept head components lie in the span of the head map.
    q, _ = torch.linalg.qr(compact.head_maps)  # (L, H, D, k)
    proj = bases.heads.components @ q @ q.mT  # (L, H, K, D)
    torch.testing.assert_close(proj, bases.heads.components, atol=1e-10, rtol=0)


def test_equal_share_total_includes_dropped_components():
    """Ratios are over the unit's total variance: the top d of d+2 directions sum to < 1."""
    bases = _fit(_compact("equal_share"))
    sums = bases.heads.explained_variance_ratio.sum(-1)
    assert (sums < 1 - 1e-6).all() and (sums > 0.9).all()
    full = _fit(_compact("equal_share"), head_components=18)
    assert full.heads.num_components == 18
    assert full.heads.rank().max() == 18  # d + 2 directions: the "1" coordinate has no variance
    torch.testing.assert_close(
        full.heads.explained_variance_ratio.sum(-1), torch.ones(3, 4, dtype=torch.float64)
    )


def test_streaming_equals_one_batch(compact):
    one = _fit(compact)
    cuts = [0, 7, 8, 30, 61, N_REF]  # uneven, including a batch of one sample
    batches = [
        Contributions(compact.heads[a:b], compact.mlps[a:b], compact.emb[a:b], torch.zeros(b - a))
        for a, b in zip(cuts, cuts[1:])
    ]
    many = _fit(compact, batches=batches, chunk_size=5)
    assert many.n_samples == one.n_samples == N_REF
    for kind in ("heads", "mlps", "emb", "output"):
        a, b = getattr(one, kind), getattr(many, kind)
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.explained_variance, b.explained_variance, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(a.components, b.components, rtol=0, atol=1e-7)


def _state(acc: MomentAccumulator) -> list[torch.Tensor]:
    return [t.clone() for m in (acc._head, acc._dense, acc._out) for t in (m.mean, m.m2)]


def test_all_reduce_world_size_one_is_a_noop(tmp_path):
    cc = _compact("default", n=40)
    acc = MomentAccumulator(cc.head_maps)
    acc.update((cc.heads, cc.mlps, cc.emb))
    before, ref = _state(acc), acc.finalize(torch.float64)
    acc.all_reduce()  # not initialised: returns at once
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        acc.all_reduce()  # runs the collectives
    finally:
        dist.destroy_process_group()
    for a, b in zip(before, _state(acc)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    assert acc.count == 40
    after = acc.finalize(torch.float64)
    torch.testing.assert_close(after.heads.components, ref.heads.components, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="after all_reduce"):
        acc.update((cc.heads, cc.mlps, cc.emb))


class _ThreadWorld:
    """A fake process group over threads: all_reduce sums a tensor over the participants."""

    def __init__(self, world: int):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world)
        self.local = threading.local()

    def all_reduce(self, tensor, group=None):
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        total = sum(self.slots)
        self.barrier.wait()
        tensor.copy_(total)


def test_all_reduce_of_shards_equals_pca_of_all(monkeypatch):
    """Three ranks with shards of different sizes (one empty) reduce to the PCA of all data."""
    cc = _compact("default")
    world = _ThreadWorld(3)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", world.all_reduce)
    shards = [slice(0, 50), slice(50, N_REF), slice(0, 0)]
    results = [None] * 3

    def rank(r):
        world.local.rank = r
        acc = MomentAccumulator(cc.head_maps)
        if shards[r].stop > shards[r].start:
            sl = shards[r]
            acc.update((cc.heads[sl], cc.mlps[sl], cc.emb[sl]))
        acc.all_reduce()
        results[r] = acc.finalize(torch.float64)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    ref = _fit(cc)
    for res in results:
        assert res.n_samples == N_REF
        torch.testing.assert_close(
            res.mlps.explained_variance, ref.mlps.explained_variance, rtol=1e-9, atol=1e-15
        )
        torch.testing.assert_close(res.heads.components, ref.heads.components, rtol=0, atol=1e-7)
        torch.testing.assert_close(res.output.mean, ref.output.mean, rtol=1e-12, atol=1e-12)


def test_save_load_round_trip(tmp_path, compact):
    bases = _fit(compact, metadata={"model": "tiny", "dataset": "noise"})
    path = tmp_path / "bases.safetensors"
    bases.save(path)
    loaded = UnitBases.load(path)
    assert (loaded.n_samples, loaded.convention, loaded.metadata) == (
        N_REF,
        compact.convention,
        bases.metadata,
    )
    assert loaded.names == bases.names and loaded.head_dim == compact.heads.shape[-1]
    for kind in ("heads", "mlps", "emb", "output"):
        for name in ("mean", "components", "explained_variance", "explained_variance_ratio", "mask"):
            a, b = getattr(getattr(bases, kind), name), getattr(getattr(loaded, kind), name)
            assert a.dtype == b.dtype and torch.equal(a, b), (kind, name)
    assert torch.equal(loaded.head_coord_mean, bases.head_coord_mean)
    assert torch.equal(loaded.unit("l1.h2").components, bases.heads.components[1, 2])
    assert torch.equal(loaded.unit("l2.mlp").mean, bases.mlps.mean[2])

    from safetensors.torch import save_file

    from residual_lightning.files import CacheError, save_tensors

    other = tmp_path / "other.safetensors"
    save_tensors(other, {"x": torch.zeros(2)}, "classifier", None)
    with pytest.raises(CacheError, match="is not a bases file"):
        UnitBases.load(other)
    save_file({"x": torch.zeros(2)}, str(other))  # no kind, format or checksum: an older version's file
    with pytest.raises(CacheError, match="written by an older residual-lightning"):
        UnitBases.load(other)


def test_shapes_never_depend_on_the_data():
    """Fewer samples than components: same padded shapes, ranks capped at N - 1, rest masked."""
    cc = _compact("default", n=6)
    small, big = _fit(cc), _fit(_compact("default"))
    for kind in ("heads", "mlps", "emb", "output"):
        a, b = getattr(small, kind), getattr(big, kind)
        for name in ("mean", "components", "explained_variance", "mask"):
            assert getattr(a, name).shape == getattr(b, name).shape
    assert (small.heads.rank() == 5).all() and (small.mlps.rank() == 5).all()
    assert (small.heads.components[..., 5:, :] == 0).all()
    for selection in ("all", 3, 40, 0.5, 0.99, 1.0):
        assert small.heads.select(selection).shape == big.heads.select(selection).shape == (3, 4, 16)


def test_select_components():
    # Dyadic ratios, so that cumulative sums are exact in float32.
    ratio = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625], [0.75, 0.25, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    assert select_components(ratio, mask, 0.75).sum(-1).tolist() == [3, 2]  # 0.75 is not > 0.75
    assert select_components(ratio, mask, 0.74).sum(-1).tolist() == [2, 1]
    assert select_components(ratio, mask, 0.4).sum(-1).tolist() == [1, 1]
    assert select_components(ratio, mask, 0.9).sum(-1).tolist() == [4, 2]
    assert select_components(ratio, mask, 0.95).tolist() == mask.tolist()  # never beyond the rank
    assert select_components(ratio, mask, 1.0).tolist() == mask.tolist()
    assert select_components(ratio, mask, "all").tolist() == mask.tolist()
    assert select_components(ratio, mask, 3).sum(-1).tolist() == [3, 2]
    assert select_components(ratio, mask, 0).sum().item() == 0
    sel = select_components(ratio, mask, 0.4)
    assert sel[:, 0].all() and not sel[:, 1:].any()  # a prefix
    for bad, err in (
        ("some", ValueError),
        (-1, ValueError),
        (1.5, ValueError),
        (0.0, ValueError),
        (True, TypeError),
    ):
        with pytest.raises(err):
            select_components(ratio, mask, bad)


def test_threshold_is_smallest_k_on_real_bases(compact):
    bases = _fit(compact)
    cum = torch.cumsum(bases.mlps.explained_variance_ratio, -1)  # (L, K)
    k = bases.mlps.select(0.9).sum(-1)  # (L,)
    for layer in range(3):
        kk = int(k[layer])
        assert cum[layer, kk - 1] > 0.9 and (kk == 1 or cum[layer, kk - 2] <= 0.9)


def test_compact_transform_equals_expanded(compact):
    """Phi^T diag(lambda) Phi (c - mu) from y via B = Phi A equals the transform in D."""
    bases = _fit(compact)
    g = torch.Generator().manual_seed(0)
    lam_h = torch.randn(bases.heads.mask.shape, generator=g, dtype=torch.float64)
    lam_m = torch.randn(bases.mlps.mask.shape, generator=g, dtype=torch.float64)
    b, offset = compact_projection(bases.heads.components, compact.head_maps, bases.head_coord_mean)
    ours = transform_heads(compact.heads, b, offset, lam_h, bases.heads.components)  # (N, D)
    c = compact.head_contributions()  # (N, L, H, D)
    phi = bases.heads.components  # (L, H, K, D)
    coords = torch.einsum("lhkd,nlhd->nlhk", phi, c - bases.heads.mean)
    ref = torch.einsum("nlhk,lhkd->nd", coords * lam_h, phi)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)

    ours = transform_dense(compact.mlps, bases.mlps.components, bases.mlps.mean, lam_m)
    phi = bases.mlps.components
    ref = torch.einsum("lkd,lk,lke,nle->nd", phi, lam_m, phi, compact.mlps - bases.mlps.mean)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_update_rejects_wrong_shapes():
    cc = _compact("default", n=4)
    acc = MomentAccumulator(cc.head_maps)
    with pytest.raises(ValueError, match="batch heads has shape"):
        acc.update((cc.heads[..., :8], cc.mlps, cc.emb))
    with pytest.raises(TypeError, match="expected Contributions"):
        acc.update(cc.heads)
    with pytest.raises(ValueError, match="at least 2 samples"):
        acc.finalize()
    with pytest.raises(ValueError, match="head_components"):
        MomentAccumulator(cc.head_maps, head_components=17)

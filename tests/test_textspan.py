"""TextSpan and SOMP on planted data, the streamed per-unit path, and description banks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_synthetic_cache as write_cache

from residual_lightning.analysis.bank import encode_bank, load_bank
from residual_lightning.analysis.textspan import head_descriptions, somp, textspan, unit_spectra

PLANTED = (7, 42, 101)  # bank rows the data is made of
STDS = (3.0, 2.0, 1.0)  # their standard deviations in the data


def planted(n: int, dim: int = 256, m: int = 300, noise: float = 1e-2, seed: int = 0):
    """A bank of m random unit vectors and n samples = sum of 3 bank rows with decreasing spreads.

    Returns the bank (m, D), the samples (n, D) and the expected variance shares of the 3 rows.
    """
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(m, dim, generator=g, dtype=torch.float64), dim=-1)
    coef = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor(STDS, dtype=torch.float64)
    coef = coef - coef.mean(0)
    x = coef @ bank[list(PLANTED)] + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = x + 5.0  # an offset TextSpan must centre away
    total = float(((x - x.mean(0)) ** 2).sum())
    # Random directions in D = 256 are nearly orthogonal: each share is ~ its coefficient's energy.
    shares = [float((coef[:, i] ** 2).sum()) / total for i in range(3)]
    return bank, x, shares


@pytest.mark.parametrize("n", [500, 40])  # N > D and N < D
def test_textspan_recovers_planted_descriptions_in_order(n):
    bank, x, shares = planted(n)
    picks = textspan(x, bank, k=3)
    assert [i for i, _ in picks] == list(PLANTED)
    got = [s for _, s in picks]
    assert got == pytest.approx(shares, abs=0.03)
    assert sum(got) == pytest.approx(1.0, abs=0.01)
    assert got == sorted(got, reverse=True)


def test_textspan_never_repeats_and_shares_add_up():
    bank, x, _ = planted(500)
    bank = torch.cat([bank, bank[PLANTED[0]][None]])  # an exact duplicate of the first pick
    picks = textspan(x, bank, k=25)
    indices = [i for i, _ in picks]
    assert len(indices) == len(set(indices)) == 25
    assert bank.shape[0] - 1 not in indices  # deflated to zero once its twin was picked
    shares = torch.tensor([s for _, s in picks])
    assert bool((shares >= 0).all()) and float(shares.sum()) <= 1.0 + 1e-9


def test_textspan_picked_directions_are_orthogonal():
    """The deflated directions of the picks are orthonormal: their shares add like a projection's."""
    bank, x, _ = planted(500, noise=0.3)
    picks = textspan(x, bank, k=6)
    xc = x - x.mean(0)
    # Gram-Schmidt of the picked (normalised, centred) bank rows gives the deflated directions.
    b = torch.nn.functional.normalize(bank, dim=-1)
    b = b - b.mean(0)
    q, _ = torch.linalg.qr(b[[i for i, _ in picks]].T)  # (D, 6)
    captured = float(((xc @ q) ** 2).sum() / (xc**2).sum())
    assert sum(s for _, s in picks) == pytest.approx(captured, rel=1e-9)


def test_textspan_rank_limits_the_span():
    bank, x, _ = planted(500)
    picks = textspan(x, bank, k=5, rank=2)
    assert [i for i, _ in picks[:2]] == list(PLANTED[:2])
    assert len(picks) == 2  # a rank-2 span is exhausted after two picks


@pytest.mark.parametrize("n", [500, 40])
def test_somp_recovers_planted_atoms(n):
    bank, x, _ = planted(n)
    picks = somp(x, bank, k=3)
    assert sorted(i for i, _ in picks) == sorted(PLANTED)
    assert picks[0][0] == PLANTED[0]
    fractions = [f for _, f in picks]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0, abs=0.01)


def test_somp_never_repeats_and_l2_criterion():
    bank, x, _ = planted(200)
    for criterion in ("l1", "l2"):
        picks = somp(x, bank, k=12, criterion=criterion)
        indices = [i for i, _ in picks]
        assert len(set(indices)) == 12
        assert set(PLANTED) <= set(indices[:3])
    with pytest.raises(ValueError, match="criterion"):
        somp(x, bank, criterion="max")


# --------------------------------------------------------------------------------------------
# The streamed per-unit path on a real (synthetic) cache
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    n, layers, nheads, k, dim = 300, 2, 3, 8, 24
    # Heads with few dominant coordinates, so their spectra are far from isotropic.
    scale = torch.tensor([4.0, 2.0, 1.0] + [0.1] * (k - 3))
    heads = torch.randn(n, layers, nheads, k, generator=g) * scale + 1.0
    mlps = torch.randn(n, layers, dim, generator=g)
    emb = torch.randn(n, dim, generator=g) * 0.5
    labels = torch.randint(0, 3, (n,), generator=g)
    maps = torch.randn(layers, nheads, dim, k, generator=g)
    return write_cache(tmp_path_factory.mktemp("cache") / "c", heads, mlps, emb, labels, maps)


def test_streamed_spectra_match_the_expanded_contributions(small_cache):
    full = small_cache.batch(slice(0, len(small_cache)))
    c = torch.einsum("lhdk,nlhk->nlhd", small_cache.head_maps.double(), full.heads.double())  # (N, L, H, D)
    spectra = unit_spectra(small_cache, ["l1.h2", "l0.mlp", "emb"], batch_size=64)
    for name, x in (("l1.h2", c[:, 1, 2]), ("l0.mlp", full.mlps[:, 0].double()), ("emb", full.emb.double())):
        vecs, vals = spectra[name]
        xc = x - x.mean(0)
        expected = torch.linalg.svdvals(xc) ** 2 / (x.shape[0] - 1)
        r = min(vals.numel(), expected.numel())  # a head has at most k directions
        assert vals[:r].tolist() == pytest.approx(expected[:r].tolist(), rel=1e-6, abs=1e-9)
        assert float(expected[r:].sum()) <= 1e-9 * float(expected.sum())
        # Same top direction up to sign.
        top = torch.linalg.svd(xc, full_matrices=False)[2][0]
        assert abs(float(vecs[:, 0] @ top)) == pytest.approx(1.0, abs=1e-6)


def test_head_descriptions_equal_textspan_on_expanded_heads(small_cache):
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(40, 24, generator=g)
    descriptions = [f"description {i}" for i in range(40)]
    rows = head_descriptions(small_cache, bank, descriptions, k=4, batch_size=100)
    assert len(rows) == 6 * 4 and {r["unit"] for r in rows} == {
        f"l{i}.h{h}" for i in range(2) for h in range(3)
    }
    full = small_cache.batch(slice(0, len(small_cache)))
    c = torch.einsum("lhdk,nlhk->nlhd", small_cache.head_maps.double(), full.heads.double())
    expected = textspan(c[:, 0, 1], bank, k=4)
    got = [r for r in rows if r["unit"] == "l0.h1"]
    assert [r["index"] for r in got] == [i for i, _ in expected]
    assert [r["share"] for r in got] == pytest.approx([s for _, s in expected], rel=1e-6)
    assert [r["rank"] for r in got] == [1, 2, 3, 4]
    assert got[-1]["cumulative"] == pytest.approx(sum(s for _, s in expected), rel=1e-6)
    assert got[0]["description"] == descriptions[got[0]["index"]]
    with pytest.raises(ValueError, match="l9.h0"):
        head_descriptions(small_cache, bank, descriptions, units=["l9.h0"])


# --------------------------------------------------------------------------------------------
# Banks
# --------------------------------------------------------------------------------------------


def test_load_bank_shipped_user_and_classes(tmp_path):
    shipped = load_bank()
    assert len(shipped) >= 500 and len(set(shipped)) == len(shipped)
    txt = tmp_path / "bank.txt"
    txt.write_text("# my bank\na red car\n\na dog\na red car\n")
    assert load_bank(txt) == ["a red car", "a dog"]
    yml = tmp_path / "bank.yaml"
    yml.write_text("- a cat\n- a boat\n")
    assert load_bank(yml, class_names=["cat", "zebra"]) == [
        "a cat",
        "a boat",
        "a photo of a cat.",
        "a photo of a zebra.",
    ]
    with pytest.raises(FileNotFoundError):
        load_bank(tmp_path / "missing.txt")


class _Spec:
    """A BackboneSpec stand-in that counts loads (the real tiny backbone does the encoding)."""

    model_name, weights_id = "RL-Tiny-ViT-64", "random"

    def __init__(self):
        self.loads = 0

    def load(self):
        from residual_lightning.units import load_backbone

        self.loads += 1
        torch.manual_seed(0)
        return load_backbone(self.model_name)


def test_encode_bank_is_normalised_and_cached(tmp_path):
    spec = _Spec()
    descriptions = ["a red object", "a dog", "a {curly} brace"]
    emb = encode_bank(spec, descriptions, cache_dir=tmp_path)
    assert emb.shape == (3, 128)
    assert np.allclose(emb.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    again = encode_bank(spec, descriptions, cache_dir=tmp_path)
    assert spec.loads == 1 and torch.equal(emb, again)
    assert len(list(tmp_path.glob("classifier-*.safetensors"))) == 1

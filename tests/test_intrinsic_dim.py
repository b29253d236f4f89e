"""Intrinsic dimension: TwoNN against known IDs and scikit-dimension, linear ID against sklearn PCA."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import make_swiss_roll
from sklearn.decomposition import PCA

from residual_lightning.analysis import id_profile, layer_profile, linear_id, plot_id_profile, twonn
from residual_lightning.analysis.intrinsic_dim import _span_coordinates

skdim = pytest.importorskip("skdim")

N = 5000


def _embed(z: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Map (N, k) points into R^dim with a random orthonormal (isometric) map."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, z.shape[1])))  # (dim, k), orthonormal columns
    return z @ q.T  # (N, dim)


@pytest.fixture(scope="module")
def gaussian5() -> np.ndarray:
    rng = np.random.default_rng(0)
    return _embed(rng.standard_normal((N, 5)), 512, seed=1)


@pytest.fixture(scope="module")
def swiss_roll() -> np.ndarray:
    return make_swiss_roll(N, random_state=0)[0]


@pytest.fixture(scope="module")
def sphere10() -> np.ndarray:
    """Uniform points on the 10-sphere S^10 in R^11, embedded in R^64: TwoNN underestimates its ID."""
    rng = np.random.default_rng(2)
    z = rng.standard_normal((N, 11))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return _embed(z, 64, seed=3)


def test_gaussian_embedded_in_512_dims(gaussian5):
    assert twonn(torch.from_numpy(gaussian5)) == pytest.approx(5.0, rel=0.05)


def test_swiss_roll(swiss_roll):
    assert twonn(swiss_roll) == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("name", ["gaussian5", "swiss_roll", "sphere10"])
def test_matches_skdim(name, request):
    x = request.getfixturevalue(name)
    reference = skdim.id.TwoNN().fit(x).dimension_
    assert twonn(x) == pytest.approx(reference, rel=0.02)
    # Same neighbours, same F_emp and discard rule: in float64 the two agree to rounding.
    assert twonn(x, dtype=torch.float64) == pytest.approx(reference, rel=1e-9)


def test_low_rank_path_equals_full_path(gaussian5):
    x = torch.from_numpy(gaussian5)
    assert _span_coordinates(x, torch.float64, 1e-10, low_rank=True).shape == (N, 5)
    projected = twonn(x, dtype=torch.float64, low_rank=True)
    full = twonn(x, dtype=torch.float64, low_rank=False)
    assert projected == pytest.approx(full, rel=1e-6)


def test_low_rank_path_finds_directions_its_row_subset_misses(gaussian5):
    """The span is first estimated on the rows (i * N) // 4D; a row outside them may leave that span."""
    x = torch.from_numpy(gaussian5[:3000]).clone()
    subset = set(((torch.arange(4 * 512) * 3000) // (4 * 512)).tolist())
    outside = min(set(range(3000)) - subset)
    direction = torch.randn(512, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x[outside] += 3.0 * direction / direction.norm()
    assert _span_coordinates(x, torch.float64, 1e-10, low_rank=True).shape == (3000, 6)
    projected = twonn(x, dtype=torch.float64, low_rank=True)
    assert projected == pytest.approx(twonn(x, dtype=torch.float64, low_rank=False), rel=1e-6)


def test_low_rank_path_keeps_full_rank_data():
    x = torch.randn(600, 20, generator=torch.Generator().manual_seed(0))
    assert _span_coordinates(x, torch.float32, 1e-10, low_rank=True).shape == (600, 20)


def test_chunked_equals_unchunked(sphere10):
    x = torch.from_numpy(sphere10).float()
    assert twonn(x, chunk_size=97) == pytest.approx(twonn(x, chunk_size=N), rel=1e-9)


def test_duplicates_give_the_estimate_of_the_distinct_points(gaussian5):
    x = torch.from_numpy(gaussian5[:2000])
    with_dups = torch.cat([x, x[:150], x[:10]])  # (2160, 512): 160 duplicate rows
    with pytest.warns(UserWarning, match="160 duplicate rows"):
        estimate = twonn(with_dups, dtype=torch.float64)
    assert math.isfinite(estimate)
    assert estimate == pytest.approx(twonn(x, dtype=torch.float64), rel=1e-9)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="3 distinct points, got 1"):
        twonn(torch.ones(50, 4))
    with pytest.raises(ValueError, match="NaN"):
        twonn(torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="fraction"):
        twonn(torch.randn(10, 3), fraction=1.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        twonn(torch.randn(10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(sphere10):
    x = torch.from_numpy(sphere10)
    assert twonn(x.cuda(), dtype=torch.float64) == pytest.approx(twonn(x, dtype=torch.float64), rel=1e-9)


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(2000, 64), (40, 64)])
def test_linear_id_matches_sklearn_pca(threshold, shape):
    rng = np.random.default_rng(4)
    n, dim = shape
    x = rng.standard_normal((n, dim)) * np.geomspace(10.0, 0.01, dim)  # decaying spectrum
    x = x @ np.linalg.qr(rng.standard_normal((dim, dim)))[0]  # rotate away from the axes
    cumulative = np.cumsum(PCA().fit(x).explained_variance_ratio_)
    expected = int(np.argmax(cumulative > threshold)) + 1
    assert linear_id(x, threshold) == expected
    assert linear_id(torch.from_numpy(x).float(), threshold) == expected


def _units(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def unit(k: int) -> torch.Tensor:
        basis = torch.linalg.qr(torch.randn(32, k, generator=g, dtype=torch.float64))[0]  # (32, k)
        return torch.randn(400, k, generator=g, dtype=torch.float64) @ basis.T  # (400, 32), rank k

    return {
        "emb": unit(2),
        "l0.h0": unit(3),
        "l0.h1": unit(5),
        "l0.mlp": unit(8),
        "l1.h0": unit(4),
        "l1.mlp": unit(6),
    }


def test_id_profile_and_layer_profile(tmp_path):
    units = _units()
    rows = id_profile(units, max_points=300, device="cpu")
    assert [r["unit"] for r in rows] == list(units)
    assert all(r["n_points"] == 300 for r in rows)
    # A Gaussian of rank k needs all k components to reach 99% of its variance.
    assert [r["linear_id"] for r in rows] == [2, 3, 5, 8, 4, 6]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["linear_id"] / r["twonn_id"])

    # The callable form gives the same rows.
    assert id_profile(lambda: iter(units.items()), max_points=300, device="cpu") == rows

    layers = layer_profile(rows)
    assert [(r["layer"], r["kind"], r["n_units"]) for r in layers] == [
        (-1, "emb", 1),
        (0, "heads", 2),
        (0, "mlp", 1),
        (1, "heads", 1),
        (1, "mlp", 1),
    ]
    heads0 = layers[1]
    assert heads0["twonn_id"] == pytest.approx((rows[1]["twonn_id"] + rows[2]["twonn_id"]) / 2)
    assert heads0["ratio"] == pytest.approx((rows[1]["ratio"] + rows[2]["ratio"]) / 2)

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(layers[0]))
    writer.writeheader()
    writer.writerows(layers)
    assert buffer.getvalue().splitlines()[0] == "layer,kind,n_units,linear_id,twonn_id,ratio"

    png = plot_id_profile(layers, tmp_path / "figs" / "id.png", title="toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_id_profile_records_nan_for_a_constant_unit():
    units = {
        "emb": torch.ones(100, 8),
        "l0.h0": torch.randn(100, 8, generator=torch.Generator().manual_seed(0)),
    }
    with pytest.warns(UserWarning, match="'emb'"):
        rows = id_profile(units, device="cpu")
    assert rows[0]["linear_id"] == 0 and math.isnan(rows[0]["twonn_id"]) and math.isnan(rows[0]["ratio"])
    assert math.isfinite(rows[1]["twonn_id"])


def test_layer_profile_rejects_unknown_unit_names():
    with pytest.raises(ValueError, match="unit name"):
        layer_profile([{"unit": "block3", "linear_id": 1, "twonn_id": 1.0, "ratio": 1.0}])

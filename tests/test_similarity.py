"""Spectral cosine similarity, basis truncation, and the text description bank."""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from residual_lightning.analysis import (
    greedy_matching,
    plot_similarity_heatmap,
    similarity_matrix,
    spectral_cosine_similarity,
    truncate_basis,
)

D = 32


def _pca(seed: int, n: int = 500, decay: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """Full PCA basis (D, D) and explained variances (D,) of a random anisotropic Gaussian."""
    g = torch.Generator().manual_seed(seed)
    scales = decay ** torch.arange(D, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    x = (torch.randn(n, D, generator=g, dtype=torch.float64) * scales) @ rotation.T  # (n, D)
    x = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return vh, s**2 / (n - 1)


def _random_orthogonal(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]


def test_identical_bases_score_one():
    components, variances = truncate_basis(*_pca(0), threshold=0.9)
    assert 1 < components.shape[0] < D
    assert spectral_cosine_similarity(components, components, variances, variances) == pytest.approx(
        1.0, abs=1e-12
    )


def test_invariant_to_component_signs():
    x, wx = truncate_basis(*_pca(0), threshold=0.9)
    y, wy = truncate_basis(*_pca(1), threshold=0.9)
    signs = torch.where(torch.rand(y.shape[0], generator=torch.Generator().manual_seed(5)) < 0.5, -1.0, 1.0)
    flipped = y * signs.double()[:, None]  # (k_y, D)
    base = spectral_cosine_similarity(x, y, wx, wy)
    assert spectral_cosine_similarity(x, flipped, wx, wy) == pytest.approx(base, abs=1e-14)
    assert spectral_cosine_similarity(-x, y, wx, wy) == pytest.approx(base, abs=1e-14)


def test_symmetric():
    x, wx = truncate_basis(*_pca(2), threshold=0.9)
    y, wy = truncate_basis(*_pca(3, decay=0.85), threshold=0.9)
    assert x.shape[0] != y.shape[0]  # the non-square case
    assert spectral_cosine_similarity(x, y, wx, wy) == pytest.approx(
        spectral_cosine_similarity(y, x, wy, wx), abs=1e-14
    )


def test_rotation_lowers_the_score():
    x, w = truncate_basis(*_pca(0), threshold=0.9)
    for seed in range(5):
        rotated = x @ _random_orthogonal(seed)  # (k, D), still orthonormal
        assert torch.allclose(rotated @ rotated.T, torch.eye(x.shape[0], dtype=torch.float64), atol=1e-12)
        assert spectral_cosine_similarity(x, rotated, w, w) < 1.0 - 1e-3


def test_scores_lie_in_unit_interval():
    bases = [
        truncate_basis(*_pca(seed, decay=decay), threshold=t)
        for seed, decay, t in [(0, 0.7, 0.9), (1, 0.8, 0.9), (2, 0.9, 0.95), (3, 0.5, 0.99), (4, 0.95, 0.5)]
    ]
    bases.append((bases[0][0] @ _random_orthogonal(9), bases[0][1]))
    matrix = similarity_matrix(bases)
    assert ((matrix >= 0) & (matrix <= 1 + 1e-12)).all()
    assert torch.equal(matrix, matrix.T)
    assert torch.allclose(matrix.diagonal(), torch.ones(len(bases), dtype=torch.float64), atol=1e-12)


def test_weights_are_scale_free():
    x, wx = truncate_basis(*_pca(0), threshold=0.9)
    y, wy = truncate_basis(*_pca(1), threshold=0.9)
    base = spectral_cosine_similarity(x, y, wx, wy)
    assert spectral_cosine_similarity(x, y, wx / wx.sum() * 3.0, 7.0 * wy) == pytest.approx(base, rel=1e-12)


def test_greedy_matching_on_a_hand_made_matrix():
    scores = torch.tensor([[0.2, 0.9, 0.1], [0.8, 0.85, 0.3], [0.0, 0.0, 0.05]])
    rows, cols, values = greedy_matching(scores)
    # 0.9 at (0, 1) first, which removes 0.85; then 0.8 at (1, 0); then the leftover 0.05.
    assert rows.tolist() == [0, 1, 2]
    assert cols.tolist() == [1, 0, 2]
    assert values.tolist() == pytest.approx([0.9, 0.8, 0.05])
    # Non-square: two picks only, the last column is never reached.
    _, cols, values = greedy_matching(torch.tensor([[0.5, 0.4, 0.1], [0.45, 0.2, 0.3]]))
    assert cols.tolist() == [0, 2] and values.tolist() == pytest.approx([0.5, 0.3])


def test_greedy_not_optimal_assignment_through_the_score():
    """Bases whose |X Y^T| is [[0.6, 0.55], [0.5, 0.05]]: greedy takes 0.6 then 0.05, not 0.55 and 0.5."""
    x = torch.eye(4, dtype=torch.float64)[:2]  # (2, 4)
    p = math.sqrt(1 - 0.6**2 - 0.5**2)
    q = -(0.6 * 0.55 + 0.5 * 0.05) / p
    s = math.sqrt(1 - 0.55**2 - 0.05**2 - q**2)
    y = torch.tensor([[0.6, 0.5, p, 0.0], [0.55, 0.05, q, s]], dtype=torch.float64)  # orthonormal rows
    assert torch.allclose(y @ y.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(x @ y.T, torch.tensor([[0.6, 0.55], [0.5, 0.05]], dtype=torch.float64))
    ones = torch.ones(2, dtype=torch.float64)
    score = spectral_cosine_similarity(x, y, ones, ones)
    assert score == pytest.approx(math.hypot(0.6, 0.05) / math.sqrt(2), abs=1e-12)
    assert score < math.hypot(0.55, 0.5) / math.sqrt(2)


def test_truncate_basis_rule():
    components = torch.eye(5)
    variances = torch.tensor([4.0, 3.0, 1.5, 1.0, 0.5])  # cumulative ratios 0.4, 0.7, 0.85, 0.95, 1
    assert truncate_basis(components, variances, 0.9)[0].shape == (4, 5)
    assert truncate_basis(components, variances, 0.75)[1].tolist() == [4.0, 3.0, 1.5]
    # A basis already cut at 3 components: with the true total, 0.9 is never exceeded, keep all.
    assert truncate_basis(components[:3], variances[:3], 0.9, total_variance=10.0)[0].shape[0] == 3
    ratios = variances / 10.0
    assert truncate_basis(components, variances, 0.6, explained_variance_ratio=ratios)[0].shape[0] == 2
    with pytest.raises(ValueError, match="threshold"):
        truncate_basis(components, variances, 0.0)


def test_truncate_basis_matches_sklearn_n_components():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, D)) * np.geomspace(5.0, 0.05, D)
    for threshold in (0.5, 0.8, 0.9, 0.99):
        full = PCA().fit(x)
        components, _ = truncate_basis(full.components_, full.explained_variance_, threshold)
        assert components.shape[0] == PCA(n_components=threshold).fit(x).n_components_


def test_bad_shapes_are_rejected():
    x = torch.eye(4, dtype=torch.float64)[:2]
    with pytest.raises(ValueError, match="same D"):
        spectral_cosine_similarity(x, torch.eye(3)[:2], torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="one weight per component"):
        spectral_cosine_similarity(x, x, torch.ones(3), torch.ones(2))


def test_heatmap_is_written(tmp_path):
    bases = [truncate_basis(*_pca(seed), threshold=0.9) for seed in range(3)]
    path = plot_similarity_heatmap(similarity_matrix(bases), tmp_path / "sim.png", labels=["a", "b", "c"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_description_bank():
    text = resources.files("residual_lightning").joinpath("resources/description_bank.txt").read_text("utf-8")
    lines = text.splitlines()
    assert len(lines) >= 500
    assert all(line.strip() == line and line for line in lines), "empty line or stray whitespace"
    assert len({line.lower() for line in lines}) == len(lines), "duplicate descriptions"

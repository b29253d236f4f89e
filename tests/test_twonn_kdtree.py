"""TwoNN's k-d tree neighbour search (CPU, few coordinates) against the blockwise search: the same
neighbours' distances and the same estimate, duplicate rows included."""

from __future__ import annotations

import pytest
import torch

from residual_lightning.analysis import intrinsic_dim


@pytest.mark.parametrize("rank", [2, 6])
def test_kdtree_search_matches_the_blockwise_one(rank, monkeypatch):
    g = torch.Generator().manual_seed(rank)
    y = torch.randn(1500, rank, generator=g, dtype=torch.float64)
    y[100] = y[7]  # an exact duplicate: r1 = 0 for both, whatever the order the tree returns
    tree = intrinsic_dim._two_nearest(y, 256)
    monkeypatch.setattr(intrinsic_dim, "_KDTREE_MAX_RANK", 0)  # force the blockwise search
    block = intrinsic_dim._two_nearest(y, 256)
    for a, b in zip(tree[:2], block[:2], strict=True):  # r1, r2
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert tree[0][7] == tree[0][100] == 0


def test_kdtree_estimate_equals_the_blockwise_estimate(monkeypatch):
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 5, generator=g, dtype=torch.float64))[0]  # (D, r)
    x = (torch.randn(3000, 5, generator=g, dtype=torch.float64) @ basis.T).float()  # rank 5 in 64 dims
    fast = intrinsic_dim.twonn(x)
    monkeypatch.setattr(intrinsic_dim, "_KDTREE_MAX_RANK", 0)
    assert fast == pytest.approx(intrinsic_dim.twonn(x), rel=1e-6)
    assert 4.0 < fast < 6.0

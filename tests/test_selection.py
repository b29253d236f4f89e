"""Unit-selection ablation: exact identities, score parity with a brute-force reference, a planted head."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import write_synthetic_cache as write_cache

from residual_lightning.analysis.selection import (
    ablate,
    ablation_accuracy,
    head_means,
    head_scores,
    plot_selection_curve,
    selection_curve,
    top_k_mask,
)

L, H, K, D, C = 3, 4, 6, 20, 4
PLANTED = (1, 2)  # the head that carries the label


def fixed_maps_and_classifier():
    """Random head maps whose heads (1, 2) and (0, 3) can write the C class vectors, and the classifier."""
    w = torch.nn.functional.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(101)), dim=-1)
    maps = torch.randn(L, H, D, K, generator=torch.Generator().manual_seed(100)) / D**0.5
    for layer, h in (PLANTED, (0, 3)):
        maps[layer, h, :, :C] = w.T  # coordinate c of y moves the output along class vector c
    return maps, w


def synthetic(n: int, seed: int, planted=PLANTED):
    """Contributions where only head `planted` points at the label's class vector."""
    g = torch.Generator().manual_seed(seed)
    maps, w = fixed_maps_and_classifier()
    labels = torch.randint(0, C, (n,), generator=g)
    heads = 0.3 * torch.randn(n, L, H, K, generator=g) + 0.2
    heads[:, planted[0], planted[1], :C] += 2.0 * torch.nn.functional.one_hot(labels, C).float()
    mlps = 0.3 * torch.randn(n, L, D, generator=g)
    emb = 0.3 * torch.randn(n, D, generator=g) + 0.1
    return heads, mlps, emb, labels, maps, w


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("sel")
    hv, mv, ev, lv, maps, w = synthetic(400, seed=0)
    ht, mt, et, lt, _, _ = synthetic(300, seed=1)
    val = write_cache(root / "val", hv, mv, ev, lv, maps)
    test = write_cache(root / "test", ht, mt, et, lt, maps)
    shuffled = lt[torch.randperm(len(lt), generator=torch.Generator().manual_seed(5))]
    test_shuffled = write_cache(root / "test_shuffled", ht, mt, et, shuffled, maps)
    # A validation set where another head carries the label: the selection must follow it.
    ho, mo, eo, lo, _, _ = synthetic(400, seed=2, planted=(0, 3))
    val_other = write_cache(root / "val_other", ho, mo, eo, lo, maps)
    return {"val": val, "test": test, "test_shuffled": test_shuffled, "val_other": val_other, "w": w}


def _all(cache):
    return cache.batch(slice(0, len(cache)))


def _accuracy(z: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((z @ w.T).argmax(-1) == labels).double().mean())


def test_all_heads_kept_equals_the_full_model(caches):
    test, w = caches["test"], caches["w"]
    batch = _all(test)
    full = _accuracy(batch.embedding(test.head_maps), w, batch.label)
    keep = torch.ones(L, H, dtype=torch.bool)
    assert ablate(test, w, keep, "zero") == pytest.approx(full, abs=1e-12)
    assert ablate(test, (w, 100.0), keep, "mean") == pytest.approx(full, abs=1e-12)
    # The scaled-cosine logits of the model rank classes the same way.
    scaled = 100.0 * torch.nn.functional.normalize(batch.embedding(test.head_maps), dim=-1) @ w.T
    assert float((scaled.argmax(-1) == batch.label).double().mean()) == pytest.approx(full)


def test_no_heads_with_mean_equals_emb_mlps_and_head_means(caches):
    test, w = caches["test"], caches["w"]
    batch = _all(test)
    c = torch.einsum("lhdk,nlhk->nlhd", test.head_maps.double(), batch.heads.double())  # (N, L, H, D)
    means = c.mean(0)  # (L, H, D)
    assert torch.allclose(head_means(test), means, atol=1e-10)
    z = batch.emb.double() + batch.mlps.double().sum(1) + means.sum((0, 1))
    none = torch.zeros(L, H, dtype=torch.bool)
    assert ablate(test, w, none, "mean") == pytest.approx(_accuracy(z, w.double(), batch.label))
    z0 = batch.emb.double() + batch.mlps.double().sum(1)
    assert ablate(test, w, none, "zero") == pytest.approx(_accuracy(z0, w.double(), batch.label))
    # Given means are used as they are, and several masks are evaluated at once.
    keep = torch.stack([none, torch.ones(L, H, dtype=torch.bool)])
    acc = ablation_accuracy(test, w, keep, "mean", means=torch.zeros(L, H, D))
    assert acc[0] == pytest.approx(_accuracy(z0, w.double(), batch.label))
    assert torch.equal(
        acc, ablation_accuracy(test, w, keep, "mean", means=torch.zeros(L, H, D), batch_size=37)
    )
    with pytest.raises(ValueError, match="replace"):
        ablate(test, w, none, "noise")


def test_scores_shapes_and_brute_force_parity(caches):
    val, w = caches["val"], caches["w"]
    scores = head_scores(val, w, ("zeroshot", "text_corr", "output_corr", "random"), batch_size=97)
    assert list(scores) == ["zeroshot", "text_corr", "output_corr", "random"]
    for s in scores.values():
        assert s.shape == (L, H) and bool(torch.isfinite(s).all())
    batch = _all(val)
    c = torch.einsum("lhdk,nlhk->nlhd", val.head_maps.double(), batch.heads.double()).numpy()  # (N, L, H, D)
    z = c.sum((1, 2)) + batch.emb.double().numpy() + batch.mlps.double().sum(1).numpy()  # (N, D)
    wd = w.double().numpy()
    q = np.linalg.qr(wd.T)[0]  # (D, C)

    def pearson_mean(x, y):  # mean over columns of the per-column Pearson correlation
        return np.mean([np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1])])

    for layer, h in [(0, 0), PLANTED, (2, 3)]:
        x = c[:, layer, h]
        assert float(scores["output_corr"][layer, h]) == pytest.approx(pearson_mean(x, z), abs=1e-9)
        assert float(scores["text_corr"][layer, h]) == pytest.approx(pearson_mean(x @ q, z @ q), abs=1e-9)
        zs = float(((x @ wd.T).argmax(-1) == batch.label.numpy()).mean())
        assert float(scores["zeroshot"][layer, h]) == pytest.approx(zs)
    assert torch.equal(
        head_scores(val, w, ["random"], seed=3)["random"], head_scores(val, w, ["random"], seed=3)["random"]
    )
    with pytest.raises(ValueError, match="unknown score"):
        head_scores(val, w, ["entropy"])


def test_planted_head_ranks_first_and_one_head_beats_random(caches):
    val, test, w = caches["val"], caches["test"], caches["w"]
    scores = head_scores(val, w, ("zeroshot", "text_corr"))
    assert top_k_mask(scores["zeroshot"], 1)[PLANTED]
    assert top_k_mask(scores["text_corr"], 1)[PLANTED]
    rows = selection_curve(val, test, w, 100.0, fractions=(1, 0.5), seeds=5)
    one = {(r["score"], r["replace"]): r for r in rows if r["k"] == 1}
    assert one[("zeroshot", "zero")]["heads"] == "l1.h2"
    for rep in ("zero", "mean"):
        assert one[("zeroshot", rep)]["test_accuracy"] > one[("random", rep)]["test_accuracy"] + 0.3
        assert one[("random", rep)]["seeds"] == 5
    full = [r for r in rows if r["score"] == "full"]
    assert len(full) == 1 and full[0]["k"] == L * H
    # rows: full + 2 replacements x 4 scores x 2 fractions
    assert len(rows) == 1 + 2 * 4 * 2
    half = [r for r in rows if r["target"] == 0.5]
    assert {r["k"] for r in half} == {6} and all(r["fraction"] == 0.5 for r in half)


def test_selection_reads_validation_only(caches):
    w = caches["w"]
    kwargs = dict(fractions=(1, 0.25), scores=("zeroshot", "text_corr", "output_corr"), replace=("zero",))
    rows = selection_curve(caches["val"], caches["test"], w, **kwargs)
    shuffled = selection_curve(caches["val"], caches["test_shuffled"], w, **kwargs)
    assert [r["heads"] for r in rows] == [r["heads"] for r in shuffled]  # same selection
    assert [r["test_accuracy"] for r in rows] != [r["test_accuracy"] for r in shuffled]  # other labels
    other = selection_curve(caches["val_other"], caches["test"], w, **kwargs)
    picked = {r["heads"] for r in other if r["score"] == "zeroshot" and r["k"] == 1}
    assert picked == {"l0.h3"}  # follows the validation data


def test_plot_selection_curve(caches, tmp_path):
    rows = selection_curve(caches["val"], caches["test"], caches["w"], seeds=3)
    path = plot_selection_curve(rows, tmp_path / "curve.png")
    assert path.stat().st_size > 10_000
    with open(tmp_path / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert len(list(csv.DictReader(open(tmp_path / "curve.csv")))) == len(rows)

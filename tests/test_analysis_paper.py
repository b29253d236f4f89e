"""The paper recipe of the analyses against the ResiDual authors' definitions, written out here.

Each reference below is a plain loop following the authors' released code (Flegyas/ResiDual:
``sparse_decomposition.textspan``, ``unit_distance.score_unit_correlation``,
``experiments/experiment3.py``, Ansuini-style TwoNN), never the project's formula, on data where
the project's default differs: a CLIP-like bank (a shared direction plus anisotropic spread),
heads whose sum is not the output (emb and MLPs non-zero), quantised points with ties, a toy layer.
Each test also checks that the default variant differs there, so the switch means something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_synthetic_cache as write_cache

from residual_lightning.analysis import similarity as similarity_module
from residual_lightning.analysis.intrinsic_dim import layer_profile, twonn
from residual_lightning.analysis.recipes import RECIPES, recipe_options
from residual_lightning.analysis.selection import _num_heads, ablation_accuracy, head_means, head_scores
from residual_lightning.analysis.similarity import similarity_bases
from residual_lightning.analysis.textspan import PAPER_TEXTSPAN, head_descriptions, textspan

D = 24


# --------------------------------------------------------------------------------------------
# TextSpan
# --------------------------------------------------------------------------------------------


def clip_like(n: int = 300, m: int = 150, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples with a large mean and anisotropic spread; a bank sharing one direction (as CLIP's)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.5, -1.5, D, dtype=torch.float64)  # (D,) anisotropic spread
    rot = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64)).Q
    x = (torch.randn(n, D, generator=g, dtype=torch.float64) * scales) @ rot.T + 2.0 * rot[:, 3]  # (N, D)
    shared = torch.nn.functional.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    bank = 8.0 * shared + torch.randn(m, D, generator=g, dtype=torch.float64) * torch.linspace(0.2, 1.5, D)
    return x, bank


def authors_textspan(x: torch.Tensor, bank: torch.Tensor, k: int, rank: int) -> tuple[list[int], list[float]]:
    """The authors' TextSpan, step by step: picks and cumulative explained-variance ratios."""
    dictionary = bank / bank.norm(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # the raw (uncentred) samples
    vh = vh[:rank]
    dictionary = (vh.T @ torch.linalg.inv(vh @ vh.T) @ vh @ dictionary.T).T
    total = float((x.std(dim=0) ** 2).sum())
    data = x - x.mean(0)
    recon = torch.zeros_like(data)
    picks, evr = [], []
    for _ in range(k):
        cross = data @ dictionary.T  # (N, M)
        best = int(cross.std(dim=0).argmax())
        t = dictionary[best]
        w = cross[:, best]
        data = data - torch.outer(w / t.norm() ** 2, t)
        recon = recon + torch.outer(w / t.norm() ** 2, t)
        dictionary = dictionary - torch.outer(dictionary @ t / t.norm() ** 2, t)
        picks.append(best)
        evr.append(float((recon.std(dim=0) ** 2).sum()) / total)
    return picks, evr


@pytest.mark.parametrize(("rank", "k"), [(12, 8), (3, 3)])
def test_textspan_paper_matches_the_authors_definition_on_a_clip_like_bank(rank, k):
    x, bank = clip_like()
    want, evr = authors_textspan(x, bank, k=k, rank=rank)
    got = textspan(x, bank, k=k, **{**PAPER_TEXTSPAN, "rank": rank})
    assert [i for i, _ in got] == want
    assert np.cumsum([s for _, s in got]) == pytest.approx(evr, abs=1e-9)
    assert [i for i, _ in textspan(x, bank, k=k)] != want  # the project's default
    if rank == 3:  # a short span: the uncentred SVD (with the mean direction) matters too
        assert [i for i, _ in textspan(x, bank, k=k, rank=rank, center_bank=False)] != want


def test_textspan_paper_streamed_from_a_cache_matches_the_reference(tmp_path):
    x, bank = clip_like(n=400, seed=1)
    x32 = x.float()
    n = len(x32)
    heads = torch.zeros(n, 1, 1, 2)
    cache = write_cache(
        tmp_path / "c", heads, x32[:, None], torch.zeros(n, D), torch.zeros(n).long(), torch.randn(1, 1, D, 2)
    )
    want, evr = authors_textspan(x32.double(), bank, k=6, rank=10)
    rows = head_descriptions(
        cache,
        bank,
        [str(i) for i in range(len(bank))],
        k=6,
        units=["l0.mlp"],
        **{**PAPER_TEXTSPAN, "rank": 10},
    )
    assert [r["index"] for r in rows] == want
    assert [r["cumulative"] for r in rows] == pytest.approx(evr, abs=1e-6)
    default = head_descriptions(
        cache, bank, [str(i) for i in range(len(bank))], k=6, units=["l0.mlp"], rank=10
    )
    assert [r["index"] for r in default] != want


# --------------------------------------------------------------------------------------------
# Head selection
# --------------------------------------------------------------------------------------------

L, H, K, C = 3, 4, 5, 4


def selection_data(n: int, seed: int):
    """Heads, MLPs and emb all non-zero (the heads' sum is not the output), a planted head, a classifier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(7)), dim=-1)
    maps = torch.randn(L, H, D, K, generator=torch.Generator().manual_seed(8)) / D**0.5
    maps[2, 1, :, :C] = w.T
    labels = torch.randint(0, C, (n,), generator=g)
    heads = 0.5 * torch.randn(n, L, H, K, generator=g) + 0.3
    heads[:, 2, 1, :C] += 1.5 * torch.nn.functional.one_hot(labels, C).float()
    mlps = torch.randn(n, L, D, generator=g) * torch.linspace(0.2, 2.0, D) + 0.5
    emb = 0.8 * torch.randn(n, D, generator=g) + w[0]  # pulls every sample toward class 0
    return heads, mlps, emb, labels, maps, w


@pytest.fixture(scope="module")
def sel(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-sel")
    hv, mv, ev, lv, maps, w = selection_data(300, 0)
    ht, mt, et, lt, _, _ = selection_data(250, 1)
    return {
        "val": write_cache(root / "val", hv, mv, ev, lv, maps),
        "test": write_cache(root / "test", ht, mt, et, lt, maps),
        "w": w,
    }


def expanded(cache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head contributions (N, L*H, D), the rest (emb + MLPs, (N, D)) and labels, in float64."""
    b = cache.batch(slice(0, len(cache)))
    heads = torch.einsum("lhdk,nlhk->nlhd", cache.head_maps.double(), b.heads.double()).reshape(
        len(b), L * H, D
    )
    return heads, b.emb.double() + b.mlps.double().sum(1), b.label


def authors_correlation(residual: torch.Tensor, prop: torch.Tensor | None) -> torch.Tensor:
    """score_unit_correlation: the heads' sum as target, per-coordinate Pearson, mean over coordinates."""
    output = residual.sum(1)  # (N, D): the heads only
    if prop is not None:
        basis = torch.linalg.qr(prop.T).Q.T  # (J, D)
        out_p, unit_p = output @ basis.T, residual @ basis.T
    else:
        out_p, unit_p = output, residual
    out_p, unit_p = out_p - out_p.mean(0), unit_p - unit_p.mean(0, keepdim=True)
    covar = (out_p[:, None, :] * unit_p).mean(0)  # (U, J)
    return (covar / (out_p.std(0)[None] * unit_p.std(0))).mean(-1)


def test_correlation_scores_paper_match_the_authors(sel):
    val, w = sel["val"], sel["w"].double()
    heads, rest, _ = expanded(val)
    full = heads.sum(1) + rest  # (N, D) the full outputs
    got = head_scores(val, w, ("text_corr", "output_corr"), correlation="authors")
    assert got["text_corr"].reshape(-1) == pytest.approx(authors_correlation(heads, w).tolist(), abs=1e-8)
    assert got["output_corr"].reshape(-1) == pytest.approx(
        authors_correlation(heads, full).tolist(), abs=1e-8
    )
    default = head_scores(val, w, ("text_corr", "output_corr"))
    for name in ("text_corr", "output_corr"):
        assert float((default[name] - got[name]).abs().max()) > 0.05


def test_top_k_ablation_paper_keeps_only_the_kept_heads(sel):
    val, test, w = sel["val"], sel["test"], sel["w"].double()
    heads_t, rest_t, labels = expanded(test)
    heads_v, rest_v, _ = expanded(val)
    keep = torch.zeros(L, H, dtype=torch.bool)
    keep[2, 1] = keep[0, 2] = True
    kept = keep.reshape(-1)
    # Zero: the kept heads alone. Mean: plus the validation means of every other unit.
    zero = heads_t[:, kept].sum(1)
    mean = zero + heads_v[:, ~kept].mean(0).sum(0) + rest_v.mean(0)
    for replace, z in (("zero", zero), ("mean", mean)):
        want = float(((z @ w.T).argmax(-1) == labels).double().mean())
        means, rest_mean = head_means(val, with_rest=True)
        got = float(ablation_accuracy(test, w, keep, replace, means, keep_rest=False, rest_mean=rest_mean))
        assert got == pytest.approx(want, abs=1e-12)
        assert got != float(ablation_accuracy(test, w, keep, replace, means))  # emb + MLPs matter here


@pytest.mark.parametrize("total", [12, 50, 144])
def test_heads_per_share_paper_is_the_authors_int_rule(total):
    shares = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75)
    want = [max(2 if f == 0.01 else 1, int(total * f)) for f in shares]
    assert [_num_heads(f, total, "int") for f in shares] == want
    assert _num_heads(1, total, "int") == 1  # an int stays a count
    if total == 50:  # 37.5 -> 38 rounded, 37 truncated; 0.5 -> 1 rounded, 2 at 1% for the authors
        assert [_num_heads(f, total) for f in shares] != want


# --------------------------------------------------------------------------------------------
# Intrinsic dimension
# --------------------------------------------------------------------------------------------


def authors_twonn(x: np.ndarray, fraction: float = 0.9) -> float:
    """Ansuini-style TwoNN: drop points whose 1st-neighbour distance is 0 or equals the 2nd."""
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    y = np.sort(dist, axis=1)
    r1, r2 = y[:, 1], y[:, 2]
    good = (r1 != 0) & (r1 != r2)
    mu = np.sort(r2[good] / r1[good])
    n = len(mu)
    f_emp = np.arange(1, n + 1) / n
    keep = int(np.floor(n * fraction))
    lx, ly = np.log(mu[:keep]), -np.log(1 - f_emp[:keep])
    return float((lx * ly).sum() / (lx * lx).sum())


def test_twonn_paper_drops_ties_like_the_authors():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(400, 4)) * 2.0)  # quantised: duplicates and tied neighbours
    want = authors_twonn(x)
    got = twonn(x, ties="drop", dtype=torch.float64)
    assert got == pytest.approx(want, rel=1e-10)
    with pytest.warns(UserWarning, match="duplicate"):
        default = twonn(x, dtype=torch.float64)
    assert abs(default - got) > 0.2


def test_twonn_all_ties_lattice_raises_a_clear_error():
    grid = np.stack(np.meshgrid(*[np.arange(5.0)] * 3), -1).reshape(-1, 3)  # every point tied
    with pytest.raises(ValueError, match="neither duplicated nor tied"):
        twonn(grid, ties="drop")


def test_layer_ratio_paper_is_the_ratio_of_the_layer_means():
    rows = [
        {"unit": "l0.h0", "linear_id": 8, "twonn_id": 1.0, "ratio": 8.0},
        {"unit": "l0.h1", "linear_id": 4, "twonn_id": 2.0, "ratio": 2.0},
        {"unit": "l0.mlp", "linear_id": 6, "twonn_id": 3.0, "ratio": 2.0},
    ]
    heads = [r for r in rows if ".h" in r["unit"]]
    want = (sum(r["linear_id"] for r in heads) / 2) / (sum(r["twonn_id"] for r in heads) / 2)
    paper = {r["kind"]: r for r in layer_profile(rows, **recipe_options("paper", "layer_ratio"))}
    default = {r["kind"]: r for r in layer_profile(rows)}
    assert paper["heads"]["ratio"] == pytest.approx(want)  # 6 / 1.5 = 4.0
    assert default["heads"]["ratio"] == pytest.approx(5.0)  # mean of 8 and 2
    assert paper["mlp"]["ratio"] == default["mlp"]["ratio"] == 2.0


# --------------------------------------------------------------------------------------------
# Spectral similarity across datasets, recipes, CLI
# --------------------------------------------------------------------------------------------


class _StubData:
    """The few data-module members `similarity_bases` reads."""

    def __init__(self, dataset: str, reference: str, bases_file: str):
        self.dataset, self.reference, self.cache_dir = dataset, reference, Path("/nonexistent")
        self._file = bases_file
        self.convention, self.on_mismatch, self.caches = "default", "error", {"train": f"{dataset}-train"}

    def bases(self):
        return f"{self.dataset}@{self.reference}"

    def bases_path(self):
        return Path(self._file)

    def key(self, part, preprocessing):
        from residual_lightning.data.cache import CacheKey

        return CacheKey("m", "random", self.dataset, part, "all", preprocessing, "default", "float32")

    def preprocessing(self):
        return "pre"


def test_similarity_refuses_two_datasets_on_one_reference_and_paper_uses_own_train(monkeypatch):
    a = _StubData("cifar10", "imagenet", "bases-imagenet.safetensors")
    b = _StubData("dtd", "imagenet", "bases-imagenet.safetensors")
    with pytest.raises(ValueError, match="same 'imagenet' reference set.*--recipe paper"):
        similarity_bases(a, b, "reference")
    fitted = []

    def fake_fit(path, key, reference_cache, convention, reference, *_):
        fitted.append((key["dataset"], key["part"], reference_cache(), reference))
        return f"{key['dataset']}@train"

    monkeypatch.setattr(similarity_module, "load_or_fit_bases", fake_fit)
    bases = similarity_bases(a, b, recipe_options("paper", "similarity")["bases_from"])
    assert bases == ("cifar10@train", "dtd@train")
    assert fitted == [("cifar10", "train", "cifar10-train", "train"), ("dtd", "train", "dtd-train", "train")]
    same = _StubData("cifar10", "train", "bases-c.safetensors")
    assert similarity_bases(same, None, "train") == ("cifar10@train", None)


def test_recipes_name_every_switch_and_reject_unknown_ones():
    assert set(RECIPES["default"]) == set(RECIPES["paper"])
    for analysis in RECIPES["paper"]:
        assert recipe_options("paper", analysis) != recipe_options("default", analysis)
    with pytest.raises(ValueError, match="valid: default, paper"):
        recipe_options("authors", "textspan")


@pytest.mark.slow  # an extraction of the quickstart caches and four analyses (~100 s on 2 busy cores)
def test_analyze_selection_and_intrinsic_dim_under_the_paper_recipe(digits_cache, tmp_path):
    from test_analyze_cli import CONFIG, read_csv

    from residual_lightning.cli import main

    def run(command: str, recipe: str, *args: str) -> Path:
        out = tmp_path / f"{command}-{recipe}"
        base = ["analyze", command, "--config", CONFIG, "--data.cache_dir", str(digits_cache)]
        main([*base, "--out_dir", str(out), "--recipe", recipe, *args])
        return out

    sel = {
        r: run("selection", r, "--seeds", "2", "--fractions", "[1, 0.01, 0.75]") for r in ("default", "paper")
    }
    rows = {r: read_csv(out / "selection.csv") for r, out in sel.items()}
    assert json.loads((sel["paper"] / "selection.json").read_text())["recipe"] == "paper"
    k = {r: {row["target"]: int(row["k"]) for row in rows[r] if row["score"] == "zeroshot"} for r in rows}
    assert k["paper"]["0.01"] == 2 and k["default"]["0.01"] == 1  # 16 heads: int rule, 2 at 1%
    top1 = {
        r: next(
            float(x["test_accuracy"])
            for x in rows[r]
            if (x["score"], x["replace"], x["k"]) == ("zeroshot", "zero", "1")
        )
        for r in rows
    }
    assert top1["paper"] != top1["default"]  # emb and MLPs ablated too under the paper recipe
    full = {r: next(float(x["test_accuracy"]) for x in rows[r] if x["score"] == "full") for r in rows}
    assert full["paper"] == full["default"]

    ids = run("intrinsic-dim", "paper", "--max_samples", "300")
    summary = json.loads((ids / "intrinsic_dim.json").read_text())
    assert summary["recipe"] == "paper"
    layer = next(r for r in summary["layers"] if r["layer"] == 1 and r["kind"] == "heads")
    heads = [u for u in summary["units"] if u["unit"].startswith("l1.h")]
    assert layer["ratio"] == pytest.approx(
        np.mean([u["linear_id"] for u in heads]) / np.mean([u["twonn_id"] for u in heads])
    )

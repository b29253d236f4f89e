"""Unit-selection ablation (method.md §4): keep the top-k heads by a score, replace the others.

The image embedding is rebuilt from a cache as ``emb + sum of MLPs + kept heads`` (plus the
dataset means of the removed heads with ``replace="mean"``) and classified with the text
classifier. Heads are ranked on the VALIDATION cache and accuracies are measured on the TEST
cache, so the selection never sees test data.

Scores per head (L, H), larger is better:

- ``zeroshot``: accuracy of the head's contribution alone with the text classifier
  (``argmax_c <c_{l,h}(x), w_c>``).
- ``text_corr``: correlation of the head with the full output, both projected on the text
  classifier's subspace (the span of the C class vectors).
- ``output_corr``: the same correlation in the full D-dimensional output space.
- ``random``: uniform random scores from a seeded generator (a baseline; several seeds).

"Correlation" follows the authors' ``score_unit_correlation`` (Flegyas/ResiDual, a variant of
arXiv 2406.01583): given an orthonormal basis Q (D, J) of the subspace (from a QR of the class
vectors for ``text_corr``, the identity for ``output_corr``), project the head's contribution and
the output z on it, take for every coordinate j the Pearson correlation over the samples,

    rho_j = cov_n(<c_n, q_j>, <z_n, q_j>) / (std_n <c_n, q_j> * std_n <z_n, q_j>),

and average over the J coordinates (a coordinate where either side is constant counts 0). The
authors divide a biased covariance by unbiased standard deviations, which scales every score by
(N - 1) / N; here both are biased, so rho_j is an exact Pearson correlation (same ranking). All of
it comes from streamed first and second moments of the compact head coordinates y and of z,
``c = A y`` (so ``<c, q_j> = <y, A^T q_j>``): no (N, L*H, D) tensor is ever built.

**Variants** (``docs/reproducing.md``, "Analyses"; the authors' ``experiments/experiment3.py``).
``correlation="authors"``: the correlation target is the sum of the *heads only* (the authors'
``score_unit_correlation`` sums the units it is given, the heads), ``output_corr`` projects on the
QR basis of the full outputs of the scored split (``qr(Z^T).Q`` with Z the (N, D) outputs in cache
order: for N >= D a rotation of R^D fixed by the first D samples) instead of the identity, and
scores carry their (N - 1) / N factor. ``keep_rest=False``: only the kept heads survive an
ablation (emb and MLPs are removed too: zeroed, or replaced by their means). ``k_rule="int"``:
k = max(1, int(fraction * L*H)), and at least 2 heads at 1%, as the authors (``"round"``:
round(fraction * L*H), at least 1). ``random="normal"``: the random baseline ranks heads by
``torch.randn(L*H)`` of each seed, the authors' draw. Mean replacement uses the means of the
scored (validation) split under every variant: the authors use the evaluated split's, i.e. test
means, which touches test data. `PAPER_SELECTION` names the authors' choices.

Ablations (`ablation.py`, re-exported here) run in logit space: ``z . w_c`` is linear in the units, so per-head logits (N, L, H, C)
are computed once per cache batch and every keep mask is a weighted sum of them. Accuracy does
not depend on the logit scale or on normalising z (a positive factor per sample), so the scaled
cosine logits of `ResidualModel` rank classes exactly like these.

Letters: N samples, L layers, H heads per layer, k compact head coordinates, D embedding size,
C classes, Q keep masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from residual_lightning.analysis.ablation import (  # re-exported: the ablation half of the analysis
    Replace,
    ablate,
    ablation_accuracy,
    classifier_weights,
    head_means,
    rows_per_read,
    top_k_mask,
)
from residual_lightning.contributions import UnitLayout
from residual_lightning.plots import plot_selection_curve  # re-exported: the figure of `selection_curve`

__all__ = [
    "PAPER_SELECTION",
    "SCORES",
    "ablate",
    "ablation_accuracy",
    "head_means",
    "head_scores",
    "plot_selection_curve",
    "random_scores",
    "selection_curve",
    "top_k_mask",
]

SCORES: tuple[str, ...] = ("zeroshot", "text_corr", "output_corr", "random")
Correlation = Literal["project", "authors"]
KRule = Literal["round", "int"]
RandomDraw = Literal["uniform", "normal"]
# The authors' definitions (experiments/experiment3.py, unit_distance.score_unit_correlation).
PAPER_SELECTION: dict[str, Any] = {
    "correlation": "authors",
    "keep_rest": False,
    "k_rule": "int",
    "random": "normal",
}


def _head_names(layers: int, heads: int) -> list[str]:
    return UnitLayout(layers, heads, 1, 1).head_names


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def random_scores(layers: int, heads: int, seed: int, draw: RandomDraw = "uniform") -> Tensor:
    """(L, H) random scores from a generator seeded with `seed`.

    Args:
        layers: L.
        heads: H.
        seed: generator seed.
        draw: ``"uniform"`` (the project) or ``"normal"`` (the authors' ``torch.randn(L*H)``).
    """
    g = torch.Generator().manual_seed(seed)
    if draw == "normal":
        return torch.randn(layers * heads, generator=g).double().reshape(layers, heads)
    if draw != "uniform":
        raise ValueError(f"unknown random draw {draw!r}; valid: uniform, normal")
    return torch.rand(layers, heads, generator=g, dtype=torch.float64)


def _correlation(maps: Tensor, basis: Tensor, c_yy: Tensor, c_yz: Tensor, c_zz: Tensor) -> Tensor:
    """(L, H) mean over the basis coordinates of the per-coordinate Pearson correlations.

    Args: maps (L, H, D, k), basis (D, J), covariances of y (L, H, k, k), of y with z
    (L, H, k, D) and of z (D, D).
    """
    g = torch.einsum("lhdk,dj->lhkj", maps, basis)  # (L, H, k, J): y -> projected contribution
    cov = torch.einsum("lhkj,lhkd,dj->lhj", g, c_yz, basis)  # (L, H, J)
    var_x = torch.einsum("lhkj,lhki,lhij->lhj", g, c_yy, g).clamp_min(0.0)  # (L, H, J)
    var_z = torch.einsum("dj,de,ej->j", basis, c_zz, basis).clamp_min(0.0)  # (J,)
    denom = (var_x * var_z).sqrt()
    tiny = 1e-12 * float(denom.max()) if denom.numel() else 0.0
    rho = torch.where(denom > tiny, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
    return rho.mean(-1)


@torch.no_grad()
def head_scores(
    cache: Any,
    classifier: Tensor | tuple[Tensor, float],
    scores: Sequence[str] = ("zeroshot", "text_corr", "output_corr"),
    batch_size: int = 2048,
    seed: int = 0,
    correlation: Correlation = "project",
    random: RandomDraw = "uniform",
) -> dict[str, Tensor]:
    """Per-head scores on a cache, in one streamed pass (see the module docstring).

    Args:
        cache: an `ActivationCache` (the VALIDATION part for a selection).
        classifier: (C, D) text classifier, or the ``(weights, logit_scale)`` pair of
            `ResidualDataModule.classifier()`.
        scores: names among `SCORES`.
        batch_size: samples per cache read.
        seed: seed of the ``random`` score.
        correlation: ``"project"`` (target: the full output; ``output_corr`` in the standard
            basis) or ``"authors"`` (target: the sum of the heads; ``output_corr`` in the QR basis
            of the full outputs; scores times (N - 1) / N).
        random: draw of the ``random`` score (see `random_scores`).

    Returns:
        ``{score: (L, H) float64 tensor}``.
    """
    unknown = set(scores) - set(SCORES)
    if unknown:
        raise ValueError(f"unknown score(s) {sorted(unknown)}; valid: {', '.join(SCORES)}")
    if correlation not in ("project", "authors"):
        raise ValueError(f"unknown correlation {correlation!r}; valid: project, authors")
    authors = correlation == "authors"
    maps = cache.head_maps.double()  # (L, H, D, k)
    layers, heads, dim, _ = maps.shape
    w = classifier_weights(classifier).double()  # (C, D)
    if w.shape[1] != dim:
        raise ValueError(f"classifier has D={w.shape[1]}, the cache's heads D={dim}")
    out: dict[str, Tensor] = {}
    if "random" in scores:
        out["random"] = random_scores(layers, heads, seed, random)
    want_zs = "zeroshot" in scores
    want_corr = bool({"text_corr", "output_corr"} & set(scores))
    if not (want_zs or want_corr):
        return out
    head_logit_maps = torch.einsum("lhdk,cd->lhkc", maps, w)  # (L, H, k, C)
    correct = torch.zeros(layers, heads, dtype=torch.float64)
    n = 0
    m: dict[str, Tensor] = {}
    first_z: list[Tensor] = []  # the first D outputs: they fix the authors' QR basis of all outputs
    rows = rows_per_read(batch_size, layers * heads * w.shape[0]) if want_zs else batch_size
    for batch in cache.iter_batches(rows):
        y = batch.heads.double()  # (n, L, H, k)
        label = batch.label
        if want_zs:
            logits = torch.einsum("nlhk,lhkc->nlhc", y, head_logit_maps)  # (n, L, H, C)
            correct += (logits.argmax(-1) == label[:, None, None]).double().sum(0)
        if want_corr:
            head_sum = torch.einsum("lhdk,nlhk->nd", maps, y)  # (n, D)
            full = batch.emb.double() + batch.mlps.double().sum(1) + head_sum  # (n, D)
            if authors and sum(len(f) for f in first_z) < dim:
                first_z.append(full[: dim - sum(len(f) for f in first_z)])
            z = head_sum if authors else full  # the correlation target
            if not m:
                # Moments about the first batch's means keep float64 sums well conditioned.
                m = {"y0": y.mean(0), "z0": z.mean(0)}
                m.update(
                    sy=torch.zeros_like(m["y0"]),
                    sz=torch.zeros_like(m["z0"]),
                    syy=torch.zeros(layers, heads, y.shape[-1], y.shape[-1], dtype=torch.float64),
                    syz=torch.zeros(layers, heads, y.shape[-1], dim, dtype=torch.float64),
                    szz=torch.zeros(dim, dim, dtype=torch.float64),
                )
            yc, zc = y - m["y0"], z - m["z0"]
            m["sy"] += yc.sum(0)
            m["sz"] += zc.sum(0)
            m["syy"] += torch.einsum("nlhk,nlhj->lhkj", yc, yc)
            m["syz"] += torch.einsum("nlhk,nd->lhkd", yc, zc)
            m["szz"] += zc.T @ zc
        n += len(batch)
    if n < 2:
        raise ValueError("head scores need at least 2 samples")
    if want_zs:
        out["zeroshot"] = correct / n
    if want_corr:
        my, mz = m["sy"] / n, m["sz"] / n  # shifted means
        c_yy = m["syy"] / n - torch.einsum("lhk,lhj->lhkj", my, my)
        c_yz = m["syz"] / n - torch.einsum("lhk,d->lhkd", my, mz)
        c_zz = m["szz"] / n - torch.outer(mz, mz)
        factor = (n - 1) / n if authors else 1.0  # biased covariance over unbiased stds
        if "text_corr" in scores:
            basis = torch.linalg.qr(w.T).Q  # (D, min(C, D)): orthonormal basis of the class span
            out["text_corr"] = factor * _correlation(maps, basis, c_yy, c_yz, c_zz)
        if "output_corr" in scores:
            # (D, min(N, D)) QR basis of the outputs (the authors), else the standard basis.
            basis = (
                torch.linalg.qr(torch.cat(first_z).T).Q if authors else torch.eye(dim, dtype=torch.float64)
            )
            out["output_corr"] = factor * _correlation(maps, basis, c_yy, c_yz, c_zz)
    return {name: out[name] for name in scores}


def _num_heads(fraction: float | int, total: int, rule: KRule = "round") -> int:
    """Heads kept for a fraction: an int is a count (1 = "1 head"), a float a share of L*H.

    ``rule="round"`` rounds the share (at least 1 head); ``"int"`` truncates it like the authors
    (at least 1 head, at least 2 for the 1% share).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(f"fractions are head counts (int) or shares (float), got {fraction!r}")
    if isinstance(fraction, int):
        return min(max(fraction, 0), total)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a share of heads must be in [0, 1], got {fraction}")
    if rule == "int":
        return min(total, max(2 if fraction == 0.01 else 1, int(fraction * total)))
    if rule != "round":
        raise ValueError(f"unknown k_rule {rule!r}; valid: round, int")
    return min(total, max(1, round(fraction * total)))


def selection_curve(
    val_cache: Any,
    test_cache: Any,
    classifier: Tensor | tuple[Tensor, float],
    logit_scale: float | None = None,
    fractions: Sequence[float | int] = (1, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75),
    scores: Sequence[str] = SCORES,
    replace: Sequence[Replace] = ("zero", "mean"),
    seeds: int = 10,
    batch_size: int = 2048,
    correlation: Correlation = "project",
    keep_rest: bool = True,
    k_rule: KRule = "round",
    random: RandomDraw = "uniform",
) -> list[dict[str, Any]]:
    """Test accuracy when keeping the top-k heads by each score (scores and means on validation).

    Args:
        val_cache: cache the heads are scored on (and whose head means replace removed heads).
        test_cache: cache the accuracies are measured on.
        classifier: (C, D) text classifier, or the ``(weights, logit_scale)`` pair.
        logit_scale: accepted for symmetry with `ResidualDataModule.classifier()`; accuracy does not
            depend on it.
        fractions: heads to keep: an int is a count (``1`` = one head), a float a share of the
            L*H heads (rounded, at least one head).
        scores: names among `SCORES`.
        replace: replacements of the removed heads: ``"zero"`` and/or ``"mean"``.
        seeds: number of seeds of the ``random`` score (rows report their mean and std).
        batch_size: samples per cache read.
        correlation: correlation scores' definition (`head_scores`).
        keep_rest: keep emb and MLPs in every ablation (False: only the kept heads survive).
        k_rule: heads per share: ``"round"`` or the authors' ``"int"`` (`_num_heads`).
        random: draw of the random baseline (`random_scores`).
        `PAPER_SELECTION` holds the authors' values of the last four.

    Returns:
        Rows (dicts) with keys score, replace, target (the requested fraction), fraction (k / L*H),
        k, test_accuracy, std (over seeds; 0 otherwise), seeds and heads (the kept heads,
        space-separated; empty for ``random``). A first row with score ``full`` holds the
        accuracy of the unablated model.
    """
    del logit_scale  # argmax is invariant to it
    layers, heads = val_cache.head_maps.shape[:2]
    total = layers * heads
    names = _head_names(layers, heads)
    ks = [_num_heads(f, total, k_rule) for f in fractions]
    fixed = [s for s in scores if s != "random"]
    ranked = head_scores(val_cache, classifier, fixed, batch_size=batch_size, correlation=correlation)
    if "random" in scores:
        for seed in range(seeds):
            ranked[f"random:{seed}"] = random_scores(layers, heads, seed, random)
    labels = list(ranked)
    unique = sorted(set(ks))  # several targets may round to the same k: evaluate each k once
    masks = torch.stack([top_k_mask(ranked[s], k) for s in labels for k in unique])  # (S * K, L, H)
    masks = torch.cat([torch.ones(1, layers, heads, dtype=torch.bool), masks])  # full model first
    means, rest_mean = head_means(val_cache, with_rest=True) if "mean" in replace else (None, None)
    rows: list[dict[str, Any]] = []
    for rep in replace:
        acc = ablation_accuracy(
            test_cache,
            classifier,
            masks,
            rep,
            means,
            batch_size=batch_size,
            keep_rest=keep_rest,
            rest_mean=rest_mean,
        )
        if not rows:
            # The unablated model: every unit, whatever keep_rest says about ablated ones.
            full = float(acc[0]) if keep_rest else float(ablation_accuracy(test_cache, classifier, masks[0]))
            rows.append(
                dict(
                    score="full",
                    replace="none",
                    target=1.0,
                    fraction=1.0,
                    k=total,
                    test_accuracy=full,
                    std=0.0,
                    seeds=1,
                    heads=" ".join(names),
                )
            )
        acc = acc[1:].reshape(len(labels), len(unique))  # (S, K)
        for score in scores:
            idx = [i for i, s in enumerate(labels) if s == score or s.startswith(f"{score}:")]
            for target, k in zip(fractions, ks):
                j = unique.index(k)
                values = acc[idx, j]
                kept = (
                    ""
                    if score == "random"
                    else " ".join(
                        n
                        for n, m in zip(names, masks[1 + idx[0] * len(unique) + j].reshape(-1).tolist())
                        if m
                    )
                )
                rows.append(
                    dict(
                        score=score,
                        replace=rep,
                        target=float(target) if isinstance(target, float) else int(target),
                        fraction=k / total,
                        k=k,
                        test_accuracy=float(values.mean()),
                        std=float(values.std(unbiased=False)) if len(idx) > 1 else 0.0,
                        seeds=len(idx),
                        heads=kept,
                    )
                )
    return rows

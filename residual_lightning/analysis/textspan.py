"""Head specialisation in words: TextSpan over a bank of text descriptions (method.md §4).

**TextSpan** (Gandelsman, Efros, Steinhardt, ICLR 2024). A unit's centred contributions X (N, D)
and a bank of M text embeddings (normalised, then centred on the bank mean) are compared inside
the data's own span: the bank is projected onto the top `rank` right-singular vectors of X. Then,
k times: score every description t by the variance of the data projected on it, ``var(X t)``
(t is not re-normalised, so a description that is mostly outside the remaining span scores low,
as in the reference implementation); pick the best; record the share of the unit's total variance
along its direction u = t / |t|; deflate u from the data (``X <- X (I - u u^T)``) and from the bank
(``T <- T - (T u) u^T``). Deflation makes the picked directions orthonormal and a picked
description zero, so it is never picked twice; the shares add up to the variance the picks
explain together.

**Variants** (``docs/reproducing.md``, "Analyses"). The project's default centres the bank and
projects it on the principal directions of the *centred* contributions, keeping every
non-negligible one. Gandelsman et al.'s code and the ResiDual authors' (``sparse_decomposition.textspan``)
only L2-normalise the bank, take the top right-singular vectors of the *uncentred* contributions
(``svd(X)`` before X is centred) and fix the rank at 80: ``center_bank=False, span="uncentred",
rank=80`` (`PAPER_TEXTSPAN`). Their score is the standard deviation of ``X t`` (same argmax as the
variance) and their deflations are the ones above. Where 80 exceeds the unit's numerical rank
(a head: rank <= d = 64) their extra singular vectors are arbitrary null directions of X; here the
span stops at the numerical rank instead.

Everything above depends on X only through its covariance, so it runs in the r-dimensional
principal coordinates of the unit (r <= rank): O(M r^2) per pick, whatever N is. For a head the
covariance comes from the compact coordinates y of the cache (``c = A y``, `units.py`): with
``A = QR``, the eigenvectors of ``A Cov(y) A^T`` are Q times those of the k x k matrix
``R Cov(y) R^T``, so no (N, D) contribution is ever materialised (`head_descriptions`).

`head_descriptions` runs it on units of a cache and returns table rows; SOMP, the other way to
describe a unit, is in `somp.py` (re-exported here); the description banks are read, embedded and
normalised by `bank.py`.

Letters: N samples, D embedding size, M descriptions, r principal components kept, k picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from residual_lightning.analysis.bank import prepare_bank as _prepare_bank
from residual_lightning.analysis.somp import somp, somp_descriptions  # re-exported
from residual_lightning.contributions import UnitLayout
from residual_lightning.spectral import DEFAULT_RANK_RTOL

__all__ = [
    "PAPER_TEXTSPAN",
    "head_descriptions",
    "somp",
    "somp_descriptions",
    "textspan",
    "textspan_spectrum",
    "unit_spectra",
]


Span = Literal["centred", "uncentred"]
# The authors' (and Gandelsman et al.'s) TextSpan: normalised bank, SVD of the uncentred data, rank 80.
PAPER_TEXTSPAN: dict[str, Any] = {"center_bank": False, "span": "uncentred", "rank": 80}

# --------------------------------------------------------------------------------------------
# TextSpan
# --------------------------------------------------------------------------------------------


def _custom_span(
    vecs: Tensor,
    vals: Tensor,
    bank: Tensor,
    span_vectors: Tensor,
    span_values: Tensor | None,
    rank: int | None,
) -> tuple[Tensor, Tensor]:
    """Bank coordinates (M, r) in the top-`rank` span directions and the data covariance (r, r) there."""
    if span_values is None:
        raise ValueError("span_vectors needs span_values (to order and cut the directions)")
    sv = torch.as_tensor(span_vectors).double().cpu()  # (D, S)
    sw = torch.as_tensor(span_values).double().cpu().clamp_min(0.0)  # (S,)
    if sv.ndim != 2 or sv.shape[0] != bank.shape[1] or sw.numel() != sv.shape[1]:
        raise ValueError(
            f"span_vectors must be (D, S) with (S,) span_values, got {tuple(sv.shape)}, {tuple(sw.shape)}"
        )
    order = sw.argsort(descending=True)
    sw, sv = sw[order], sv[:, order]
    numerical = int((sw > DEFAULT_RANK_RTOL * sw[0]).sum()) if sw.numel() and sw[0] > 0 else 0
    keep = numerical if rank is None else min(int(rank), numerical)
    if keep < 1:
        raise ValueError(
            f"rank must be at least 1 and the span non-empty, got rank={rank}, {numerical} directions"
        )
    sv = sv[:, :keep]  # (D, r)
    g = sv.T @ vecs  # (r, R): span directions in the principal axes
    return bank @ sv, (g * vals) @ g.T  # (M, r), (r, r)


def textspan_spectrum(
    eigenvectors: Tensor,
    eigenvalues: Tensor,
    text_bank: Tensor | np.ndarray,
    k: int = 10,
    rank: int | None = None,
    total_variance: float | None = None,
    center_bank: bool = True,
    span_vectors: Tensor | None = None,
    span_values: Tensor | None = None,
) -> list[tuple[int, float]]:
    """TextSpan from a unit's principal axes instead of its samples (what `textspan` calls).

    Args:
        eigenvectors: (D, R) orthonormal principal directions of the centred contributions, in
            columns, by decreasing variance.
        eigenvalues: (R,) variance along each direction (any common scale: only ratios matter).
        text_bank: (M, D) text embeddings of the descriptions.
        k: number of descriptions to pick (at most k are returned: fewer when the bank or the
            span is exhausted first).
        rank: project the bank onto the top `rank` directions; None keeps every direction with
            variance above ``DEFAULT_RANK_RTOL`` times the largest.
        total_variance: the unit's total variance, the denominator of the shares; None uses the
            sum of `eigenvalues`.
        center_bank: subtract the mean description from the (normalised) bank.
        span_vectors: (D, S) orthonormal directions the bank is projected onto instead of the
            principal directions (the authors: right-singular vectors of the uncentred data);
            `rank` then cuts them, and `eigenvectors`/`eigenvalues` only give the variances.
        span_values: (S,) their singular values squared (any scale), for ordering and the
            numerical-rank cut; required with `span_vectors`.

    Returns:
        ``(bank index, variance share)`` per pick, in picking order.
    """
    vecs = torch.as_tensor(eigenvectors).double().cpu()
    vals = torch.as_tensor(eigenvalues).double().cpu().clamp_min(0.0)
    bank = _prepare_bank(text_bank, center_bank)
    if vecs.ndim != 2 or vecs.shape[1] != vals.numel() or vecs.shape[0] != bank.shape[1]:
        raise ValueError(
            f"expected (D, R) eigenvectors, (R,) eigenvalues and an (M, D) bank; got "
            f"{tuple(vecs.shape)}, {tuple(vals.shape)} and {tuple(bank.shape)}"
        )
    total = float(vals.sum()) if total_variance is None else float(total_variance)
    if total <= 0 or vals.numel() == 0:
        return []
    order = vals.argsort(descending=True)
    vals, vecs = vals[order], vecs[:, order]
    keep = int((vals > DEFAULT_RANK_RTOL * vals[0]).sum()) if rank is None else min(int(rank), vals.numel())
    if keep < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if span_vectors is None:
        vals, vecs = vals[:keep], vecs[:, :keep]
        coords = bank @ vecs  # (M, r): the bank projected onto the top-r span, in its coordinates
        cov = torch.diag(vals)  # (r, r): the data's covariance in the same coordinates
    else:
        coords, cov = _custom_span(vecs, vals, bank, span_vectors, span_values, rank)
    alive = torch.ones(coords.shape[0], dtype=torch.bool)
    picks: list[tuple[int, float]] = []
    for _ in range(min(int(k), coords.shape[0])):
        norms = coords.norm(dim=1)  # (M,)
        scores = ((coords @ cov) * coords).sum(1)  # (M,) variance of the data along each t
        scores[~alive | (norms <= 1e-12)] = -torch.inf
        best = int(scores.argmax())
        if not torch.isfinite(scores[best]) or float(cov.trace()) <= 1e-12 * total:
            break
        u = coords[best] / norms[best]  # (r,)
        picks.append((best, float(u @ cov @ u) / total))
        proj = torch.eye(u.numel(), dtype=u.dtype) - torch.outer(u, u)  # (r, r)
        cov = proj @ cov @ proj
        coords = coords - torch.outer(coords @ u, u)
        alive[best] = False
    return picks


def _centred_spectrum(x: Tensor) -> tuple[Tensor, Tensor, float]:
    """Principal directions (D, R), variances (R,) and total variance of centred float64 data."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"contributions must be an (N, D) matrix with N >= 2, got {tuple(x.shape)}")
    xc = x - x.mean(0)  # (N, D)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)  # s: (min(N, D),)
    var = s**2 / (x.shape[0] - 1)
    return vh.T, var, float((xc * xc).sum()) / (x.shape[0] - 1)


def textspan(
    contributions: Tensor | np.ndarray,
    text_bank: Tensor | np.ndarray,
    k: int = 10,
    rank: int | None = None,
    center_bank: bool = True,
    span: Span = "centred",
) -> list[tuple[int, float]]:
    """Gandelsman et al.'s TextSpan: the descriptions that span a unit's output, greedily.

    See the module docstring for the algorithm. Works with N < D (the span then has at most
    N - 1 directions).

    Args:
        contributions: (N, D) contributions of one unit.
        text_bank: (M, D) text embeddings (normalised here, then centred with `center_bank`).
        k: number of descriptions to pick.
        rank: number of top right-singular vectors of the centred contributions that the bank is
            projected onto; None keeps all non-negligible ones.
        center_bank: subtract the mean description from the bank.
        span: ``"centred"`` projects the bank on principal directions of the centred data (the
            project), ``"uncentred"`` on right-singular vectors of the raw data (the authors).

    Returns:
        ``(bank index, variance share)`` per pick, in picking order; the share is the fraction
        of the unit's total variance along the picked (deflated) description, and the shares sum
        to at most 1.
    """
    x = torch.as_tensor(contributions).detach().double().cpu()
    vecs, vals, total = _centred_spectrum(x)
    extra: dict[str, Tensor] = {}
    if span == "uncentred":
        _, s, vh = torch.linalg.svd(x, full_matrices=False)  # of the raw samples, as the authors
        extra = {"span_vectors": vh.T, "span_values": s**2}
    elif span != "centred":
        raise ValueError(f"unknown span {span!r}; valid: centred, uncentred")
    return textspan_spectrum(
        vecs, vals, text_bank, k, rank, total_variance=total, center_bank=center_bank, **extra
    )


# --------------------------------------------------------------------------------------------
# Units of a cache
# --------------------------------------------------------------------------------------------


def _parse_unit(name: str, layers: int, heads: int) -> tuple[str, int, int]:
    """(kind, layer, head) of a unit name; kind is "emb", "mlp" or "head"."""
    try:
        ref = UnitLayout(layers, heads, 1, 1).parse(name)
    except ValueError as err:
        raise ValueError(
            f"unit {name!r} does not exist in a model with L={layers}, H={heads}: {err}"
        ) from None
    return ref.kind, -1 if ref.layer is None else ref.layer, -1 if ref.head is None else ref.head


@torch.no_grad()
def unit_spectra(
    cache: Any,
    units: Sequence[str] | None = None,
    batch_size: int = 4096,
    max_samples: int | None = None,
    uncentred: bool = False,
) -> dict[str, tuple[Tensor, ...]]:
    """Principal directions and variances of units of a cache, from streamed second moments.

    Heads are handled in their compact coordinates (moments of y, then ``A Cov(y) A^T`` through
    a QR of A), MLPs and emb from their D-dimensional moments; nothing (N, U, D) is built.

    Args:
        cache: an `ActivationCache` (or anything with `iter_batches`, `head_maps`, `__len__`).
        units: unit names (``"l3.h1"``, ``"l3.mlp"``, ``"emb"``); None means every head.
        batch_size: samples per cache read.
        max_samples: use only the first this many samples; None uses all.
        uncentred: also return the eigen-decomposition of the raw second moment ``X^T X / N``
            (the right-singular vectors of the uncentred samples, TextSpan's span for the authors).

    Returns:
        ``{unit: (eigenvectors (D, R) in columns, variances (R,))}``, by decreasing variance;
        with `uncentred`, ``(eigenvectors, variances, raw eigenvectors, raw eigenvalues)``.
    """
    maps = cache.head_maps.double()  # (L, H, D, k)
    layers, heads, dim, _ = maps.shape
    if units is None:
        units = UnitLayout(layers, heads, 1, 1).head_names
    parsed = {name: _parse_unit(name, layers, heads) for name in units}
    n_max = len(cache) if max_samples is None else min(len(cache), int(max_samples))
    if n_max < 2:
        raise ValueError("need at least 2 samples")
    moments: dict[str, list] = {}  # kind -> [shift, sum, sum of outer products]
    n = 0
    for batch in cache.iter_batches(batch_size):
        if n >= n_max:
            break
        take = min(len(batch), n_max - n)
        parts = {
            "head": batch.heads[:take].double(),  # (n, L, H, k)
            "mlp": batch.mlps[:take].double(),  # (n, L, D)
            "emb": batch.emb[:take].double()[:, None],  # (n, 1, D)
        }
        for kind in {kind for kind, _, _ in parsed.values()}:
            x = parts[kind]
            if kind not in moments:
                # Moments about the first batch's mean: raw float64 sums would lose the variance
                # of units whose mean is large next to their spread.
                shift = x.mean(0)
                moments[kind] = [
                    shift,
                    torch.zeros_like(shift),
                    torch.zeros(*shift.shape, shift.shape[-1], dtype=x.dtype),
                ]
            x = x - moments[kind][0]
            moments[kind][1] += x.sum(0)
            moments[kind][2] += torch.einsum("n...i,n...j->...ij", x, x)
        n += take
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, (kind, layer, head) in parsed.items():
        _, s1, s2 = moments[kind]
        idx = (layer, head) if kind == "head" else ((layer,) if kind == "mlp" else (0,))
        mean = s1[idx] / n
        cov = (s2[idx] - n * torch.outer(mean, mean)) / (n - 1)  # (k, k) or (D, D)
        mats = [cov]
        if uncentred:
            raw_mean = mean + moments[kind][0][idx]  # the first batch's shift added back
            mats.append(cov * ((n - 1) / n) + torch.outer(raw_mean, raw_mean))  # X^T X / N
        result: list[Tensor] = []
        for mat in mats:
            if kind == "head":
                q, r = torch.linalg.qr(maps[layer, head])  # (D, k'), (k', k)
                vals, w = torch.linalg.eigh(r @ mat @ r.T)
                vecs = q @ w  # (D, k')
            else:
                vals, vecs = torch.linalg.eigh(mat)
            order = vals.argsort(descending=True)
            result += [vecs[:, order], vals[order].clamp_min(0.0)]
        out[name] = tuple(result)
    return out


def head_descriptions(
    cache: Any,
    bank: Tensor,
    descriptions: Sequence[str],
    k: int = 10,
    units: Sequence[str] | None = None,
    rank: int | None = None,
    batch_size: int = 4096,
    max_samples: int | None = None,
    center_bank: bool = True,
    span: Span = "centred",
) -> list[dict[str, Any]]:
    """TextSpan descriptions of the heads (or any units) of a cache, as table rows.

    Args:
        cache: an `ActivationCache`.
        bank: (M, D) text embeddings of `descriptions` (`encode_bank`).
        descriptions: the M descriptions, in the bank's order.
        k: descriptions per unit.
        units: unit names; None means every head. MLPs (``"l3.mlp"``) and ``"emb"`` work too.
        rank: see `textspan`.
        batch_size: samples per cache read.
        max_samples: use only the first this many samples of the cache.
        center_bank: see `textspan` (the authors: False).
        span: see `textspan` (the authors: ``"uncentred"``).

    Returns:
        One dict per pick with keys unit, rank (1-based), index (in the bank), description,
        share (of the unit's variance) and cumulative (shares so far); ready for
        `csv.DictWriter`.
    """
    if len(descriptions) != bank.shape[0]:
        raise ValueError(f"{len(descriptions)} descriptions for a bank of {bank.shape[0]} embeddings")
    if span not in ("centred", "uncentred"):
        raise ValueError(f"unknown span {span!r}; valid: centred, uncentred")
    uncentred = span == "uncentred"
    spectra = unit_spectra(cache, units, batch_size=batch_size, max_samples=max_samples, uncentred=uncentred)
    rows: list[dict[str, Any]] = []
    for unit, spectrum in spectra.items():
        vecs, vals = spectrum[:2]
        extra = {"span_vectors": spectrum[2], "span_values": spectrum[3]} if uncentred else {}
        picks = textspan_spectrum(vecs, vals, bank, k, rank, center_bank=center_bank, **extra)
        cumulative = 0.0
        for i, (index, share) in enumerate(picks):
            cumulative += share
            rows.append(
                {
                    "unit": unit,
                    "rank": i + 1,
                    "index": index,
                    "description": descriptions[index],
                    "share": share,
                    "cumulative": cumulative,
                }
            )
    return rows

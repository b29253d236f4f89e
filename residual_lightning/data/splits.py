"""Train/val/test splits of method.md §3: stratified, seeded, never drawing validation from test.

Every dataset follows one `SplitProtocol`:

- ``holdout``: the official train split is cut into train/val (stratified); the official test
  split is the test set. CIFAR-10/100, MNIST, GTSRB, Food-101 (90/10); SVHN, DTD, Stanford Cars,
  ImageNet (80/20; the ResiDual authors' ImageNet code holds out 20% of train).
- ``all``: one pool of all the data is cut into train/val/test. EuroSAT and SUN397 (80/10/10, they
  have no official split), scikit-learn digits (60/20/20), and user folders/CSVs (80/10/10).
- ``official``: train, val and test are the dataset's own splits. Flowers-102; RESISC45 when its
  split files are present (otherwise a seeded 60/20/20 of all images, the official proportions).

`make_splits` returns indices; `split_sources` says which *source* split (the ``split`` argument
of `residual_lightning.data.registry.load_dataset`) each part indexes into.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "SPLIT_PROTOCOLS",
    "SplitProtocol",
    "few_shot",
    "get_split_protocol",
    "make_splits",
    "split_sources",
    "stratified_split",
]

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitProtocol:
    """How a dataset's train/val/test parts are made.

    Attributes:
        kind: ``holdout`` (val carved from the official train, official test), ``all`` (one pool
            cut three ways) or ``official`` (every part is an official split).
        fractions: default fractions: (train, val) for ``holdout``, (train, val, test) for
            ``all``, empty for ``official``.
        fallback: protocol used when an ``official`` dataset lacks its split files.
        test_source: source split holding the test set of a ``holdout`` protocol (``val`` for
            ImageNet, whose labelled evaluation split is its validation set).
    """

    kind: Literal["holdout", "all", "official"]
    fractions: tuple[float, ...] = ()
    fallback: SplitProtocol | None = None
    test_source: str = "test"

    @property
    def sources(self) -> dict[str, str]:
        """Source split each part indexes into, e.g. ``{"train": "train", "val": "train", "test": "test"}``."""
        if self.kind == "holdout":
            return {"train": "train", "val": "train", "test": self.test_source}
        if self.kind == "all":
            return dict.fromkeys(PARTS, "all")
        return {p: p for p in PARTS}


_HOLDOUT_90 = SplitProtocol("holdout", (0.9, 0.1))
_HOLDOUT_80 = SplitProtocol("holdout", (0.8, 0.2))
_ALL_80_10_10 = SplitProtocol("all", (0.8, 0.1, 0.1))
_ALL_60_20_20 = SplitProtocol("all", (0.6, 0.2, 0.2))

SPLIT_PROTOCOLS: dict[str, SplitProtocol] = {
    "cifar10": _HOLDOUT_90,
    "cifar100": _HOLDOUT_90,
    "mnist": _HOLDOUT_90,
    "gtsrb": _HOLDOUT_90,
    "food101": _HOLDOUT_90,
    "svhn": _HOLDOUT_80,
    "dtd": _HOLDOUT_80,
    "stanford_cars": _HOLDOUT_80,
    "imagenet": SplitProtocol("holdout", (0.8, 0.2), test_source="val"),
    "eurosat": _ALL_80_10_10,
    "sun397": _ALL_80_10_10,
    "digits": _ALL_60_20_20,
    "flowers102": SplitProtocol("official"),
    "resisc45": SplitProtocol("official", fallback=_ALL_60_20_20),
    "imagefolder": _ALL_80_10_10,
    "csv": _ALL_80_10_10,
}


def get_split_protocol(name: str) -> SplitProtocol:
    """The split protocol of a registry dataset.

    Args:
        name: dataset name, e.g. ``"cifar10"``.

    Raises:
        ValueError: unknown name (lists the known ones and close matches).
    """
    if name not in SPLIT_PROTOCOLS:
        close = difflib.get_close_matches(name, list(SPLIT_PROTOCOLS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"No split protocol for {name!r}.{hint} Known: {', '.join(sorted(SPLIT_PROTOCOLS))}")
    return SPLIT_PROTOCOLS[name]


def split_sources(name: str, *, fallback: bool = False) -> dict[str, str]:
    """Which source split (``train``/``val``/``test``/``all``) each of train/val/test indexes into.

    Args:
        name: dataset name.
        fallback: for ``official`` datasets, the sources of the fallback protocol (RESISC45
            without split files).
    """
    protocol = get_split_protocol(name)
    if fallback and protocol.fallback is not None:
        protocol = protocol.fallback
    return protocol.sources


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"fractions must be a non-empty sequence, got {fractions!r}")
    if np.any(f < 0) or not np.isclose(f.sum(), 1.0, atol=1e-6):
        raise ValueError(
            f"fractions must be non-negative and sum to 1, got {tuple(fractions)} (sum {f.sum():.6g})"
        )
    return f / f.sum()


def _allocate(n: int, f: np.ndarray, deficit: np.ndarray) -> np.ndarray:
    """Split n items into len(f) counts close to n * f.

    Each count is floor(n * f) or one more; the leftover items go to the parts furthest below
    their share of the running total (`deficit`), so the parts' sizes stay within one sample of
    N * f overall as well as per class. Every positive part gets an item when n allows it.
    """
    counts = np.floor(n * f).astype(np.int64)
    leftover = n - int(counts.sum())
    if leftover > 0:
        room = np.where(n * f - counts > 1e-9, deficit - counts, -np.inf)  # only parts owed a fraction
        counts[np.argsort(-room, kind="stable")[:leftover]] += 1
    positive = np.flatnonzero(f > 0)
    if n >= positive.size:
        for p in positive:
            if counts[p] == 0:  # take one from the part that has the most
                donor = int(np.argmax(counts))
                counts[donor] -= 1
                counts[p] += 1
    return counts


def stratified_split(
    targets: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int = 42
) -> list[np.ndarray]:
    """Split indices 0..N-1 into parts, class by class, in the given proportions.

    Each class is shuffled with a generator seeded by `seed` and cut into parts of
    floor(n_c * fraction) or one more sample, the extra samples going where the running totals
    fall short, so every part holds its fraction of each class and of the whole to within a
    sample or so. A class with at least as many samples as there are non-empty parts appears in
    every such part. The result depends only on (targets, fractions, seed).

    Args:
        targets: integer label of every sample, shape (N,).
        fractions: fraction of each part, non-negative, summing to 1.
        seed: random seed.

    Returns:
        One sorted int64 index array per part; disjoint, together covering 0..N-1.
    """
    y = np.asarray(targets)
    if y.ndim != 1:
        raise ValueError(f"targets must be one-dimensional, got shape {y.shape}")
    f = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in f]
    assigned = np.zeros(f.size)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        counts = _allocate(idx.size, f, (assigned.sum() + idx.size) * f - assigned)
        assigned += counts
        bounds = np.cumsum(counts)[:-1]
        for p, chunk in enumerate(np.split(idx, bounds)):
            parts[p].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def _class_counts(y: np.ndarray) -> str:
    labels, counts = np.unique(y, return_counts=True)
    if labels.size <= 10:
        return f"{labels.size} classes, samples per class {dict(zip(labels.tolist(), counts.tolist()))}"
    return f"{labels.size} classes of {counts.min()}..{counts.max()} samples"


def _refuse_empty(
    name: str,
    idx: dict[str, np.ndarray],
    protocol: SplitProtocol,
    y: np.ndarray,
    fractions: tuple[float, ...],
) -> dict[str, np.ndarray]:
    """Raise if a part is empty: every part is used (train fits, val selects, test reports)."""
    empty = [p for p in PARTS if idx[p].size == 0]
    if not empty:
        return idx
    part = empty[0]
    used = "every part is used (train fits, val selects the model, test reports)"
    cut = PARTS[: len(fractions)]
    if part not in cut:  # a whole source split: official train/val/test, or the holdout's test
        source = protocol.test_source if protocol.kind == "holdout" else part
        raise ValueError(
            f"{name}: the {part} part is empty: source split {source!r} has no samples; {used}. Check the "
            f"dataset's {source} files."
        )
    share = fractions[cut.index(part)]
    if share == 0:
        fix = f"give {part} a positive fraction, e.g. fractions={list(protocol.fractions)}"
    else:
        need = sum(1 for f in fractions if f > 0)
        fix = f"add data (with {need}+ samples per class every part gets one) or raise the {part} fraction"
    raise ValueError(
        f"{name}: the {part} part would be empty: fractions {list(fractions)} ({', '.join(cut)}) of "
        f"{y.size} samples in {_class_counts(y)}; {used}: {fix}"
    )


def make_splits(
    name: str,
    targets_train: Sequence[int] | np.ndarray,
    targets_test: Sequence[int] | np.ndarray | None = None,
    *,
    targets_val: Sequence[int] | np.ndarray | None = None,
    fractions: Sequence[float] | None = None,
    seed: int = 42,
) -> dict[str, np.ndarray]:
    """Train/val/test indices of a dataset under its protocol (method.md §3).

    Which targets to pass depends on the protocol (see `split_sources`):

    - ``holdout``: `targets_train` of source ``train`` and `targets_test` of the test source
      (``test``; ``val`` for ImageNet); train/val index into ``train``, test is
      ``arange(len(targets_test))``.
    - ``all``: `targets_train` of source ``all`` (every sample), nothing else; all three
      parts index into it.
    - ``official``: the targets of sources ``train``, ``val``, ``test``; each part is the whole
      of its source. RESISC45 given only `targets_train` (its source ``all``) falls back to a
      seeded stratified 60/20/20.

    Args:
        name: dataset name, e.g. ``"cifar10"``.
        targets_train: labels of source ``train`` (or ``all``).
        targets_test: labels of source ``test`` (``holdout``/``official`` only).
        targets_val: labels of source ``val`` (``official`` only).
        fractions: override the protocol's fractions: (train, val) for ``holdout``,
            (train, val, test) for ``all``.
        seed: seed of the stratified split.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}``, sorted int64 arrays.

    Raises:
        ValueError: targets that do not fit the protocol, bad fractions, or a part that would be
            empty (every part is used; the message names the part, fractions and class counts).
    """
    protocol = get_split_protocol(name)
    if protocol.kind == "official" and targets_val is None and targets_test is None and protocol.fallback:
        protocol = protocol.fallback
    y_train = np.asarray(targets_train)

    if protocol.kind == "official":
        if targets_val is None or targets_test is None:
            raise ValueError(
                f"{name} uses its official train/val/test splits: pass targets_val and targets_test"
            )
        if fractions is not None:
            raise ValueError(f"{name} uses its official splits; fractions do not apply")
        idx = {
            "train": np.arange(len(y_train), dtype=np.int64),
            "val": np.arange(len(targets_val), dtype=np.int64),
            "test": np.arange(len(targets_test), dtype=np.int64),
        }
        return _refuse_empty(name, idx, protocol, y_train, ())

    if targets_val is not None:
        raise ValueError(f"{name} derives its validation split ({protocol.kind}); do not pass targets_val")
    f = tuple(fractions) if fractions is not None else protocol.fractions

    if protocol.kind == "holdout":
        if targets_test is None:
            raise ValueError(
                f"{name} keeps its official test split: pass targets_test (source split "
                f"{protocol.test_source!r}); "
                "validation is carved from train only"
            )
        if len(f) != 2:
            raise ValueError(f"{name}: fractions must be (train, val) for a holdout split, got {f}")
        train, val = stratified_split(y_train, f, seed)
        idx = {"train": train, "val": val, "test": np.arange(len(targets_test), dtype=np.int64)}
        return _refuse_empty(name, idx, protocol, y_train, f)

    if targets_test is not None:
        raise ValueError(f"{name} splits all of its data 3 ways: pass the targets of source 'all' only")
    if len(f) != 3:
        raise ValueError(f"{name}: fractions must be (train, val, test), got {f}")
    train, val, test = stratified_split(y_train, f, seed)
    return _refuse_empty(name, {"train": train, "val": val, "test": test}, protocol, y_train, f)


def few_shot(
    targets: Sequence[int] | np.ndarray,
    train_indices: Sequence[int] | np.ndarray,
    shots: int,
    seed: int = 42,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Draw `shots` samples per class from the train part only.

    Every class present in `targets` (the whole source, so a class missing from the train part
    is caught) must have at least `shots` samples among `train_indices`.

    Args:
        targets: labels of the whole source split, shape (N,).
        train_indices: indices (into `targets`) of the train part, e.g. ``make_splits(...)["train"]``.
        shots: k, samples per class.
        seed: random seed.
        class_names: names used in error messages.

    Returns:
        Sorted int64 indices into `targets`, a subset of `train_indices`, exactly k per class.

    Raises:
        ValueError: k < 1, or a class has fewer than k train samples (the error names it).
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    y = np.asarray(targets)
    train = np.asarray(train_indices, dtype=np.int64)
    rng = np.random.default_rng(seed)
    y_train = y[train]
    chosen = []
    for c in np.unique(y):
        pool = train[y_train == c]
        if pool.size < shots:
            label = f"{class_names[c]!r} (label {c})" if class_names is not None else f"label {c}"
            raise ValueError(f"class {label} has {pool.size} train samples, fewer than shots={shots}")
        chosen.append(rng.choice(pool, size=shots, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)

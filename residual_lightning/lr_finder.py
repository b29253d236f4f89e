"""The LR finder of ``model.lr: auto``: a short-budget validation range test (`RateSearch`).

The rule. Every candidate rate of a log grid (`LR_MIN`..`LR_MAX`, `LR_PER_DECADE` per decade) trains
the adapter from the same initial state on the same `LR_STEPS` train batches (seeded), with a fresh
optimizer of the run's own kind; then the validation loss of the result is measured (on at most
`LR_VAL_SAMPLES` validation samples, the optimizer in eval mode: what checkpointing would keep). The
suggestion is the candidate with the lowest validation loss after a 3-point mean over neighbouring
candidates (in log rate; the ends of the grid count their own value twice), which prefers the middle
of a wide basin to a lone dip. A candidate whose
training diverges (a non-finite loss) scores +inf.

Why this and not Lightning's loss-slope rule: the adapters here have a few hundred to a few thousand
parameters and train on cached tensors, so one candidate costs milliseconds and the question "which
rate gets furthest in a fixed budget" can be asked directly, on held-out data. The steepest-descent
rule on one run of growing rates measures the slope of a curve whose every point was reached at
other rates; on these adapters it lands a decade or more off (0.04..3.4 where 1e-3..0.8 are right)
and depends on its smoothing. Nothing is clamped: the suggestion is always one of the candidates.

Everything the search touches is restored: the adapter's parameters, the model's train/eval mode,
and the global RNG state (`isolate_rng`). Pure Lightning callback plus torch; the CLI calls it
through `residual_lightning.callbacks.find_lr`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import _TunerExitException
from lightning.pytorch.utilities.seed import isolate_rng

#: The candidate rates: a log grid from `LR_MIN` to `LR_MAX`, `LR_PER_DECADE` points per decade
#: (linear's 1e-3 and residual's 0.8 with two decades to spare below and one above).
LR_MIN, LR_MAX, LR_PER_DECADE = 1e-5, 100.0, 3
#: Training steps per candidate (batches of the run's own size; the train batches cycle if fewer).
LR_STEPS = 30
#: Validation samples scored per candidate (the first ones, in the loader's fixed order).
LR_VAL_SAMPLES = 512
#: The rule, as recorded in ``lr_finder.json``.
LR_RULE = (
    f"lowest validation loss after {LR_STEPS} steps from the initial state, "
    "3-point mean over neighbouring rates (log grid)"
)


@dataclass
class LRFinderResult:
    """One search: the rates tried, their validation losses (raw and smoothed), and the suggestion."""

    lr: float
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    index: int  # the candidate suggested
    rule: str
    seed: int

    def as_dict(self) -> dict:
        """Plain values for ``lr_finder.json`` (inf written as a string: JSON has no infinity)."""
        out = asdict(self)
        for key in ("losses", "smoothed"):
            out[key] = [v if math.isfinite(v) else "inf" for v in out[key]]
        return out


def candidate_rates(
    low: float = LR_MIN, high: float = LR_MAX, per_decade: int = LR_PER_DECADE
) -> list[float]:
    """The log grid from `low` to `high` (both included), `per_decade` points per decade."""
    if not 0 < low < high or per_decade < 1:
        raise ValueError(
            f"LR finder: need 0 < min_lr < max_lr and per_decade >= 1, got {low}, {high}, {per_decade}"
        )
    n = round(math.log10(high / low) * per_decade)
    return [float(low * 10 ** (i / per_decade)) for i in range(n + 1)]


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, int, list[float]]:
    """The rule: the candidate with the lowest 3-point mean of validation losses (ties: the smaller
    rate). Returns the rate, its index and the smoothed losses.

    Raises:
        ValueError: every candidate diverged.
    """
    n = len(losses)
    padded = [losses[0], *losses, losses[-1]]  # the ends repeat themselves: no shorter window there
    smoothed = [
        sum(padded[i : i + 3]) / 3 for i in range(n)
    ]  # inf stays inf: a diverged neighbour disqualifies
    finite = [i for i in range(n) if math.isfinite(smoothed[i])]
    if not finite:
        finite = [i for i in range(n) if math.isfinite(losses[i])]
        if not finite:
            raise ValueError("LR finder: every candidate rate diverged; set model.lr to a number")
        smoothed = list(losses)
    index = min(finite, key=lambda i: (smoothed[i], i))
    return lrs[index], index, smoothed


def _optimizer(model: L.LightningModule) -> torch.optim.Optimizer:
    """The model's own optimizer (`configure_optimizers`), in train mode if schedule-free."""
    config = model.configure_optimizers()
    if isinstance(config, dict):
        config = config["optimizer"]
    if isinstance(config, (list, tuple)):
        config = config[0]
        config = config[0] if isinstance(config, (list, tuple)) else config
    opt = config
    if callable(getattr(opt, "train", None)):
        opt.train()
    return opt


def _loss(model: L.LightningModule, batch) -> torch.Tensor:
    logits, _, labels = model.batch_logits(batch, zeroshot=False)
    return F.cross_entropy(logits, labels)


class RateSearch(L.Callback):
    """Runs the search at the start of ``trainer.fit`` (the model set up, the data ready), then ends
    that fit (Lightning's `_TunerExitException`, as its own finder does).

    Args:
        lrs: the candidate rates.
        steps: training steps per candidate.
        val_samples: validation samples scored per candidate.
        seed: seed of the train batches drawn and of anything random in the steps.
    """

    def __init__(
        self, lrs: list[float], steps: int = LR_STEPS, val_samples: int = LR_VAL_SAMPLES, seed: int = 0
    ):
        self.lrs, self.steps, self.val_samples, self.seed = list(lrs), steps, val_samples, seed
        self.losses: list[float] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score every candidate, restore the model, and stop this fit."""
        with isolate_rng():
            torch.manual_seed(self.seed)
            self.losses = self._search(trainer, pl_module)
        raise _TunerExitException()

    def _batches(self, trainer: L.Trainer, model: L.LightningModule):
        dm = trainer.datamodule
        device = model.device
        move = lambda b: model.transfer_batch_to_device(b, device, 0)  # noqa: E731
        train = []
        for batch in dm.train_dataloader():
            train.append(move(batch))
            if len(train) >= self.steps:
                break
        val, seen = [], 0
        for batch in dm.val_dataloader():
            val.append(move(batch))
            seen += len(val[-1][1]) if isinstance(val[-1], (tuple, list)) else len(val[-1])
            if seen >= self.val_samples:
                break
        if not train or not val:
            raise ValueError("LR finder: the train or validation part is empty")
        return train, val

    def _search(self, trainer: L.Trainer, model: L.LightningModule) -> list[float]:
        train, val = self._batches(trainer, model)
        initial = copy.deepcopy(model.state_dict())
        was_training, lr = model.training, model.lr
        losses = []
        try:
            for candidate in self.lrs:
                model.load_state_dict(initial)
                model.lr = candidate
                opt = _optimizer(model)
                model.train()
                loss = torch.tensor(0.0)
                for step in range(self.steps):
                    loss = _loss(model, train[step % len(train)])
                    if not torch.isfinite(loss):
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                if not torch.isfinite(loss):
                    losses.append(math.inf)
                    continue
                if callable(getattr(opt, "eval", None)):
                    opt.eval()
                model.eval()
                with torch.no_grad():
                    total, count = 0.0, 0
                    for batch in val:
                        logits, _, labels = model.batch_logits(batch, zeroshot=False)
                        total += float(F.cross_entropy(logits, labels, reduction="sum"))
                        count += len(labels)
                value = total / count
                losses.append(value if math.isfinite(value) else math.inf)
        finally:
            model.load_state_dict(initial)
            model.lr = lr
            model.train(was_training)
        return losses

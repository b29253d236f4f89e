"""`ClassifierModule`: what the recipe's LightningModules share (the CLI's ``--model`` base class).

`ResidualModel` (`residual_lightning.model`: an adapter on cached contributions, the default) and
`FinetuneModel` (`residual_lightning.finetune`: the whole vision tower on images) are its
subclasses; ``--model FinetuneModel`` or ``model: {class_path: ...}`` chooses one. The base holds
the frozen text classifier (buffers, so a checkpoint is self-contained) and `logits_from_embedding`,
one set of metrics per stage (logged as ``stage/metric``, per-class accuracy and the confusion
matrix at test), schedule-free train/eval switching, the divergence check, the optimizer, and the
checks that refuse a checkpoint of another class, backbone, shape or class list. A subclass says how
a batch becomes logits (`batch_logits`), how images become embeddings (`encode_image`) and which
data it reads (`data_mode`, linked by the CLI into ``data.mode``).
"""

from __future__ import annotations

import inspect
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from jsonargparse.typing import PositiveFloat
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from residual_lightning.contributions import Contributions, UnitForm
from residual_lightning.units import BackboneSpec

LAMBDA_WARN = 1e4  # a learned scale beyond this means the learning rate is far too high
DIVERGENCE_EPOCHS = 3  # epochs with a train loss above the first epoch's before a warning
RESIDUAL_MODEL = "residual_lightning.model.ResidualModel"
FINETUNE_MODEL = "residual_lightning.finetune.FinetuneModel"


def default_optimizer(params) -> torch.optim.Optimizer:
    """Schedule-free AdamW, weight decay 0, no warm-up (the authors' recipe; lr set by the model)."""
    import schedulefree

    return schedulefree.AdamWScheduleFree(params, lr=1e-3, weight_decay=0.0, warmup_steps=0)


def class_path(cls: type) -> str:
    """``module.Name`` of a class, as jsonargparse and the checkpoints spell it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def checkpoint_class_path(hparams: dict) -> str:
    """The class that wrote a checkpoint, from its hyperparameters.

    Every checkpoint since `FinetuneModel` records ``_class_path`` (Lightning's key; the CLI writes it
    too). Older ones have none: ``method: finetune`` was the full-tower baseline, anything else a
    `ResidualModel`.

    Args:
        hparams: the checkpoint's ``hyper_parameters``.
    """
    if hparams.get("_class_path"):
        return str(hparams["_class_path"])
    return FINETUNE_MODEL if hparams.get("method") == "finetune" else RESIDUAL_MODEL


def read_hparams(path: str | Path) -> dict:
    """The ``hyper_parameters`` of a checkpoint file or URL, loaded weights-only (a local file's
    tensors are memory-mapped, not read; a URL is downloaded once into torch's hub cache)."""
    if Path(path).is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    else:
        from lightning.fabric.utilities.cloud_io import _load  # Lightning's own loader: http, fsspec

        ckpt = _load(path, map_location="cpu", weights_only=True)
    return dict(ckpt.get("hyper_parameters") or {})


def _plain_form(form) -> dict | None:
    """A `UnitForm` as plain values (None when there is none): what hparams and checks compare."""
    if not form:
        return None
    return {
        "compact": bool(form.get("compact", True)),
        "head_width": int(form["head_width"]),
        "pooler_units": [str(n) for n in form.get("pooler_units", [])],
    }


def _imported(path: str) -> type | None:
    """The class a class path names, if its module is imported (nothing is imported here)."""
    module, _, name = path.rpartition(".")
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


class ClassifierModule(L.LightningModule, ABC):
    """A classifier over a frozen backbone's classes, scored against a frozen text classifier.

    Args:
        lr: learning rate (None: the class's `default_lr`), or ``"auto"`` to run Lightning's LR
            finder before fitting. None rather than a number so that switching ``--model`` does not
            carry one class's default learning rate into the other (jsonargparse keeps the values of
            options both classes share).
        optimizer: optimizer factory (default: schedule-free AdamW, weight decay 0). Its lr is
            replaced by `lr`.
        logit_mode: ``scaled_cosine`` (normalised embedding times the model's logit scale) or
            ``raw`` (the paper-era code: un-normalised embedding, no scale).
        backbone: the frozen backbone (linked from the data module by the CLI).
        class_names: class names (linked from the data module).
        shape: ``(L, H, k, D)`` of the backbone's units (linked from the data module).
        convention: decomposition convention of the caches (linked from the data module).
        unit_form: what `shape` leaves out of the layout (`UnitLayout.form`: pooler units and
            full-form heads of MAP readouts; None for a compact layout; linked from the data module).
    """

    data_mode: ClassVar[Literal["cache", "images"]] = "cache"  # what it trains on: the CLI sets data.mode
    default_lr: ClassVar[float]  # the learning rate of lr=None
    method: str  # its name in summaries, reports and the grid

    def __init__(
        self,
        lr: PositiveFloat | Literal["auto"] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        logit_mode: Literal["scaled_cosine", "raw"] = "scaled_cosine",
        backbone: BackboneSpec | dict | None = None,
        class_names: list[str] | None = None,
        shape: tuple[int, int, int, int] | None = None,
        convention: Literal["default", "equal_share"] = "default",
        unit_form: UnitForm | None = None,
    ) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("class_names is empty: link them from the data module (the CLI does)")
        if len(class_names) < 2:
            raise ValueError(
                f"the dataset has {len(class_names)} class ({class_names}): classification needs at least 2"
            )
        if lr is None:
            lr = self.default_lr
        if lr != "auto":
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr == float("inf"):
                raise ValueError(f"model.lr must be a positive number or 'auto', got {lr!r}")
            lr = float(lr)  # a plain float: jsonargparse's PositiveFloat would not load weights-only
        if shape is None:
            raise ValueError("shape (L, H, k, D) is missing: link it from the data module (the CLI does)")
        if isinstance(backbone, dict):  # how checkpoints store it
            backbone = BackboneSpec(**backbone)
        self.lr = lr
        self.optimizer_factory = optimizer
        self.logit_mode = logit_mode
        self.backbone_spec = backbone or BackboneSpec()
        self.unit_form = _plain_form(unit_form)
        self.class_names = list(class_names)
        num_classes, dim = len(class_names), shape[3]
        self.register_buffer("classifier", torch.zeros(num_classes, dim))  # (C, D)
        self.register_buffer("logit_scale", torch.tensor(100.0))
        # SigLIP's logit bias (sigmoid probabilities); NaN: none, class probabilities by softmax.
        self.register_buffer("logit_bias", torch.tensor(float("nan")))
        self.register_buffer("ready", torch.tensor(False))  # frozen tensors filled in
        self._backbone: nn.Module | None = None  # not a submodule: kept out of the state_dict
        self._first_loss: float | None = None  # mean train loss of the first epoch (divergence check)
        self._epochs_above_first = 0
        self._warned: set[str] = set()
        self._make_metrics(num_classes)

    def _save_hparams(self) -> None:
        """Record the caller's init args (a subclass calls it last in its ``__init__``).

        The optimizer factory is left out; lr is the resolved number, the backbone a plain dict and
        the class path is recorded, so that checkpoints load with ``torch.load(weights_only=True)``
        and say which class to rebuild.
        """
        self.save_hyperparameters(ignore=["optimizer", "backbone"], frame=inspect.currentframe().f_back)
        self.hparams["lr"] = self.lr
        self.hparams["backbone"] = asdict(self.backbone_spec)
        self.hparams["_class_path"] = class_path(type(self))

    def _make_metrics(self, num_classes: int) -> None:
        top5 = min(5, num_classes)

        def acc(k: int = 1, average: str = "micro") -> torchmetrics.Metric:
            return torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=k, average=average)

        # Keys get a "_" suffix: ModuleDict keys may not shadow nn.Module attributes like `train`.
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_": nn.ModuleDict(
                    {
                        "accuracy": acc(),
                        "top5": acc(top5),
                        "zeroshot_accuracy": acc(),
                        "loss": torchmetrics.MeanMetric(),
                    }
                )
                for stage in ("train", "val", "test")
            }
        )
        self.test_per_class = acc(average="none")
        self.test_confusion = torchmetrics.classification.MulticlassConfusionMatrix(
            num_classes, normalize="true"
        )

    # ------------------------------------------------------------------ what a subclass says

    @abstractmethod
    def batch_logits(self, batch, zeroshot: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(logits, zero-shot logits or None, labels)`` of a training/evaluation batch.

        Args:
            batch: a batch of the data module in this class's `data_mode`.
            zeroshot: also compute the frozen backbone's zero-shot logits (not while training).
        """

    @abstractmethod
    def encode_image(self, images: Tensor) -> Tensor:
        """(N, D) embeddings (not normalised) of preprocessed images, as the classifier scores them."""

    @abstractmethod
    def num_learned(self) -> int:
        """Number of learned scalars."""

    def learned_scales(self) -> list[Tensor]:
        """Trainable scales watched by the divergence check (none unless a subclass has some)."""
        return []

    # ------------------------------------------------------------------ forward and steps

    def logits_from_embedding(self, z: Tensor) -> Tensor:
        """(N, C) logits of (N, D) embeddings with the frozen classifier."""
        if self.logit_mode == "raw":
            return z @ self.classifier.T
        return self.logit_scale * F.normalize(z, dim=-1) @ self.classifier.T

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities: softmax, or per-class sigmoid(logits + bias) for a SigLIP tower."""
        if torch.isfinite(self.logit_bias):
            return torch.sigmoid(logits + self.logit_bias)
        return logits.softmax(-1)

    def logits_from_images(self, images: Tensor) -> Tensor:
        """(N, C) logits of preprocessed images."""
        return self.logits_from_embedding(self.encode_image(images))

    def _step(self, batch, stage: str) -> Tensor:
        logits, zs_logits, labels = self.batch_logits(batch, zeroshot=stage != "train")
        loss = F.cross_entropy(logits, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{stage} loss is {loss.item()} at step {self._trainer.global_step if self._trainer else '?'}: "
                "lower the learning rate or check the cache for NaN/Inf"
            )
        m = self.metrics[f"{stage}_"]
        m["accuracy"].update(logits, labels)
        m["top5"].update(logits, labels)
        if zs_logits is not None:
            m["zeroshot_accuracy"].update(zs_logits, labels)
        m["loss"].update(loss.detach(), weight=labels.shape[0])
        if stage == "test":
            self.test_per_class.update(logits, labels)
            self.test_confusion.update(logits, labels)
        return loss

    def training_step(self, batch, batch_idx: int) -> Tensor:
        """Cross-entropy on a batch; metrics logged per epoch."""
        loss = self._step(batch, "train")
        self.log("train/loss_step", loss, prog_bar=True, batch_size=self._batch_size(batch))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        """Metrics of the model and of zero-shot on the validation part."""
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        """Metrics of the model and of zero-shot on the test part, per class too."""
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Class probabilities of raw images (``(images, labels[, index])`` batches) or cached batches."""
        if isinstance(batch, Contributions):
            logits, labels, index = self(batch.float()), batch.label, None
        else:
            images, labels = batch[0], batch[1]
            index = batch[2] if len(batch) > 2 else None
            logits = self.logits_from_images(images)
        out = {"probs": self.probabilities(logits), "labels": labels}
        if index is not None:
            out["index"] = index
        return out

    @staticmethod
    def _batch_size(batch) -> int:
        return len(batch) if isinstance(batch, Contributions) else batch[1].shape[0]

    def backbone(self) -> nn.Module:
        """The frozen backbone, loaded on first use (not in the state_dict)."""
        if self._backbone is None:
            dm = self.trainer.datamodule if self._trainer is not None else None
            if dm is not None and getattr(dm, "backbone", None) == self.backbone_spec:
                model = dm.loaded_backbone().model.to(self.device)  # loaded once per process
            else:
                model = self.backbone_spec.load(self.device).model
            # Bypass nn.Module.__setattr__: a registered submodule would land in the state_dict.
            object.__setattr__(self, "_backbone", model)
        return self._backbone

    # ------------------------------------------------------------------ epoch ends

    def _log_stage(self, stage: str) -> None:
        m = self.metrics[f"{stage}_"]
        if m["loss"].update_count == 0:
            return
        values = {f"{stage}/{name}": metric.compute() for name, metric in m.items() if metric.update_count}
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)  # already synced by torchmetrics
        for metric in m.values():
            metric.reset()

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training metrics, warn about divergence; schedule-free back to eval."""
        loss = self.metrics["train_"]["loss"]
        if loss.update_count:
            self._check_divergence(float(loss.compute()))
        self._log_stage("train")
        self._optimizer_mode("eval")

    def _check_divergence(self, epoch_loss: float) -> None:
        """Warn (once each) when the loss stays above its first-epoch value or a λ explodes."""
        if self._first_loss is None:
            self._first_loss = epoch_loss
        elif epoch_loss > self._first_loss:
            self._epochs_above_first += 1
        else:
            self._epochs_above_first = 0
        if self._epochs_above_first >= DIVERGENCE_EPOCHS and "loss" not in self._warned:
            self._warned.add("loss")
            rank_zero_warn(
                f"train loss {epoch_loss:.4g} has stayed above its first-epoch value {self._first_loss:.4g} "
                f"for {self._epochs_above_first} epochs: training is diverging; lower the learning rate "
                f"(model.lr={self.lr})"
            )
        params = [p for p in self.learned_scales() if p.requires_grad]
        largest = max((float(p.detach().abs().max()) for p in params if p.numel()), default=0.0)
        if largest > LAMBDA_WARN and "lambda" not in self._warned:
            self._warned.add("lambda")
            rank_zero_warn(
                f"a learned scale reached |λ| = {largest:.3g} (> {LAMBDA_WARN:.0e}): the learning rate is far "
                f"too high (model.lr={self.lr}); results will be near chance"
            )

    def on_validation_epoch_end(self) -> None:
        """Log validation metrics."""
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        """Log test metrics; keep the per-class accuracy and the confusion matrix for plotting
        (`callbacks.ResidualPlots`: one figure each and a CSV, not one scalar per class)."""
        self._log_stage("test")
        self.per_class_accuracy = self.test_per_class.compute().cpu()  # (C,)
        self.confusion_matrix = self.test_confusion.compute().cpu()
        self.test_per_class.reset()
        self.test_confusion.reset()

    # ------------------------------------------------------------------ schedule-free modes

    def _optimizer_mode(self, mode: Literal["train", "eval"]) -> None:
        """Switch every schedule-free optimizer (those with .train()/.eval()) to `mode`."""
        if self._trainer is None:
            return
        for opt in self.trainer.optimizers:
            fn = getattr(opt, mode, None)
            if callable(fn) and "train_mode" in opt.param_groups[0]:
                if opt.param_groups[0]["train_mode"] != (mode == "train"):
                    fn()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Schedule-free in train mode for every step (also inside the LR finder)."""
        self._optimizer_mode("train")

    def on_validation_epoch_start(self) -> None:
        """Evaluate the averaged weights."""
        self._optimizer_mode("eval")

    def on_test_epoch_start(self) -> None:
        """Evaluate the averaged weights."""
        self._optimizer_mode("eval")

    def on_predict_epoch_start(self) -> None:
        """Predict with the averaged weights of a trained checkpoint."""
        if not bool(self.ready):
            raise ValueError(
                "predict needs a trained model: pass --ckpt_path <checkpoint of residual-lightning fit>"
            )
        self._optimizer_mode("eval")

    def configure_optimizers(self):
        """The injected optimizer over the trainable parameters, with lr = `self.lr`."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"method {self.method!r} has nothing to train; use `validate`/`test` for zero-shot"
            )
        if self.lr == "auto":
            raise ValueError(
                "lr is 'auto' but the LR finder did not run: use the residual-lightning CLI or set lr"
            )
        opt = self.optimizer_factory(params)
        for group in opt.param_groups:
            group["lr"] = float(self.lr)
        return opt

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints hold the averaged (eval-mode) weights and the checkpoint format stamp."""
        from residual_lightning.checkpoints import stamp

        self._optimizer_mode("eval")
        stamp(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another format, class, class list, backbone, method or shape."""
        from residual_lightning.checkpoints import check_stamp

        where = getattr(self._trainer, "ckpt_path", None) or "checkpoint"
        check_stamp(checkpoint, where)
        # Checkpoints of earlier releases have no logit bias: softmax probabilities, as then.
        checkpoint.get("state_dict", {}).setdefault("logit_bias", torch.tensor(float("nan")))
        saved = checkpoint.get("hyper_parameters", {})
        written_by = checkpoint_class_path(saved)
        cls = _imported(written_by)
        if cls is None or not (issubclass(type(self), cls) or issubclass(cls, type(self))):
            name = written_by.rpartition(".")[2]
            raise ValueError(
                f"{where} was written by {name} and this run builds {type(self).__name__}: pass "
                f"--model {name} (or load it with ResidualCLIP.from_checkpoint)"
            )
        names = saved.get("class_names")
        if names is not None and list(names) != self.class_names:
            diff = next(
                (i for i, (a, b) in enumerate(zip(names, self.class_names)) if a != b),
                min(len(names), len(self.class_names)),
            )
            theirs = names[diff] if diff < len(names) else "<none>"
            ours = self.class_names[diff] if diff < len(self.class_names) else "<none>"
            raise ValueError(
                f"checkpoint was trained on other classes: class {diff} is {theirs!r} in the checkpoint "
                f"and {ours!r} in this run ({len(names)} vs {len(self.class_names)} classes): pass the "
                "dataset the checkpoint was trained on"
            )
        mine = {
            "backbone": asdict(self.backbone_spec),
            "method": self.method,
            "shape": tuple(self.hparams.shape),
            "unit_form": self.unit_form,
        }
        theirs = {
            "backbone": saved.get("backbone"),
            "method": saved.get("method"),
            "shape": tuple(saved["shape"]) if saved.get("shape") is not None else None,
            "unit_form": _plain_form(saved.get("unit_form")),
        }
        for field in ("backbone", "method", "shape", "unit_form"):
            if theirs[field] is not None and theirs[field] != mine[field]:
                raise ValueError(
                    f"checkpoint was trained with {field}={theirs[field]}, but this run has {field}={mine[field]}: "
                    "pass the config the checkpoint was trained with (or a checkpoint of this backbone)"
                )

"""`ResidualModel`: the LightningModule (frozen tensors + trainable adapter + metrics).

Training and evaluation run on cached contributions (`CachedBatch`): the frozen backbone is not
run. It is built lazily from its spec only for `predict` on raw images and for `finetune`, and is
never part of the state_dict (checkpoints hold the spec and the adapter). The frozen tensors (head
maps, text classifier, logit scale, the adapter's PCA bases) are buffers, so a checkpoint is
self-contained; `ResidualCLIP` rebuilds backbone + adapter for inference without Lightning.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from jsonargparse.typing import PositiveFloat
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from residual_lightning.adapters import METHODS, Adapter, build_adapter, method_options
from residual_lightning.data.batch import CachedBatch, embedding
from residual_lightning.spectral import PCABasis, UnitBases
from residual_lightning.units import EQUAL_SHARE_EXTRA, BackboneSpec, decompose_compact

log = logging.getLogger(__name__)

Method = Literal["residual", "residual_star", "coarse", "linear", "spectral", "zeroshot", "finetune"]
LAMBDA_WARN = 1e4  # a learned scale beyond this means the learning rate is far too high
DIVERGENCE_EPOCHS = 3  # epochs with a train loss above the first epoch's before a warning


def default_optimizer(params) -> torch.optim.Optimizer:
    """Schedule-free AdamW, weight decay 0, no warm-up (the authors' recipe; lr set by the model)."""
    import schedulefree

    return schedulefree.AdamWScheduleFree(params, lr=1e-3, weight_decay=0.0, warmup_steps=0)


def placeholder_bases(layers: int, heads: int, k: int, dim: int, head_components: int) -> UnitBases:
    """Zero bases of the right shapes, to build an adapter whose buffers a checkpoint then fills."""

    def basis(*units: int, comps: int) -> PCABasis:
        return PCABasis(
            mean=torch.zeros(*units, dim),
            components=torch.zeros(*units, comps, dim),
            explained_variance=torch.zeros(*units, comps),
            explained_variance_ratio=torch.zeros(*units, comps),
            mask=torch.ones(*units, comps, dtype=torch.bool),
        )

    return UnitBases(
        heads=basis(layers, heads, comps=head_components),
        mlps=basis(layers, comps=dim),
        emb=basis(comps=dim),
        head_coord_mean=torch.zeros(layers, heads, k),
        n_samples=2,
        output=basis(comps=dim),
    )


class ResidualModel(L.LightningModule):
    """Aligns a frozen CLIP ViT to a classifier with a small adapter on its residual units.

    Args:
        method: ``residual``, ``residual_star``, ``coarse``, ``linear``, ``spectral``,
            ``zeroshot`` or ``finetune`` (the whole vision tower on images, the upper bound).
        adapter: options of the method's adapter overriding its preset (e.g. ``{"init": "ones"}``,
            ``{"components": {"heads": 0.9}}``, ``{"transform": "heads", "others": "zero"}``).
        lr: learning rate, or ``"auto"`` to run Lightning's LR finder before fitting.
        optimizer: optimizer factory (default: schedule-free AdamW, weight decay 0). Its lr is
            replaced by `lr`.
        logit_mode: ``scaled_cosine`` (normalised embedding times the model's logit scale) or
            ``raw`` (the paper-era code: un-normalised embedding, no scale).
        classifier: ``text`` (zero-shot text classifier) or ``prototypes`` (class means of the train
            embeddings, for backbones without a text tower).
        backbone: the frozen backbone (linked from the data module by the CLI).
        class_names: class names (linked from the data module).
        shape: ``(L, H, k, D)`` of the cached units (linked from the data module).
        convention: decomposition convention of the caches (linked from the data module).
    """

    def __init__(
        self,
        method: Method = "residual",
        adapter: dict[str, Any] | None = None,
        lr: PositiveFloat | Literal["auto"] = 0.8,
        optimizer: OptimizerCallable = default_optimizer,
        logit_mode: Literal["scaled_cosine", "raw"] = "scaled_cosine",
        classifier: Literal["text", "prototypes"] = "text",
        backbone: BackboneSpec | dict | None = None,
        class_names: list[str] | None = None,
        shape: tuple[int, int, int, int] | None = None,
        convention: Literal["default", "equal_share"] = "default",
    ) -> None:
        super().__init__()
        if method not in (*METHODS, "finetune"):
            raise ValueError(f"unknown method {method!r}; valid: {', '.join((*METHODS, 'finetune'))}")
        if not class_names:
            raise ValueError("class_names is empty: link them from the data module (the CLI does)")
        if len(class_names) < 2:
            raise ValueError(
                f"the dataset has {len(class_names)} class ({class_names}): classification needs at least 2"
            )
        if lr != "auto":
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr == float("inf"):
                raise ValueError(f"model.lr must be a positive number or 'auto', got {lr!r}")
            lr = float(lr)  # a plain float: jsonargparse's PositiveFloat would not load weights-only
        if shape is None:
            raise ValueError("shape (L, H, k, D) is missing: link it from the data module (the CLI does)")
        if isinstance(backbone, dict):  # how checkpoints store it
            backbone = BackboneSpec(**backbone)
        if method != "finetune":
            valid = method_options(method)
            wrong = [k for k in (adapter or {}) if k not in valid]
            if wrong:
                raise ValueError(
                    f"model.adapter option(s) {wrong} do not apply to method {method!r}; its options: {', '.join(valid)}"
                )
        self.save_hyperparameters(ignore=["optimizer", "backbone"])
        self.hparams["lr"] = lr
        # A plain dict, so that checkpoints load with torch.load(weights_only=True).
        self.hparams["backbone"] = asdict(backbone or BackboneSpec())
        self.method, self.adapter_options = method, dict(adapter or {})
        self.lr = lr
        self.optimizer_factory = optimizer
        self.logit_mode, self.classifier_kind = logit_mode, classifier
        self.backbone_spec = backbone or BackboneSpec()
        self.class_names = list(class_names)
        layers, heads, k, dim = shape
        num_classes = len(class_names)
        self.register_buffer("head_maps", torch.zeros(layers, heads, dim, k))  # (L, H, D, k)
        self.register_buffer("classifier", torch.zeros(num_classes, dim))  # (C, D)
        self.register_buffer("logit_scale", torch.tensor(100.0))
        self.register_buffer("ready", torch.tensor(False))  # frozen tensors filled in
        self.adapter: Adapter | None = None
        self._backbone: nn.Module | None = None  # not a submodule: kept out of the state_dict
        self.finetuned: nn.Module | None = None  # the trainable tower of `finetune`
        self._first_loss: float | None = None  # mean train loss of the first epoch (divergence check)
        self._epochs_above_first = 0
        self._warned: set[str] = set()
        self._make_metrics(num_classes)

    # ------------------------------------------------------------------ construction

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

    def _build_adapter(self, bases: UnitBases | None) -> None:
        if self.method == "finetune":
            return
        layers, heads, k, dim = self.hparams.shape
        if bases is None:
            d = k - EQUAL_SHARE_EXTRA if self.hparams.convention == "equal_share" else k
            bases = placeholder_bases(layers, heads, k, dim, d)
        self.adapter = build_adapter(self.method, bases, self.head_maps, **self.adapter_options).to(
            self.device
        )

    def setup(self, stage: str) -> None:
        """Fill the frozen tensors from the data module and build the adapter (unless restored)."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if bool(self.ready) or dm is None or stage == "predict":  # predict: the checkpoint fills them
            if self.adapter is None:
                self._build_adapter(None)
            return
        if self.method == "finetune":
            self._setup_finetune(dm)
            return
        self.head_maps.copy_(dm.head_maps)
        if self.classifier_kind == "text":
            weights, scale = dm.classifier()
        else:
            weights, scale = self._prototypes(dm), 100.0
        self.classifier.copy_(weights)
        self.logit_scale.fill_(scale)
        bases = dm.bases() if self.method in ("residual", "residual_star", "spectral") else None
        self._build_adapter(bases)
        self.ready.fill_(True)
        log.info("%s: %d learned parameters", self.method, self.num_learned())

    def _prototypes(self, dm) -> Tensor:
        from residual_lightning.classifier import prototypes

        embs, labels = [], []
        for batch in dm.caches["train"].iter_batches():
            embs.append(embedding(batch, self.head_maps.cpu()))
            labels.append(batch.label)
        return prototypes(torch.cat(embs), torch.cat(labels), len(self.class_names))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another format, backbone, method or shape; build its adapter."""
        from residual_lightning.checkpoints import check_stamp

        check_stamp(checkpoint, getattr(self._trainer, "ckpt_path", None) or "checkpoint")
        saved = checkpoint.get("hyper_parameters", {})
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
        }
        theirs = {
            "backbone": saved.get("backbone"),
            "method": saved.get("method"),
            "shape": tuple(saved["shape"]) if saved.get("shape") is not None else None,
        }
        for field in ("backbone", "method", "shape"):
            if theirs[field] is not None and theirs[field] != mine[field]:
                raise ValueError(
                    f"checkpoint was trained with {field}={theirs[field]}, but this run has {field}={mine[field]}: "
                    "pass the config the checkpoint was trained with (or a checkpoint of this backbone)"
                )
        if self.method == "finetune":
            if self.finetuned is None:
                self.finetuned = self.backbone_spec.load(self.device).model.visual
        elif self.adapter is None:
            self._build_adapter(None)

    def num_learned(self) -> int:
        """Learned scalars: the adapter's, or every trainable backbone parameter for finetune."""
        if self.method == "finetune":
            return sum(p.numel() for p in (self.finetuned or nn.Module()).parameters() if p.requires_grad)
        return self.adapter.num_learned() if self.adapter is not None else 0

    # ------------------------------------------------------------------ forward

    def logits_from_embedding(self, z: Tensor) -> Tensor:
        """(N, C) logits of (N, D) embeddings with the frozen classifier."""
        if self.logit_mode == "raw":
            return z @ self.classifier.T
        return self.logit_scale * F.normalize(z, dim=-1) @ self.classifier.T

    def forward(self, batch: CachedBatch) -> Tensor:
        """(N, C) logits of a cached batch."""
        return self.logits_from_embedding(self.adapter(batch))

    def _step(self, batch, stage: str) -> Tensor:
        if self.method == "finetune":
            images, labels = batch
            logits = self.logits_from_embedding(self.finetuned(images).float())
            zs_logits = None
            if stage != "train":  # zero-shot of the frozen backbone on the same images
                with torch.no_grad():
                    zs_logits = self.logits_from_embedding(self.backbone().encode_image(images).float())
        else:
            batch = batch.float()
            labels = batch.label
            logits = self(batch)
            zs_logits = None
            if stage != "train":  # zero-shot of the same split; not recomputed in the training hot loop
                with torch.no_grad():
                    zs_logits = self.logits_from_embedding(embedding(batch, self.head_maps))
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
        """Metrics of the adapter and of zero-shot on the validation part."""
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        """Metrics of the adapter and of zero-shot on the test part, per class too."""
        self._step(batch, "test")

    @staticmethod
    def _batch_size(batch) -> int:
        return len(batch) if isinstance(batch, CachedBatch) else batch[1].shape[0]

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
        params = [
            p for p in (self.adapter.parameters() if self.adapter is not None else ()) if p.requires_grad
        ]
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
        """Log test metrics, per-class accuracy and keep the confusion matrix for plotting."""
        self._log_stage("test")
        per_class = self.test_per_class.compute()
        for name, value in zip(self.class_names, per_class):
            self.log(f"test/class_accuracy/{name}", value, sync_dist=True)
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints hold the averaged (eval-mode) weights and the checkpoint format stamp."""
        from residual_lightning.checkpoints import stamp

        self._optimizer_mode("eval")
        stamp(checkpoint)

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

    # ------------------------------------------------------------------ finetune and predict

    def _setup_finetune(self, dm) -> None:
        if getattr(dm, "mode", "images") != "images":
            raise ValueError(
                "finetune trains on images: set data.mode: images (the CLI links it from model.method)"
            )
        bb = self.backbone_spec.load(self.device)
        weights, scale = dm.classifier()
        self.classifier.copy_(weights)
        self.logit_scale.fill_(scale)
        self.finetuned = bb.model.visual.train().requires_grad_(True)
        self.ready.fill_(True)

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

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Class probabilities of raw images (``(images, labels[, index])`` batches) or cached batches."""
        if isinstance(batch, CachedBatch):
            logits, labels, index = self(batch.float()), batch.label, None
        else:
            images, labels = batch[0], batch[1]
            index = batch[2] if len(batch) > 2 else None
            logits = self.logits_from_images(images)
        out = {"probs": logits.softmax(-1), "labels": labels}
        if index is not None:
            out["index"] = index
        return out

    def logits_from_images(self, images: Tensor) -> Tensor:
        """(N, C) logits of preprocessed images through the backbone and the adapter."""
        if self.method == "finetune":
            return self.logits_from_embedding(self.finetuned(images).float())
        with torch.no_grad():
            compact = decompose_compact(self.backbone(), images.to(self.device), self.hparams.convention)
        batch = CachedBatch(
            compact.heads, compact.mlps, compact.emb, torch.zeros(len(images), dtype=torch.long)
        )
        return self(batch)


class ResidualCLIP(nn.Module):
    """Inference without Lightning: backbone + adapter + classifier from a checkpoint.

    Example:
        >>> clip = ResidualCLIP.from_checkpoint("runs/.../best.ckpt")  # doctest: +SKIP
        >>> probs = clip.predict(images)                                 # doctest: +SKIP
    """

    def __init__(self, model: ResidualModel) -> None:
        super().__init__()
        self.model = model.eval()

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> ResidualCLIP:
        """Rebuild from a checkpoint written by `residual-lightning fit` (weights-only load).

        Raises:
            CacheError: the file is empty, truncated or not a checkpoint (the message names it).
        """
        from residual_lightning.checkpoints import check_checkpoint

        check_checkpoint(path)
        model = ResidualModel.load_from_checkpoint(path, map_location=map_location, weights_only=True)
        return cls(model)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """(N, D) aligned image embeddings (not normalised)."""
        compact = decompose_compact(self.model.backbone(), images, self.model.hparams.convention)
        batch = CachedBatch(
            compact.heads, compact.mlps, compact.emb, torch.zeros(len(images), dtype=torch.long)
        )
        return self.model.adapter(batch)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(N, C) class probabilities."""
        return self.model.logits_from_images(images).softmax(-1)

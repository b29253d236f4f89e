"""`FinetuneModel`: the full-tower baseline, the whole vision tower trained on images (the upper bound).

The one model of the recipe that reads images rather than cached contributions: its `data_mode` is
``images``, which the CLI links into ``data.mode``, so every epoch runs the backbone forward and
backward over the dataset. The zero-shot accuracy of the frozen backbone is measured on the same
validation and test images. Select it with

    residual-lightning fit --config ... --model FinetuneModel --model.lr 1e-5
    residual-lightning fit --config ... --config configs/methods/finetune.yaml

or ``model: {class_path: residual_lightning.finetune.FinetuneModel, init_args: {lr: 1.0e-05}}``.
The spelling of earlier releases, ``model.method: finetune``, still builds it for one release (with
a deprecation warning; `from_method_finetune`), and their finetune checkpoints load
(`FinetuneModel.on_load_checkpoint`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from jsonargparse.typing import PositiveFloat
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from residual_lightning.classifier_module import ClassifierModule, default_optimizer
from residual_lightning.contributions import UnitForm
from residual_lightning.units import BackboneSpec

log = logging.getLogger(__name__)

DEPRECATED_METHOD = (
    "model.method: finetune is deprecated and will be removed in the next release: use --model "
    "FinetuneModel (configs/methods/finetune.yaml)"
)
# Options of `model.method: finetune` runs that FinetuneModel does not take: finetune ignored them.
_ADAPTER_ONLY = ("method", "adapter", "classifier")


class FinetuneModel(ClassifierModule):
    """Fine-tunes the whole vision tower of the backbone on images against its frozen text classifier.

    Args:
        lr: learning rate (None: 1e-5, the authors'), or ``"auto"`` to run Lightning's LR finder.
        optimizer: optimizer factory (default: schedule-free AdamW, weight decay 0). Its lr is
            replaced by `lr`.
        logit_mode: ``scaled_cosine`` (normalised embedding times the model's logit scale) or
            ``raw`` (un-normalised embedding, no scale).
        backbone: the backbone whose vision tower is trained (linked from the data module by the CLI).
        class_names: class names (linked from the data module).
        shape: ``(L, H, k, D)`` of the backbone's units (linked from the data module; D is used).
        convention: the data's decomposition convention (linked from the data module; the tower
            does not decompose, it is recorded with the other linked values).
        unit_form: `UnitLayout.form` of the backbone's units (linked from the data module; recorded
            like `convention`).
        prototypes: accepted and recorded, not used (the tower classifies with the text
            classifier): `ResidualModel`'s switch, here so that configs/recipes/paper.yaml composes
            with every method.
        threshold_fallback: accepted and recorded, not used (no adapter); see `prototypes`.
        spectral_basis: accepted and recorded, not used (no adapter); see `prototypes`.
    """

    data_mode: ClassVar[Literal["cache", "images"]] = "images"
    default_lr: ClassVar[float] = 1e-5
    method = "finetune"
    adapter = None  # no adapter: callbacks and the report look for one

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
        prototypes: Literal["normalized", "raw"] = "normalized",
        threshold_fallback: Literal["all", "one"] = "all",
        spectral_basis: Literal["output_pca", "standard"] = "output_pca",
    ) -> None:
        super().__init__(lr, optimizer, logit_mode, backbone, class_names, shape, convention, unit_form)
        self.finetuned: nn.Module | None = None  # the trainable tower, built in setup or from a checkpoint
        self._save_hparams()

    def setup(self, stage: str) -> None:
        """Load the backbone: its vision tower becomes trainable, its text classifier is kept frozen."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if bool(self.ready) or dm is None or stage == "predict":  # predict: the checkpoint fills them
            return
        if getattr(dm, "mode", "images") != "images":
            raise ValueError(
                "FinetuneModel trains on images: set data.mode: images (the CLI links it from the model class)"
            )
        if self.backbone_spec.library != "open_clip":
            raise NotImplementedError(
                f"FinetuneModel trains open_clip towers only; the backbone is {self.backbone_spec.library} "
                f"{self.backbone_spec.model_name!r}. The adapter methods (--model ResidualModel) support "
                "every library."
            )
        bb = self.backbone_spec.load(self.device)
        weights, scale = dm.classifier()
        self.classifier.copy_(weights)
        self.logit_scale.fill_(scale)
        self.finetuned = bb.model.visual.train().requires_grad_(True)
        self.ready.fill_(True)
        log.info("finetune: %d learned parameters", self.num_learned())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The base checks, then the tower to load into (an older release's ``head_maps`` dropped)."""
        super().on_load_checkpoint(checkpoint)
        # `model.method: finetune` checkpoints of earlier releases hold the adapter model's zero head maps.
        checkpoint.get("state_dict", {}).pop("head_maps", None)
        if self.finetuned is None:
            self.finetuned = self.backbone_spec.load(self.device).model.visual

    def num_learned(self) -> int:
        """Every trainable parameter of the vision tower."""
        return sum(p.numel() for p in (self.finetuned or nn.Module()).parameters() if p.requires_grad)

    def encode_image(self, images: Tensor) -> Tensor:
        """(N, D) embeddings of preprocessed images by the fine-tuned tower."""
        return self.finetuned(images.to(self.device)).float()

    def forward(self, images: Tensor) -> Tensor:
        """(N, C) logits of preprocessed images."""
        return self.logits_from_images(images)

    def batch_logits(self, batch, zeroshot: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """Logits of the tower and, when asked, of the frozen backbone on ``(images, labels)``."""
        images, labels = batch
        logits = self.logits_from_embedding(self.finetuned(images).float())
        zs_logits = None
        if zeroshot:  # zero-shot of the frozen backbone on the same images
            with torch.no_grad():
                zs_logits = self.logits_from_embedding(self.backbone().encode_image(images).float())
        return logits, zs_logits, labels


def from_method_finetune(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """FinetuneModel's init args from those of a deprecated ``model.method: finetune`` model.

    The adapter model's own options (method, adapter, classifier) are dropped: finetune never used
    them (its classifier was always the text one).

    Args:
        init_args: the `ResidualModel` init args (or checkpoint hyperparameters) of the old spelling.
    """
    return {k: v for k, v in init_args.items() if k not in _ADAPTER_ONLY and not k.startswith("_")}

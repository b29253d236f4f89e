"""`ResidualModel`: the LightningModule (frozen tensors + trainable adapter + metrics).

Training and evaluation run on cached `Contributions`: the frozen backbone is not
run. It is built lazily from its spec only for `predict` on raw images, and is never part of the
state_dict (checkpoints hold the spec and the adapter). What it shares with the full-tower baseline
(`residual_lightning.finetune.FinetuneModel`: metrics, classifier, optimizer, checkpoint checks) is
in `residual_lightning.classifier_module.ClassifierModule`. The frozen tensors (head
maps, text classifier, logit scale, the adapter's PCA bases) are buffers, so a checkpoint is
self-contained; `ResidualCLIP` rebuilds backbone + adapter for inference without Lightning.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import ClassVar, Literal

import torch
from jsonargparse.typing import PositiveFloat
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from residual_lightning.adapters import (
    METHODS,
    Adapter,
    AdapterOptions,
    LegacyAdapterOptions,
    build_adapter,
    options_for,
)
from residual_lightning.classifier_module import (
    ClassifierModule,
    checkpoint_class_path,
    class_path,
    default_optimizer,
    read_hparams,
)
from residual_lightning.contributions import (
    Contributions,
    UnitForm,
    UnitLayout,
    cast_maps,
    keep_shared_maps,
    layout_maps,
    shared_maps,
)
from residual_lightning.spectral import UnitBases
from residual_lightning.units import BackboneSpec, decompose_compact

log = logging.getLogger(__name__)

# "finetune" parses only for the deprecated `model.method: finetune`, which the CLI turns into a
# FinetuneModel (residual_lightning.finetune); ResidualModel itself refuses it.
Method = Literal["residual", "residual_star", "coarse", "linear", "spectral", "zeroshot", "finetune"]

#: The learning rate of ``lr=None`` per method: the authors' (method.md §3). Batch size (64) and
#: gradient clipping are data-module and trainer settings, set by the method YAMLs
#: (configs/methods/). zeroshot learns nothing; its entry only keeps ``lr`` a number.
METHOD_LRS: dict[str, float] = {
    "residual": 0.8,
    "residual_star": 0.8,
    "coarse": 0.8,
    "linear": 1e-3,
    "spectral": 1e-3,
    "zeroshot": 0.8,
}


def placeholder_bases(layers: int, heads: int, k: int, dim: int, head_components: int) -> UnitBases:
    """Deprecated: `UnitBases.zeros(layout)`."""
    import warnings

    warnings.warn(
        "model.placeholder_bases is deprecated and will be removed in the next release: use UnitBases.zeros",
        DeprecationWarning,
        stacklevel=2,
    )
    return UnitBases.zeros(UnitLayout(layers, heads, head_components, dim, "default"), k=k)


class ResidualModel(ClassifierModule):
    """Aligns a frozen CLIP ViT to a classifier with a small adapter on its residual units.

    Args:
        method: ``residual``, ``residual_star``, ``coarse``, ``linear``, ``spectral`` or
            ``zeroshot``. (``finetune`` is deprecated: the whole vision tower on images is
            ``--model FinetuneModel``.)
        adapter: the options of the method's adapter, its class chosen by ``class_path``
            (`residual_lightning.adapters.ResidualOptions`, ``ResidualStarOptions``,
            ``CoarseOptions``, ...: ``--model.adapter.help ResidualOptions`` lists the fields);
            None: the method's defaults. Deprecated: a plain dict of options (``{init: ones}``).
        lr: learning rate (None: the method's, `METHOD_LRS`: 0.8 for residual, residual_star and
            coarse, 1e-3 for linear and spectral, as the authors), or ``"auto"`` to run Lightning's
            LR finder before fitting. The resolved number is what the optimizer gets and what the
            checkpoint's ``hparams.lr`` records.
        optimizer: optimizer factory (default: schedule-free AdamW, weight decay 0). Its lr is
            replaced by `lr`.
        logit_mode: ``scaled_cosine`` (normalised embedding times the model's logit scale) or
            ``raw`` (the paper-era code: un-normalised embedding, no scale).
        classifier: ``text`` (zero-shot text classifier), ``prototypes`` (class means of the train
            embeddings, as the authors do for backbones without a text tower) or ``auto`` (text
            when the backbone has a text tower, prototypes otherwise: timm, DINOv2, ViT).
        prototypes: the class-mean classifier of backbones without a text tower: ``normalized``
            (normalised means of normalised embeddings, logit scale 100: this framework) or ``raw``
            (the raw class means, logit scale 1: the authors' paper-era code).
        threshold_fallback: the adapters' ``threshold_fallback`` when they leave it unset: what an
            explained-variance threshold keeps in a unit that never exceeds it, ``all`` its
            components (this framework) or ``one`` (the authors' code, K = 1).
        spectral_basis: the spectral adapter's ``basis`` when it leaves it unset: ``output_pca``
            (the paper's text, this framework) or ``standard`` (the authors' code).
            These three are model-level so that one recipe file (configs/recipes/paper.yaml) sets
            them for every method: an option set on the adapter itself wins.
        backbone: the frozen backbone (linked from the data module by the CLI).
        class_names: class names (linked from the data module).
        shape: ``(L, H, k, D)`` of the cached units (linked from the data module).
        convention: decomposition convention of the caches (linked from the data module).
        unit_form: what `shape` leaves out (`UnitLayout.form`, linked from the data module): the
            pooler units and full-form heads of MAP readouts, whose head maps are the identity,
            held as a view and never stored (None: a compact layout, head maps a buffer).
    """

    default_lr: ClassVar[float] = 0.8  # residual's; `METHOD_LRS` holds every method's

    def __init__(
        self,
        method: Method = "residual",
        adapter: AdapterOptions | LegacyAdapterOptions | None = None,
        lr: PositiveFloat | Literal["auto"] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        logit_mode: Literal["scaled_cosine", "raw"] = "scaled_cosine",
        classifier: Literal["auto", "text", "prototypes"] = "auto",
        prototypes: Literal["normalized", "raw"] = "normalized",
        threshold_fallback: Literal["all", "one"] = "all",
        spectral_basis: Literal["output_pca", "standard"] = "output_pca",
        backbone: BackboneSpec | dict | None = None,
        class_names: list[str] | None = None,
        shape: tuple[int, int, int, int] | None = None,
        convention: Literal["default", "equal_share"] = "default",
        unit_form: UnitForm | None = None,
    ) -> None:
        if method == "finetune":
            raise ValueError(
                "method 'finetune' is no longer a ResidualModel: build "
                "residual_lightning.finetune.FinetuneModel (CLI: --model FinetuneModel); load a finetune "
                "checkpoint with ResidualCLIP.from_checkpoint or FinetuneModel.load_from_checkpoint"
            )
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        if lr is None:  # resolved here: the base class only knows one default per class
            lr = METHOD_LRS.get(method, self.default_lr)
        super().__init__(lr, optimizer, logit_mode, backbone, class_names, shape, convention, unit_form)
        options = options_for(method, adapter).with_model_defaults(
            threshold_fallback=threshold_fallback, basis=spectral_basis
        )
        self._save_hparams()
        # Plain values too: the options' class_path and fields (`AdapterOptions.to_hparams`).
        self.hparams["adapter"] = options.to_hparams()
        self.method, self.options = method, options
        self.adapter_options = asdict(options)  # every option, as a dict
        self.classifier_kind, self.prototype_mode = classifier, prototypes
        self.layout = UnitLayout.from_shape(shape, convention, self.unit_form)
        # (L, H, D, k); the full form's identity is a view, kept out of the state_dict
        self.register_buffer("head_maps", layout_maps(self.layout), persistent=self.layout.compact)
        self.adapter: Adapter | None = None

    _apply = keep_shared_maps(ClassifierModule._apply)  # .to()/.cuda() keep the identity a view

    # ------------------------------------------------------------------ construction

    def _build_adapter(self, bases: UnitBases | None) -> None:
        if bases is None:
            bases = UnitBases.zeros(self.layout)
        self.adapter = build_adapter(self.options, bases, self.head_maps).to(self.device)

    def setup(self, stage: str) -> None:
        """Fill the frozen tensors from the data module and build the adapter (unless restored)."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if bool(self.ready) or dm is None or stage == "predict":  # predict: the checkpoint fills them
            if self.adapter is None:
                self._build_adapter(None)
            return
        if self.layout.compact:
            self.head_maps.copy_(dm.head_maps)
        elif not shared_maps(dm.head_maps):
            raise ValueError("the data module's head maps are not the full form's identity of this layout")
        kind = self.classifier_kind
        if kind == "auto":
            kind = "text" if self.backbone_spec.has_text else "prototypes"
        elif kind == "text" and not self.backbone_spec.has_text:
            raise ValueError(
                f"classifier: text needs a text tower, and the {self.backbone_spec.library} backbone "
                f"{self.backbone_spec.model_name!r} has none: use --model.classifier prototypes (or auto)"
            )
        bias = None
        if kind == "text":
            weights, scale = dm.classifier()
            bias = dm.classifier_bias() if hasattr(dm, "classifier_bias") else None
        else:
            raw = self.prototype_mode == "raw"
            weights, scale = self._prototypes(dm, normalize=not raw), 1.0 if raw else 100.0
        self.classifier.copy_(weights)
        self.logit_scale.fill_(scale)
        self.logit_bias.fill_(float("nan") if bias is None else bias)
        bases = dm.bases() if self.options.needs_bases else None
        self._build_adapter(bases)
        self.ready.fill_(True)
        log.info("%s: %d learned parameters", self.method, self.num_learned())

    def _prototypes(self, dm, normalize: bool = True) -> Tensor:
        from residual_lightning.classifier import prototypes

        embs, labels = [], []
        for batch in dm.caches["train"].iter_batches():
            embs.append(batch.embedding(cast_maps(self.head_maps, "cpu")))
            labels.append(batch.label)
        return prototypes(torch.cat(embs), torch.cat(labels), len(self.class_names), normalize)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another format, class, backbone, method or shape; build its adapter."""
        super().on_load_checkpoint(checkpoint)
        if self.adapter is None:
            self._build_adapter(None)

    def num_learned(self) -> int:
        """Learned scalars of the adapter."""
        return self.adapter.num_learned() if self.adapter is not None else 0

    def learned_scales(self) -> list[Tensor]:
        """The adapter's parameters (its λ), watched by the divergence check."""
        return list(self.adapter.parameters()) if self.adapter is not None else []

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Contributions) -> Tensor:
        """(N, C) logits of a cached batch."""
        return self.logits_from_embedding(self.adapter(batch))

    def batch_logits(self, batch: Contributions, zeroshot: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """Logits of the adapter and, when asked, of zero-shot on a cached batch."""
        batch = batch.float()
        zs_logits = None
        if zeroshot:  # zero-shot of the same split; not recomputed in the training hot loop
            with torch.no_grad():
                zs_logits = self.logits_from_embedding(batch.embedding(self.head_maps))
        return self(batch), zs_logits, batch.label

    def encode_image(self, images: Tensor) -> Tensor:
        """(N, D) aligned embeddings of preprocessed images: the frozen backbone's units, adapted."""
        with torch.no_grad():
            compact = decompose_compact(self.backbone(), images.to(self.device), self.hparams.convention)
        return self.adapter(compact)


class ResidualCLIP(nn.Module):
    """Inference without Lightning: backbone + adapter + classifier from a checkpoint.

    A checkpoint of the full-tower baseline (`FinetuneModel`, or ``method: finetune`` of earlier
    releases) rebuilds that model instead: `encode_image` and `predict` then run its tower.

    Example:
        >>> clip = ResidualCLIP.from_checkpoint("runs/.../best.ckpt")  # doctest: +SKIP
        >>> probs = clip.predict(images)                                 # doctest: +SKIP
    """

    def __init__(self, model: ClassifierModule) -> None:
        super().__init__()
        self.model = model.eval()

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> ResidualCLIP:
        """Rebuild from a checkpoint written by `residual-lightning fit` (weights-only load).

        Raises:
            CacheError: the file is empty, truncated or not a checkpoint (the message names it).
        """
        from residual_lightning.checkpoints import check_checkpoint
        from residual_lightning.finetune import FinetuneModel

        check_checkpoint(path)
        written_by = checkpoint_class_path(read_hparams(path))
        model_class = {class_path(c): c for c in (ResidualModel, FinetuneModel)}.get(written_by)
        if model_class is None:
            raise ValueError(
                f"checkpoint {path} was written by {written_by}: load it with that class's load_from_checkpoint"
            )
        model = model_class.load_from_checkpoint(path, map_location=map_location, weights_only=True)
        return cls(model)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """(N, D) aligned image embeddings (not normalised)."""
        return self.model.encode_image(images)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(N, C) class probabilities (softmax; SigLIP towers: per-class sigmoid(logit + bias))."""
        return self.model.probabilities(self.model.logits_from_images(images))

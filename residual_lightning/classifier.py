"""Zero-shot text classifier (class names x templates) and class-mean prototypes.

Per class, every template is filled with the class name and encoded by the text tower; the
embeddings are L2-normalised, averaged and normalised again (CLIP's recipe). Classifiers are
cached on disk (safetensors, written atomically with a checksum), keyed by backbone weights, class
names and templates, and verified whenever they are read back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from residual_lightning.files import OnMismatch, load_or_build, load_tensors, save_tensors


@torch.inference_mode()
def text_classifier(
    model: torch.nn.Module,
    tokenizer,
    class_names: list[str],
    templates: list[str],
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """(C, D) normalised mean text embedding per class.

    Args:
        model: an open_clip CLIP with a text tower.
        tokenizer: its tokenizer.
        class_names: C names.
        templates: prompt templates with one ``{}``.
        batch_size: prompts per forward pass.
        progress: show a progress bar over classes.
    """
    if not class_names or not templates:
        raise ValueError("a text classifier needs at least one class name and one template")
    device = next(model.parameters()).device
    prompts = [t.format(c) for c in class_names for t in templates]
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="text classifier", disable=not progress):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    emb = torch.cat(out).reshape(len(class_names), len(templates), -1)  # (C, T, D)
    return F.normalize(emb.mean(1), dim=-1)  # (C, D)


def prototypes(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, D) normalised class means of normalised embeddings (for backbones without text).

    Raises:
        ValueError: if a class has no sample (its prototype would be undefined).
    """
    emb = F.normalize(embeddings.float(), dim=-1)
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype).index_add_(0, labels.long(), emb)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing[:10]} have no training sample; cannot build prototypes")
    return F.normalize(sums / counts[:, None], dim=-1)


def classifier_key(weights_id: str, model_name: str, class_names: list[str], templates: list[str]) -> str:
    """Digest identifying a text classifier."""
    blob = json.dumps([model_name, weights_id, class_names, templates]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def classifier_path(cache_dir: str | Path, backbone, class_names: list[str], templates: list[str]) -> Path:
    """Where the text classifier of a backbone (or its spec), class names and templates is cached."""
    digest = classifier_key(backbone.weights_id, backbone.model_name, class_names, templates)
    return Path(cache_dir) / f"classifier-{digest}.safetensors"


def load_or_build_classifier(
    backbone,
    class_names: list[str],
    templates: list[str],
    cache_dir: str | Path,
    on_mismatch: OnMismatch = "error",
) -> tuple[Tensor, float]:
    """The cached text classifier of a backbone, built on first use, verified on every read.

    Args:
        backbone: a `residual_lightning.units.Backbone`, or its `BackboneSpec` (then the backbone is
            loaded only when the classifier is not cached).
        class_names: C names.
        templates: prompt templates.
        cache_dir: where classifier files live.
        on_mismatch: a cached file failing its checks (truncated, altered, another key or format)
            raises (``error``) or is rebuilt with a warning (``rebuild``).

    Returns:
        ``(weights (C, D), logit_scale)`` where logit_scale is ``model.logit_scale.exp()``.
    """
    key = {
        "model_name": backbone.model_name,
        "weights_id": backbone.weights_id,
        "class_names": list(class_names),
        "templates": list(templates),
    }

    def load(path: Path) -> tuple[Tensor, float]:
        tensors, _ = load_tensors(path, "classifier", key)
        return tensors["weights"], float(tensors["logit_scale"])

    def build(path: Path) -> tuple[Tensor, float]:
        bb = backbone if hasattr(backbone, "model") else backbone.load()
        weights = text_classifier(bb.model, bb.tokenizer, class_names, templates, progress=True).cpu()
        scale = getattr(bb.model, "logit_scale", None)
        logit_scale = float(scale.exp()) if scale is not None else 100.0
        save_tensors(path, {"weights": weights, "logit_scale": torch.tensor(logit_scale)}, "classifier", key)
        return weights, logit_scale

    return load_or_build(
        classifier_path(cache_dir, backbone, class_names, templates), load, build, on_mismatch
    )

"""Zero-shot text classifier (class names x templates) and class-mean prototypes.

Per class, every template is filled with the class name and encoded by the text tower; the
embeddings are L2-normalised, averaged and normalised again (CLIP's recipe). Classifiers are
cached on disk (safetensors, written atomically with a checksum), keyed by backbone weights, class
names and templates, verified whenever they are read back, and built under a build lock
(`residual_lightning.locks`) so that two jobs or nodes never build one at once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from residual_lightning.files import CacheError, OnMismatch, load_or_build, load_tensors, save_tensors
from residual_lightning.locks import BuildLock


@torch.inference_mode()
def text_classifier(
    model: torch.nn.Module,
    tokenizer,
    class_names: list[str],
    templates: list[str],
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """(C, D) normalised mean text embedding per class, from an open_clip model and tokenizer.

    open_clip's own `open_clip.build_zero_shot_classifier` (which returns the transpose, (D, C),
    in the model's dtype), batched by classes so that a forward pass holds about `batch_size`
    prompts.

    Args:
        model: an open_clip CLIP with a text tower.
        tokenizer: its tokenizer.
        class_names: C names.
        templates: prompt templates with one ``{}``.
        batch_size: prompts per forward pass (rounded to whole classes, at least one).
        progress: show a progress bar over classes.
    """
    import open_clip  # imported here: open_clip takes seconds to import

    if not class_names or not templates:
        raise ValueError("a text classifier needs at least one class name and one template")
    weights = open_clip.build_zero_shot_classifier(
        model,
        tokenizer,
        list(class_names),
        list(templates),
        num_classes_per_batch=max(1, batch_size // len(templates)),
        device=next(model.parameters()).device,
        use_tqdm=progress,
    )
    return weights.T.float().contiguous()


@torch.inference_mode()
def backbone_text_classifier(
    backbone, class_names: list[str], templates: list[str], batch_size: int = 256, progress: bool = False
) -> Tensor:
    """(C, D) text classifier of a loaded `Backbone` of any library with a text tower.

    open_clip backbones go through `text_classifier` (open_clip's own builder); the others
    (Hugging Face) encode the prompts with `Backbone.text_features`.
    """
    if getattr(backbone, "library", "open_clip") == "open_clip" and backbone.tokenizer is not None:
        return text_classifier(
            backbone.model, backbone.tokenizer, class_names, templates, batch_size, progress
        )
    return _classifier(backbone.text_features, class_names, templates, batch_size, progress)


def _classifier(
    encode, class_names: list[str], templates: list[str], batch_size: int, progress: bool
) -> Tensor:
    if not class_names or not templates:
        raise ValueError("a text classifier needs at least one class name and one template")
    prompts = [t.format(c) for c in class_names for t in templates]
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="text classifier", disable=not progress):
        out.append(F.normalize(encode(prompts[start : start + batch_size]).float(), dim=-1))
    emb = torch.cat(out).reshape(len(class_names), len(templates), -1)  # (C, T, D)
    return F.normalize(emb.mean(1), dim=-1)  # (C, D)


def prototypes(embeddings: Tensor, labels: Tensor, num_classes: int, normalize: bool = True) -> Tensor:
    """(C, D) class means of the embeddings (for backbones without text).

    Args:
        embeddings: (N, D) train embeddings.
        labels: (N,) their classes.
        num_classes: C.
        normalize: normalised means of normalised embeddings (this framework's default), or
            False: the raw class means, as the authors' paper-era code (configs/recipes/paper.yaml).

    Raises:
        ValueError: if a class has no sample (its prototype would be undefined).
    """
    emb = F.normalize(embeddings.float(), dim=-1) if normalize else embeddings.float()
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype).index_add_(0, labels.long(), emb)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing[:10]} have no training sample; cannot build prototypes")
    means = sums / counts[:, None]  # (C, D)
    return F.normalize(means, dim=-1) if normalize else means


def classifier_key(
    weights_id: str, model_name: str, class_names: list[str], templates: list[str], library: str = "open_clip"
) -> str:
    """Digest identifying a text classifier (open_clip keys are those of earlier releases)."""
    parts = [model_name, weights_id, class_names, templates] + ([library] if library != "open_clip" else [])
    blob = json.dumps(parts).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def classifier_path(cache_dir: str | Path, backbone, class_names: list[str], templates: list[str]) -> Path:
    """Where the text classifier of a backbone (or its spec), class names and templates is cached."""
    library = getattr(backbone, "library", "open_clip")
    digest = classifier_key(backbone.weights_id, backbone.model_name, class_names, templates, library)
    return Path(cache_dir) / f"classifier-{digest}.safetensors"


def load_or_build_classifier(
    backbone,
    class_names: list[str],
    templates: list[str],
    cache_dir: str | Path,
    on_mismatch: OnMismatch = "error",
    with_bias: bool = False,
) -> tuple:
    """The cached text classifier of a backbone, built on first use, verified on every read.

    Args:
        backbone: a `residual_lightning.units.Backbone`, or its `BackboneSpec` (then the backbone is
            loaded only when the classifier is not cached).
        class_names: C names.
        templates: prompt templates.
        cache_dir: where classifier files live.
        on_mismatch: a cached file failing its checks (truncated, altered, another key or format)
            raises (``error``) or is rebuilt with a warning (``rebuild``).

        with_bias: also return the model's logit bias (SigLIP; None for softmax models).

    Returns:
        ``(weights (C, D), logit_scale)`` where logit_scale is the model's (``logit_scale.exp()``),
        and ``logit_bias`` last with `with_bias`.
    """
    key = {
        "model_name": backbone.model_name,
        "weights_id": backbone.weights_id,
        "class_names": list(class_names),
        "templates": list(templates),
    }
    if getattr(backbone, "library", "open_clip") != "open_clip":
        key["library"] = backbone.library

    def load(path: Path) -> tuple:
        tensors, _ = load_tensors(path, "classifier", key)
        bias = float(tensors["logit_bias"]) if "logit_bias" in tensors else None
        return tensors["weights"], float(tensors["logit_scale"]), bias

    def build(path: Path) -> tuple:
        bb = backbone if hasattr(backbone, "model") else backbone.load()
        weights = backbone_text_classifier(bb, class_names, templates, progress=True).cpu()
        logit_scale, logit_bias = bb.logit_scale_bias()
        tensors = {"weights": weights, "logit_scale": torch.tensor(logit_scale)}
        if logit_bias is not None:  # SigLIP: sigmoid(scale * cos + bias)
            tensors["logit_bias"] = torch.tensor(logit_bias)
        save_tensors(path, tensors, "classifier", key)
        return weights, logit_scale, logit_bias

    path = classifier_path(cache_dir, backbone, class_names, templates)
    try:  # the common case: the file is there and sound (no lock)
        weights, scale, bias = load(path)
    except CacheError:  # absent or failing a check: build it (or raise) under its build lock
        with BuildLock(path):
            weights, scale, bias = load_or_build(path, load, build, on_mismatch)
    return (weights, scale, bias) if with_bias else (weights, scale)

"""Description banks of TextSpan and SOMP: the descriptions, and their text embeddings.

The shipped bank (``resources/description_bank.txt``) holds about 850 generic image descriptions;
a user bank is a text file (one per line) or a YAML list. The dataset's class prompts can be
appended so its own classes compete with the generic descriptions.

Letters: M descriptions, D embedding size.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from residual_lightning.data.templates import read_list_file

__all__ = ["encode_bank", "load_bank", "prepare_bank"]


def load_bank(
    path: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    template: str = "a photo of a {}.",
) -> list[str]:
    """Descriptions of a TextSpan bank, deduplicated in order.

    Args:
        path: a file with one description per line (``#`` comments and blank lines skipped) or a
            YAML list (``.yaml``/``.yml``/``.json``); None reads the shipped
            ``resources/description_bank.txt`` (about 850 generic image descriptions).
        class_names: when given, one prompt per class is appended (``template.format(name)``),
            so the dataset's own classes can compete with the generic descriptions.
        template: the prompt of the appended class names, with one ``{}``.

    Returns:
        The descriptions.
    """
    if path is None:
        resource = importlib.resources.files("residual_lightning") / "resources" / "description_bank.txt"
        lines = [line.strip() for line in resource.read_text(encoding="utf-8").splitlines()]
        entries = [line for line in lines if line and not line.startswith("#")]
    else:
        entries = read_list_file(path, "Description bank")
    if class_names:
        entries += [template.format(name) for name in class_names]
    return list(dict.fromkeys(entries))


def encode_bank(
    backbone: Any,
    descriptions: Sequence[str],
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
) -> Tensor:
    """(M, D) L2-normalised text embeddings of the descriptions, cached on disk when asked.

    Args:
        backbone: a loaded `residual_lightning.units.Backbone`, or a `BackboneSpec` (loaded only
            when the embeddings are not cached).
        descriptions: the M descriptions (encoded as they are, no template).
        batch_size: descriptions per forward pass of the text tower.
        cache_dir: folder of the cached embeddings (a text-classifier file keyed by the backbone
            weights and the descriptions); None encodes every time.
    """
    from residual_lightning.classifier import backbone_text_classifier, load_or_build_classifier

    descriptions = list(descriptions)
    if not descriptions:
        raise ValueError("the description bank is empty")
    # A one-template "classifier" of the descriptions is exactly their normalised embeddings.
    if cache_dir is not None:  # cached (verified, atomic) like every text classifier
        return load_or_build_classifier(backbone, descriptions, ["{}"], cache_dir)[0].float()
    loaded = backbone if hasattr(backbone, "model") else backbone.load()
    emb = backbone_text_classifier(loaded, descriptions, ["{}"], batch_size=batch_size)
    return emb.cpu().float()


def prepare_bank(text_bank: Tensor | np.ndarray, center: bool) -> Tensor:
    """Float64 (M, D) bank: rows L2-normalised, then centred on their mean when asked.

    Args:
        text_bank: (M, D) text embeddings.
        center: subtract the mean of the normalised rows (TextSpan's default; not SOMP's).
    """
    bank = torch.as_tensor(text_bank).detach().double().cpu()
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"text_bank must be a non-empty (M, D) matrix, got shape {tuple(bank.shape)}")
    bank = F.normalize(bank, dim=-1)
    # Centring removes what every description shares ("a photo of ..."), which says nothing
    # about one unit in particular.
    return bank - bank.mean(0) if center and bank.shape[0] > 1 else bank

"""`text_classifier` is open_clip's own `build_zero_shot_classifier` (transposed to (C, D)), and gives
the classifier of the former hand-written recipe (encode every prompt, L2-normalise, average per
class, normalise again)."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from residual_lightning.classifier import backbone_text_classifier, text_classifier
from residual_lightning.units import load_backbone

NAMES = ["cat", "dog", "airplane", "aquarium fish", "lawn mower"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", 'a photo of the number: "{}".']


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("RL-Tiny-ViT-64")


def recipe(bb, names, templates):
    prompts = [t.format(c) for c in names for t in templates]
    emb = F.normalize(bb.model.encode_text(bb.tokenizer(prompts)).float(), dim=-1)
    return F.normalize(emb.reshape(len(names), len(templates), -1).mean(1), dim=-1)


@pytest.mark.parametrize("batch_size", [1, 4, 256])
def test_text_classifier_is_open_clips(backbone, batch_size):
    ours = text_classifier(backbone.model, backbone.tokenizer, NAMES, TEMPLATES, batch_size=batch_size)
    upstream = open_clip.build_zero_shot_classifier(backbone.model, backbone.tokenizer, NAMES, TEMPLATES)
    assert ours.shape == (len(NAMES), upstream.shape[0]) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, upstream.T.float())
    with torch.no_grad():
        torch.testing.assert_close(ours, recipe(backbone, NAMES, TEMPLATES), atol=1e-6, rtol=1e-5)


def test_backbone_text_classifier_uses_it_for_open_clip(backbone):
    torch.testing.assert_close(
        backbone_text_classifier(backbone, NAMES, TEMPLATES),
        text_classifier(backbone.model, backbone.tokenizer, NAMES, TEMPLATES),
    )


def test_empty_lists_raise(backbone):
    with pytest.raises(ValueError, match="at least one class name and one template"):
        text_classifier(backbone.model, backbone.tokenizer, [], TEMPLATES)

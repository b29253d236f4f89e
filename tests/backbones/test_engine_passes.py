"""`decompose_compact` in several forward passes (``per_pass``, the CPU default that bounds memory):
the same contributions as one pass, for class-token, average-pooled and MAP readouts."""

from __future__ import annotations

import pytest
import torch

from residual_lightning.backbones import decompose_compact, read_open_clip
from residual_lightning.backbones.dispatch import read_model
from residual_lightning.backbones.engine import CPU_TOKENS_PER_PASS, images_per_pass
from tests.backbones.engine_helpers import images
from tests.backbones.test_map_pool import model_for as map_model
from tests.backbones.test_open_clip_engine import model_for as clip_model

FIELDS = ("heads", "mlps", "emb")


def canonical_and_images(name: str, n: int = 5):
    """The canonical model of a config name (``map:`` prefix: a timm MAP ViT) and n images for it."""
    if name.startswith("map:"):
        model = map_model(name[4:])
        return read_model(model), images(n, model.patch_embed.img_size[0])
    model = clip_model(name)
    return read_open_clip(model), images(n, model.visual.image_size[0])


@pytest.mark.parametrize("name", ["tok", "avg_ln_per_token", "all_custom_options", "map:map_latent2_avg"])
@pytest.mark.parametrize("convention", ["default", "equal_share"])
def test_passes_give_the_one_pass_contributions(name, convention):
    canonical, x = canonical_and_images(name)
    with torch.no_grad():
        whole = decompose_compact(canonical, x, convention, per_pass=5)
        for per_pass in (1, 2):
            parts = decompose_compact(canonical, x, convention, per_pass=per_pass)
            for field in FIELDS:
                torch.testing.assert_close(getattr(parts, field), getattr(whole, field), rtol=1e-5, atol=1e-6)
            assert parts.extra.keys() == whole.extra.keys()
            for key, value in whole.extra.items():
                torch.testing.assert_close(parts.extra[key], value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(parts.head_maps, whole.head_maps)


def test_default_pass_size_and_bad_values():
    assert images_per_pass(torch.zeros(64, 197, 8)) == CPU_TOKENS_PER_PASS // 197 == 16  # ViT-B/16
    assert images_per_pass(torch.zeros(64, 50, 8)) == 63  # ViT-B/32: batch 32 in one pass
    assert images_per_pass(torch.zeros(3, 10_000, 8)) == 1  # at least one image
    with pytest.raises(ValueError, match="per_pass must be a positive number of images, got 0"):
        decompose_compact(*canonical_and_images("tok", 2), per_pass=0)

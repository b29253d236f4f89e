"""The architecture of the Hugging Face models the shipped configs name, for planning offline.

Planning a run (the unit layout the CLI links into the model, whether the backbone has a text
tower) needs a model's config, which lives on the hub. When the hub cannot be reached and the
model is not in the local Hugging Face cache, `hf_config` falls back to these: the published
architecture numbers of each model card's ``config.json`` (sizes only; weights always come from
the hub or a local directory). Unlisted text-tower sizes keep transformers' defaults: they do not
change the image side's layout.
"""

from __future__ import annotations

__all__ = ["KNOWN_CONFIGS", "TINY_HF"]

# Tiny random-weight architectures for offline tests and demos (``pretrained: null`` only).
TINY_HF: dict[str, dict] = {
    "RL-Tiny-HF-DINOv2": dict(
        model_type="dinov2",
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        patch_size=8,
        image_size=32,
    ),
}

_L16 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

KNOWN_CONFIGS: dict[str, dict] = {
    # The paper's DINOv2-L (class token after the final LayerNorm; prototypes classifier).
    "facebook/dinov2-large": dict(model_type="dinov2", **_L16, patch_size=14, image_size=518),
    # DINOv2-B with 4 register tokens.
    "facebook/dinov2-with-registers-base": dict(
        model_type="dinov2_with_registers",
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        patch_size=14,
        image_size=518,
        num_register_tokens=4,
    ),
    # The paper's supervised ViT-L (ImageNet-21k pre-training, ImageNet-1k fine-tuning).
    "google/vit-large-patch16-224": dict(model_type="vit", **_L16, patch_size=16, image_size=224),
    # The paper's BLIP-L (retrieval model fine-tuned on Flickr30k), 384 px input.
    "Salesforce/blip-itm-large-flickr": dict(
        model_type="blip",
        projection_dim=256,
        vision_config=dict(**_L16, patch_size=16, image_size=384),
    ),
    # SigLIP B/16 at 224 px (attention-pooled, sigmoid logits with a bias).
    "google/siglip-base-patch16-224": dict(
        model_type="siglip",
        vision_config=dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            patch_size=16,
            image_size=224,
        ),
        text_config=dict(vocab_size=32000, bos_token_id=None, eos_token_id=1, pad_token_id=1),
    ),
}

"""Tiny random-weight transformers models and tokenizers, built offline (a test helper, not a test).

Families (`FAMILIES`): ``clip`` (``CLIPModel``), ``blip`` (``BlipForImageTextRetrieval``),
``dinov2`` (``Dinov2Model``), ``dinov2_swiglu`` (``Dinov2Model`` with ``use_swiglu_ffn``),
``dinov2_registers`` (``Dinov2WithRegistersModel``), ``vit`` (``ViTModel``), ``siglip``
(``SiglipModel``). Every model has width 64, 2 layers, 4 heads, 32x32 images in 8x8 patches;
every bias, norm affine, layer scale, class/register/position token and pooling probe is
randomised (transformers initialises them to 0, 1 or constants, which would hide a misplaced
constant), and the weight matrices are drawn with std ``fan_in ** -0.5`` (not 0.02) so that the
attention is far from uniform.

Tokenizers: CLIP a ``CLIPTokenizer`` (tokenizers-backed BPE over letters), BLIP a
``BertTokenizer`` from a small ``vocab.txt``, SigLIP a ``SiglipTokenizer`` from a sentencepiece
model trained here on a few sentences. `save_tiny` writes model, tokenizer and image processor so
that ``AutoModel``/``AutoTokenizer``/``AutoImageProcessor.from_pretrained(directory)`` load them
back offline.
"""

from __future__ import annotations

import io
import os
import string
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

FAMILIES = ("clip", "blip", "dinov2", "dinov2_swiglu", "dinov2_registers", "vit", "siglip")
TEXT_FAMILIES = ("clip", "blip", "siglip")

WIDTH, LAYERS, HEADS, IMAGE, PATCH = 64, 2, 4, 32, 8
TEXT_LENGTH = 32  # CLIP/SigLIP text context (SigLIP pads to it)

_VISION = dict(
    hidden_size=WIDTH,
    intermediate_size=2 * WIDTH,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    image_size=IMAGE,
    patch_size=PATCH,
)
_TEXT = dict(
    hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS
)

_SENTENCES = [
    "a photo of a cat",
    "a photo of a dog",
    "a blurry photo of the bird",
    "an image of two small fish",
    "this is a picture of a red car",
    "the plane flies over the house",
]


# --- randomisation --------------------------------------------------------------------------------


def randomise_hf_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise every parameter in place, constants included (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("logit_scale", "logit_bias"):
                continue  # keep the model's scale/bias values
            if p.ndim >= 2:
                std = p[0].numel() ** -0.5
                if leaf in (
                    "cls_token",
                    "register_tokens",
                    "probe",
                    "position_embeddings",
                    "class_embedding",
                ):
                    std = 0.5
                p.copy_(std * torch.randn(p.shape, generator=g))
            elif leaf == "lambda1":  # DINOv2 LayerScale
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif leaf == "weight":  # LayerNorm gammas
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:  # biases (bias, in_proj_bias), CLIP's 1-D class_embedding
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


# --- tokenizers -----------------------------------------------------------------------------------


def clip_tokenizer():
    """A ``CLIPTokenizer`` over letters with a few merges; ``<|endoftext|>`` has the highest id."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("t", "h</w>"), ("a", "t</w>"), ("o", "f</w>"), ("p", "h"), ("a", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LENGTH)


def blip_tokenizer():
    """A ``BertTokenizer`` (tokenizers-backed) from a small ``vocab.txt`` written to a temp dir."""
    from transformers import BertTokenizer

    words = sorted({w for s in _SENTENCES for w in s.split()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *string.ascii_lowercase]
    tokens += [f"##{c}" for c in string.ascii_lowercase]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(tokens) + "\n")
        return BertTokenizer(vocab=str(path), model_max_length=35)


def siglip_tokenizer():
    """A ``SiglipTokenizer`` from a sentencepiece unigram model trained offline (vocab 64)."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 4),
        model_writer=buffer,
        vocab_size=64,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spiece.model"
        path.write_bytes(buffer.getvalue())
        return SiglipTokenizer(vocab_file=str(path), model_max_length=TEXT_LENGTH)


def tiny_tokenizer(family: str):
    """The tokenizer of a text family (``clip``, ``blip``, ``siglip``)."""
    makers = {"clip": clip_tokenizer, "blip": blip_tokenizer, "siglip": siglip_tokenizer}
    if family not in makers:
        raise ValueError(f"{family!r} has no text tower; text families: {', '.join(makers)}")
    return makers[family]()


# --- models ---------------------------------------------------------------------------------------


def _config(family: str, tokenizer=None):
    import transformers as tf

    if family == "clip":
        text = dict(
            _TEXT,
            vocab_size=len(tokenizer),
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return tf.CLIPConfig(vision_config=dict(_VISION), text_config=text, projection_dim=32)
    if family == "blip":
        text = dict(
            _TEXT,
            vocab_size=len(tokenizer),
            max_position_embeddings=64,
            encoder_hidden_size=WIDTH,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
        )
        return tf.BlipConfig(
            vision_config=dict(_VISION), text_config=text, image_text_hidden_size=32, projection_dim=32
        )
    if family == "siglip":
        text = dict(
            _TEXT,
            vocab_size=len(tokenizer),
            max_position_embeddings=TEXT_LENGTH,
            projection_size=WIDTH,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        return tf.SiglipConfig(vision_config=dict(_VISION), text_config=text)
    dino = {k: v for k, v in _VISION.items() if k != "intermediate_size"}
    if family == "dinov2":
        return tf.Dinov2Config(**dino, mlp_ratio=2, layerscale_value=0.5)
    if family == "dinov2_swiglu":
        return tf.Dinov2Config(**dino, mlp_ratio=2, layerscale_value=0.5, use_swiglu_ffn=True)
    if family == "dinov2_registers":
        return tf.Dinov2WithRegistersConfig(**dino, mlp_ratio=2, layerscale_value=0.5, num_register_tokens=4)
    if family == "vit":
        return tf.ViTConfig(**_VISION)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


_CLASSES = {
    "clip": "CLIPModel",
    "blip": "BlipForImageTextRetrieval",
    "dinov2": "Dinov2Model",
    "dinov2_swiglu": "Dinov2Model",
    "dinov2_registers": "Dinov2WithRegistersModel",
    "vit": "ViTModel",
    "siglip": "SiglipModel",
}


def tiny_model(
    family: str, seed: int = 0, attn_implementation: str | None = None, tokenizer=None
) -> nn.Module:
    """A tiny randomised model of `family` in eval mode (float32, CPU).

    Args:
        family: one of `FAMILIES`.
        seed: the randomisation seed.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (the config's attention implementation), or
            None for the class's default (BLIP supports only ``"eager"``).
        tokenizer: the text family's tokenizer (vocabulary size and special ids); built if None.
    """
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if family in TEXT_FAMILIES and tokenizer is None:
        tokenizer = tiny_tokenizer(family)
    torch.manual_seed(seed)
    config = _config(family, tokenizer)
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = getattr(tf, _CLASSES[family])._from_config(config, **options)
    return randomise_hf_(model, seed).eval()


def tiny_image_processor(family: str):
    """The family's image processor, resizing/cropping to 32x32."""
    import transformers as tf

    square = {"height": IMAGE, "width": IMAGE}
    if family == "clip":
        return tf.CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size=square)
    if family == "blip":
        return tf.BlipImageProcessor(size=square)
    if family.startswith("dinov2"):
        return tf.BitImageProcessor(size={"shortest_edge": IMAGE}, crop_size=square, do_center_crop=True)
    if family == "vit":
        return tf.ViTImageProcessor(size=square)
    if family == "siglip":
        return tf.SiglipImageProcessor(size=square)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def save_tiny(family: str, directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random `family` model, its tokenizer and its image processor to `directory`.

    ``AutoModel.from_pretrained(directory)`` loads the model back (``BlipForImageTextRetrieval``
    is not an ``AutoModel`` class: load it with ``BlipForImageTextRetrieval.from_pretrained``),
    ``AutoTokenizer.from_pretrained(directory)`` the tokenizer (text families ``clip``, ``blip``,
    ``siglip`` only; ``dinov2*`` and ``vit`` get none) and ``AutoImageProcessor.from_pretrained``
    the image processor; all offline.

    Args:
        family: one of `FAMILIES`.
        directory: created if missing.
        seed: the randomisation seed (the same seed gives the same weights as `tiny_model`).

    Returns:
        The directory as a `Path`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(family) if family in TEXT_FAMILIES else None
    model = tiny_model(family, seed=seed, tokenizer=tokenizer)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    tiny_image_processor(family).save_pretrained(directory)
    return directory

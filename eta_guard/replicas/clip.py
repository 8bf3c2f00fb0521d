"""A tiny replica of ``openai/clip-vit-large-patch14-336`` (ETA's pre-generation evaluator).

Same ``CLIPModel`` class, 336x336 input in 14-pixel patches (577 vision positions), 77 text
positions, quick-GELU, a shared projection space; a ``CLIPTokenizer`` (lower-cased byte-level BPE
with ``</w>`` word ends, ``<|startoftext|>`` / ``<|endoftext|>`` around every text, padding with
``<|endoftext|>``, 77 tokens at most); ``CLIPImageProcessor`` resizing the shortest edge to 336
(bicubic) and centre-cropping 336x336 with CLIP's mean and std. Widths are small and the
vocabulary has about a thousand pieces instead of 49408. Sources: docs/replicas.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eta_guard.replicas._common import CLIP_MEAN, CLIP_STD
from eta_guard.replicas._tokenizers import trained_vocab

REAL: dict[str, Any] = {"image_size": 336, "patch_size": 14, "text_positions": 77}
TINY: dict[str, Any] = {
    "vision": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2},
    "text": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2},
    "projection": 32,
}


def build_clip_replica(path: str | Path, *, seed: int = 0) -> None:
    """Write a random CLIP ViT-L/14-336 replica to ``path`` (``save_pretrained`` layout)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    v, t = TINY["vision"], TINY["text"]
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": t["hidden"],
            "intermediate_size": t["intermediate"],
            "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"],
            "max_position_embeddings": REAL["text_positions"],
            "hidden_act": "quick_gelu",
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": v["hidden"],
            "intermediate_size": v["intermediate"],
            "num_hidden_layers": v["layers"],
            "num_attention_heads": v["heads"],
            "image_size": REAL["image_size"],
            "patch_size": REAL["patch_size"],
            "hidden_act": "quick_gelu",
        },
        projection_dim=TINY["projection"],
        logit_scale_init_value=2.6592,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": REAL["image_size"]},
        crop_size={"height": REAL["image_size"], "width": REAL["image_size"]},
        resample=3,
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def clip_tokenizer() -> Any:
    """A ``CLIPTokenizer`` with a small trained vocabulary (``</w>`` word ends, lower case)."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges = trained_vocab(
        CLIPTokenizer,
        vocab_size=1000,
        special_tokens=specials,
        end_of_word_suffix="</w>",
    )
    from tokenizers import pre_tokenizers

    # As in CLIP's vocabulary, every byte exists alone and as a word end ('/' and '/</w>').
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for piece in (char, char + "</w>"):
            vocab.setdefault(piece, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = REAL["text_positions"]
    return tokenizer

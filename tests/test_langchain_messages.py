"""Table tests of the LangChain <-> engine message converters (pure functions)."""

from __future__ import annotations

import pytest
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompt_values import ChatPromptValue
from langchain_eta._messages import (
    as_messages,
    block_to_part,
    image_block_to_part,
    image_sources,
    merge_consecutive,
    message_to_dict,
    replace_images,
    to_engine_messages,
)

from eta_guard.errors import InvalidInputError

B64 = "iVBORw0KGgo="
DATA_URL = f"data:image/png;base64,{B64}"

IMAGE_FORMATS = [
    pytest.param(
        {"type": "image", "base64": B64, "mime_type": "image/png"}, DATA_URL, id="v1-base64"
    ),
    pytest.param({"type": "image", "base64": B64}, B64, id="v1-base64-no-mime"),
    pytest.param({"type": "image", "url": DATA_URL}, DATA_URL, id="v1-data-url"),
    pytest.param(
        {"type": "image", "url": "https://x.org/a.png"}, "https://x.org/a.png", id="v1-remote-url"
    ),
    pytest.param(
        {"type": "image_url", "image_url": {"url": DATA_URL}}, DATA_URL, id="openai-image_url"
    ),
    pytest.param({"type": "image_url", "image_url": DATA_URL}, DATA_URL, id="openai-image_url-str"),
    pytest.param(
        {"type": "image", "source_type": "base64", "data": B64, "mime_type": "image/png"},
        DATA_URL,
        id="v0-base64",
    ),
    pytest.param({"type": "image", "source_type": "url", "url": DATA_URL}, DATA_URL, id="v0-url"),
    pytest.param(
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
        DATA_URL,
        id="anthropic-source",
    ),
]


@pytest.mark.parametrize(("block", "expected"), IMAGE_FORMATS)
def test_every_image_format_becomes_one_engine_image_part(block, expected):
    message = HumanMessage(content=[{"type": "text", "text": "What is this?"}, block])
    assert message_to_dict(message) == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "image": expected},
        ],
    }


@pytest.mark.parametrize(
    ("message", "role"),
    [
        (HumanMessage("hi"), "user"),
        (AIMessage("hi"), "assistant"),
        (SystemMessage("hi"), "system"),
        (ChatMessage(role="user", content="hi"), "user"),
        (ChatMessage(role="assistant", content="hi"), "assistant"),
        (ChatMessage(role="developer", content="hi"), "system"),
    ],
)
def test_roles(message, role):
    assert message_to_dict(message) == {"role": role, "content": [{"type": "text", "text": "hi"}]}


def test_tool_turns_convert_with_their_calls_and_ids():
    call = {"name": "lookup", "args": {"q": "x"}, "id": "c1"}
    image = {"type": "image", "base64": B64, "mime_type": "image/png"}
    converted = to_engine_messages(
        [
            HumanMessage("hi"),
            AIMessage("", tool_calls=[call]),
            ToolMessage("42", tool_call_id="c1"),
            ToolMessage(content=[image], tool_call_id="c2"),
        ]
    )
    expected_call = {
        "type": "function",
        "function": {"name": "lookup", "arguments": {"q": "x"}},
        "id": "c1",
    }
    assert converted[1] == {"role": "assistant", "content": [], "tool_calls": [expected_call]}
    # two tool results stay two turns; an image a tool returns is kept (and pre-checked)
    assert converted[2] == {
        "role": "tool",
        "content": [{"type": "text", "text": "42"}],
        "tool_call_id": "c1",
    }
    assert converted[3]["role"] == "tool" and converted[3]["content"][0]["type"] == "image"


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (ChatMessage(role="critic", content="x"), "'critic'"),
        (HumanMessage(content=[{"type": "image", "file_id": "f-1"}]), "file_id='f-1'"),
        (
            HumanMessage(content=[{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}]),
            "'audio'",
        ),
        (
            SystemMessage(content=[{"type": "image", "base64": B64}]),
            "'image' is not supported in a system",
        ),
    ],
)
def test_unsupported_input_is_refused_with_a_clear_error(message, match):
    with pytest.raises(InvalidInputError, match=match):
        message_to_dict(message)


def test_ai_reasoning_and_tool_call_blocks_carry_no_text():
    ai = AIMessage(
        content=[{"type": "reasoning", "reasoning": "hmm"}, {"type": "text", "text": "Yes."}],
        tool_calls=[{"name": "f", "args": {}, "id": "1"}],
    )
    assert message_to_dict(ai) == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Yes."}],
        # the calls travel as tool_calls, not as text
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}, "id": "1"}],
    }
    assert (
        block_to_part({"type": "tool_call", "name": "f", "args": {}, "id": "1"}, role="assistant")
        is None
    )


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], []),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
        ),
        (
            [
                {"role": "system", "content": [{"type": "text", "text": "s1"}]},
                {"role": "system", "content": [{"type": "text", "text": "s2"}]},
                {"role": "user", "content": [{"type": "text", "text": "a"}]},
                {
                    "role": "user",
                    "content": [{"type": "image", "image": "I"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "c"}]},
                {"role": "user", "content": [{"type": "text", "text": "d"}]},
            ],
            [
                {"role": "system", "content": [{"type": "text", "text": "s1\n\ns2"}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image", "image": "I"},
                        {"type": "text", "text": "b"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "c"}]},
                {"role": "user", "content": [{"type": "text", "text": "d"}]},
            ],
        ),
    ],
)
def test_merge_consecutive(messages, expected):
    before = [dict(m, content=list(m["content"])) for m in messages]
    assert merge_consecutive(messages) == expected
    assert messages == before  # input not mutated


def test_to_engine_messages_merges_the_standard_double_conversation():
    messages = [
        SystemMessage("hello"),
        SystemMessage("hello"),
        HumanMessage("hello"),
        HumanMessage("hello"),
        AIMessage("hello"),
        AIMessage("hello"),
        HumanMessage("how are you"),
    ]
    assert [(m["role"], m["content"][0]["text"]) for m in to_engine_messages(messages)] == [
        ("system", "hello\n\nhello"),
        ("user", "hello\n\nhello"),
        ("assistant", "hello\n\nhello"),
        ("user", "how are you"),
    ]


def test_empty_ai_turn_is_dropped():
    messages = [HumanMessage("a"), AIMessage(content=""), HumanMessage("b")]
    assert to_engine_messages(messages) == [
        {"role": "user", "content": [{"type": "text", "text": "a\n\nb"}]}
    ]


@pytest.mark.parametrize(
    ("value", "n"),
    [
        ("hello", 1),
        (HumanMessage("hi"), 1),
        ([("system", "s"), ("human", "h")], 2),
        ([{"role": "user", "content": "x"}], 1),
        (ChatPromptValue(messages=[SystemMessage("s"), HumanMessage("h")]), 2),
    ],
)
def test_as_messages(value, n):
    assert len(as_messages(value)) == n


def test_as_messages_refuses_other_types():
    with pytest.raises(InvalidInputError, match="got int"):
        as_messages(3)


def test_image_sources_and_replace_images():
    messages = [
        SystemMessage("s"),
        HumanMessage(
            content=[
                {"type": "text", "text": "a"},
                {"type": "image", "base64": B64, "mime_type": "image/png"},
            ]
        ),
        AIMessage("ok"),
        HumanMessage(
            content=[
                {"type": "image_url", "image_url": {"url": DATA_URL}},
                {"type": "text", "text": "b"},
            ]
        ),
    ]
    found = image_sources(messages)
    assert found == [(1, 1, DATA_URL), (3, 0, DATA_URL)]
    out = replace_images(messages, {(3, 0)}, "[removed]")
    assert out[1] is messages[1]  # untouched messages are passed on as they are
    assert [b["type"] for b in out[3].content_blocks] == ["text", "text"]
    assert out[3].content_blocks[0]["text"] == "[removed]"
    assert messages[3].content[0]["type"] == "image_url"  # input not mutated


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("/tmp/cat.png", True),
        ("cat.png", True),
        ("file:///tmp/cat.png", True),
        ("FILE:///tmp/cat.png", True),
        (DATA_URL, False),
        ("https://x.org/a.png", False),
        ("HTTP://x.org/a.png", False),
    ],
)
def test_local_image_urls_need_permission(url, local):
    block = {"type": "image", "url": url}
    if local:
        with pytest.raises(InvalidInputError, match="allow_local_image_files=True"):
            image_block_to_part(block)
        with pytest.raises(InvalidInputError, match="local image files"):
            image_sources(
                [HumanMessage(content=[{"type": "image_url", "image_url": {"url": url}}])]
            )
    else:
        assert image_block_to_part(block) == {"type": "image", "image": url}
    assert image_block_to_part(block, allow_local_files=True) == {"type": "image", "image": url}


PROVIDER_IMAGE_BLOCKS = [
    pytest.param({"type": "input_image", "image_url": DATA_URL}, id="openai-responses-input_image"),
    pytest.param({"type": "file", "base64": B64, "mime_type": "image/png"}, id="v1-file-image"),
    pytest.param({"type": "media", "mime_type": "image/png", "data": B64}, id="google-media"),
]


@pytest.mark.parametrize("block", PROVIDER_IMAGE_BLOCKS)
def test_other_image_blocks_are_images_not_unchecked_blocks(block):
    """Image blocks that other chat models accept must reach CLIP, never pass a guard unseen."""
    message = HumanMessage(content=[{"type": "text", "text": "hi"}, block])
    assert image_sources([message]) == [(0, 1, DATA_URL)]
    assert message_to_dict(message)["content"][1] == {"type": "image", "image": DATA_URL}
    out = replace_images([message], {(0, 1)}, "[removed]")
    assert [b["type"] for b in out[0].content_blocks] == ["text", "text"]


def test_images_in_system_and_ai_messages_are_found_too():
    """A guard around any chat model checks every image that model could see."""
    image = {"type": "image", "base64": B64, "mime_type": "image/png"}
    messages = [SystemMessage(content=[image]), HumanMessage("hi"), AIMessage(content=[image])]
    assert image_sources(messages) == [(0, 0, DATA_URL), (2, 0, DATA_URL)]

"""Table tests of the pure LlamaIndex <-> engine converters (no model is loaded)."""

from __future__ import annotations

import io
import pathlib
import sys
from pathlib import Path

import pytest
from llama_index.core.base.llms.types import (
    AudioBlock,
    CacheControl,
    CachePoint,
    ChatMessage,
    CitableBlock,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.schema import ImageDocument, ImageNode, TextNode
from llama_index.llms.eta import _messages as m

from eta_guard import ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.verdict import ETAResult, ETAStreamChunk, SafetyVerdict, TokenUsage

sys.path.insert(0, str(Path(__file__).parent))
from llama_index_fixtures import png_b64, png_bytes  # noqa: E402

PNG = png_bytes("red")
B64 = png_b64("red")
DATA_URL = f"data:image/png;base64,{B64}"


@pytest.fixture(scope="module")
def png_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("li-msg") / "red.png"
    path.write_bytes(PNG)
    return path


# ---------------------------------------------------------------------------- ImageBlock -> source
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: ImageBlock(image=PNG), PNG),  # raw bytes: the block re-encodes them as base64
        (lambda p: ImageBlock(image=B64.encode()), PNG),  # already base64
        (lambda p: ImageBlock(image=io.BytesIO(PNG)), PNG),  # a binary stream
        (lambda p: ImageBlock(path=p), "PATH"),
        (lambda p: ImageBlock(url=DATA_URL), DATA_URL),
        (lambda p: ImageBlock(url="https://example.com/cat.png"), "https://example.com/cat.png"),
        (lambda p: ImageBlock(image=PNG, path=p), PNG),  # inline data wins
    ],
    ids=["bytes", "base64", "stream", "path", "data-url", "remote-url", "bytes+path"],
)
def test_image_block_source(make, expected, png_path):
    source = m.image_block_source(make(png_path))
    assert source == (png_path if expected == "PATH" else expected)


def test_image_block_without_data_is_refused():
    with pytest.raises(InvalidInputError, match="no image data, path or url"):
        m.image_block_source(ImageBlock())


def test_data_url_survives_pydantic_url_normalisation():
    # AnyUrl must not mangle the base64 payload: the engine decodes the same bytes back.
    from eta_guard.media import load_image

    source = m.image_block_source(ImageBlock(url=DATA_URL))
    assert load_image(source).size == load_image(PNG).size


# ---------------------------------------------------------------------------- ImageNode -> source
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: ImageNode(image=B64), B64),
        (lambda p: ImageNode(image_path=str(p)), "PATH"),
        (lambda p: ImageNode(image_url="https://example.com/x.png"), "https://example.com/x.png"),
        (lambda p: ImageDocument(image=B64), B64),
        (lambda p: ImageDocument(image_path=str(p)), "PATH"),
        (lambda p: ImageBlock(path=p), "PATH"),
    ],
    ids=["node-b64", "node-path", "node-url", "doc-b64", "doc-path", "block"],
)
def test_image_node_source(make, expected, png_path):
    source = m.image_node_source(make(png_path))
    assert source == (png_path if expected == "PATH" else expected)


def test_image_node_source_never_downloads(monkeypatch):
    import requests

    monkeypatch.setattr(requests, "get", lambda *a, **k: pytest.fail("network access"))
    assert m.image_node_source(ImageNode(image_url="http://example.com/a.png")).startswith("http")


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (ImageNode(image=B64), True),
        (ImageDocument(image=B64), True),
        (ImageDocument(text="plain"), False),
        (TextNode(text="t"), False),
    ],
    ids=["image-node", "image-doc", "doc-without-image", "text-node"],
)
def test_is_image_node(node, expected):
    assert m.is_image_node(node) is expected


def test_image_node_without_image_is_refused():
    with pytest.raises(InvalidInputError, match="has no image"):
        m.image_node_source(ImageNode(text="only text"))
    with pytest.raises(InvalidInputError, match="expected an ImageNode"):
        m.image_node_source(TextNode(text="t"))


# ---------------------------------------------------------------------------- any image -> ImageBlock
@pytest.mark.parametrize(
    ("make", "check"),
    [
        (lambda p: ImageBlock(url=DATA_URL), lambda b: str(b.url) == DATA_URL),
        (lambda p: ImageNode(image=B64), lambda b: m.image_block_source(b) == PNG),
        (lambda p: ImageNode(image_path=str(p)), lambda b: b.path is not None),
        (lambda p: ImageDocument(image_path=str(p)), lambda b: b.path is not None),
        (
            lambda p: ImageNode(image_url="https://x.org/a.png"),
            lambda b: str(b.url).startswith("https"),
        ),
        (lambda p: p, lambda b: b.path is not None),
        # a path string stays a string (it may come from text): the local-file policy reads it
        (lambda p: str(p), lambda b: b.path is None and isinstance(m.image_block_source(b), str)),
        (lambda p: PNG, lambda b: m.image_block_source(b) == PNG),
        (lambda p: B64, lambda b: m.image_block_source(b) == PNG),
        (lambda p: DATA_URL, lambda b: m.image_block_source(b) == DATA_URL),
    ],
    ids=[
        "block",
        "node-b64",
        "node-path",
        "doc-path",
        "node-url",
        "Path",
        "str-path",
        "bytes",
        "b64",
        "data-url",
    ],
)
def test_to_image_block(make, check, png_path):
    block = m.to_image_block(make(png_path))
    assert isinstance(block, ImageBlock)
    assert check(block)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (42, "unsupported image int"),
        (ImageNode(text="no image"), "has no image"),
    ],
    ids=["int", "node-without-image"],
)
def test_to_image_block_refuses(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        m.to_image_block(bad)


@pytest.mark.parametrize(
    "path",
    ["/no/such/file.png", Path("/no/such/file.png"), ImageNode(image_path="/no/such/file.png")],
    ids=["str-path", "Path", "node-path"],
)
def test_to_image_block_never_looks_at_the_file(path):
    # Whether the file exists is the engine's business (one neutral message for every path).
    block = m.to_image_block(path)
    assert str(m.image_block_source(block)) == "/no/such/file.png"
    # only an application's pathlib.Path / node path is a path; a str stays a str
    assert isinstance(m.image_block_source(block), str) == isinstance(path, str)


# ---------------------------------------------------------------------------- blocks -> parts
@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (TextBlock(text="hi"), [{"type": "text", "text": "hi"}]),
        (TextBlock(text=""), []),
        (ImageBlock(url=DATA_URL), [{"type": "image", "image": DATA_URL}]),
        (ThinkingBlock(content="hmm"), []),
        (CachePoint(cache_control=CacheControl(type="ephemeral")), []),
        (
            CitableBlock(
                title="t", source="s", content=[TextBlock(text="a"), ImageBlock(url=DATA_URL)]
            ),
            [{"type": "text", "text": "a"}, {"type": "image", "image": DATA_URL}],
        ),
    ],
    ids=["text", "empty-text", "image", "thinking", "cache-point", "citable"],
)
def test_block_to_parts(block, expected):
    assert m.block_to_parts(block, where="b") == expected


@pytest.mark.parametrize(
    "block",
    [
        AudioBlock(audio=b"RIFF0000WAVE", format="wav"),
        DocumentBlock(data=b"%PDF-1.4", document_mimetype="application/pdf"),
    ],
    ids=["audio", "document"],
)
def test_unsupported_blocks_are_refused_by_name(block):
    with pytest.raises(
        InvalidInputError, match=rf"messages\[0\].blocks\[1\] is a '{block.block_type}' block"
    ):
        m.to_engine_messages([ChatMessage(role="user", blocks=[TextBlock(text="x"), block])])


def test_tool_calls_and_results_become_engine_turns():
    call = ToolCallBlock(tool_call_id="c1", tool_name="f", tool_kwargs={"a": 1})
    with pytest.raises(InvalidInputError, match="role 'user'; only the assistant calls tools"):
        m.to_engine_messages([ChatMessage(role="user", blocks=[call])])
    out = m.to_engine_messages(
        [
            ChatMessage(role="user", content="x"),
            ChatMessage(role="assistant", blocks=[TextBlock(text="Let me."), call]),
            ChatMessage(role="tool", content="ok", additional_kwargs={"tool_call_id": "c1"}),
        ]
    )
    assert out[1] == {
        "role": "assistant",
        "content": "Let me.",
        "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}, "id": "c1"}
        ],
    }
    assert out[2] == {"role": "tool", "content": "ok", "tool_call_id": "c1"}


# ---------------------------------------------------------------------------- messages
def test_to_engine_messages_keeps_order_roles_and_images():
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="be safe"),
        ChatMessage(
            role=MessageRole.USER, blocks=[ImageBlock(url=DATA_URL), TextBlock(text="what?")]
        ),
        ChatMessage(role=MessageRole.ASSISTANT, content="a square"),
        ChatMessage(role=MessageRole.USER, content=["and", "this"] and "and this?"),
    ]
    assert m.to_engine_messages(messages) == [
        {"role": "system", "content": "be safe"},
        {
            "role": "user",
            "content": [{"type": "image", "image": DATA_URL}, {"type": "text", "text": "what?"}],
        },
        {"role": "assistant", "content": "a square"},
        {"role": "user", "content": "and this?"},
    ]


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        (MessageRole.SYSTEM, "system"),
        (MessageRole.DEVELOPER, "system"),
        (MessageRole.USER, "user"),
        (MessageRole.ASSISTANT, "assistant"),
        (MessageRole.CHATBOT, "assistant"),
        (MessageRole.MODEL, "assistant"),
    ],
)
def test_roles(role, expected):
    assert m.to_engine_messages([ChatMessage(role=role, content="x")])[0]["role"] == expected


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([ChatMessage(role=MessageRole.FUNCTION, content="x")], "role 'function'"),
        (ChatMessage(role="user", content="x"), "must be a list of ChatMessage"),
        ("hello", "must be a list of ChatMessage"),
        ([{"role": "user", "content": "x"}], r"messages\[0\] is dict"),
    ],
    ids=["function", "single-message", "str", "dict"],
)
def test_to_engine_messages_refuses(messages, match):
    with pytest.raises(InvalidInputError, match=match):
        m.to_engine_messages(messages)


def test_multiple_text_blocks_join_like_chat_message_content():
    msg = ChatMessage(role="user", blocks=[TextBlock(text="a"), TextBlock(text="b")])
    assert m.to_engine_messages([msg])[0]["content"] == msg.content == "a\nb"


def test_converters_do_not_mutate_messages():
    msg = ChatMessage(role="user", blocks=[ImageBlock(image=PNG), TextBlock(text="q")])
    before = msg.model_dump()
    m.to_engine_messages([msg])
    assert msg.model_dump() == before


@pytest.mark.parametrize(
    ("images", "n_images"),
    [(None, 0), ([], 0), (PNG, 1), ([PNG, DATA_URL], 2), (ImageNode(image=B64), 1)],
    ids=["none", "empty", "single-bytes", "two", "single-node"],
)
def test_completion_messages(images, n_images):
    (msg,) = m.completion_messages("describe", images)
    assert msg.role == MessageRole.USER
    assert [type(b).__name__ for b in msg.blocks] == ["ImageBlock"] * n_images + ["TextBlock"]
    assert msg.blocks[-1].text == "describe"


def test_completion_messages_refuses_non_str_prompt():
    with pytest.raises(InvalidInputError, match="prompt must be a str"):
        m.completion_messages(["not", "a", "str"])


# ---------------------------------------------------------------------------- call kwargs
@pytest.mark.parametrize(
    ("kwargs", "default", "expected"),
    [
        ({}, None, (None, {})),
        ({}, 8, (None, {"max_new_tokens": 8})),
        ({"max_new_tokens": 3}, 8, (None, {"max_new_tokens": 3})),
        ({"stop": "\n"}, None, (["\n"], {})),
        ({"stop": ["a", "b"], "pre_threshold": 0.5}, None, (["a", "b"], {"pre_threshold": 0.5})),
    ],
    ids=["empty", "llm-default", "call-wins", "stop-str", "stop-list+override"],
)
def test_split_call_kwargs(kwargs, default, expected):
    assert m.split_call_kwargs(kwargs, max_new_tokens=default) == expected


def test_split_call_kwargs_refuses_unknown_names():
    with pytest.raises(
        InvalidInputError, match=r"unknown keyword argument\(s\) \['pre_treshold'\]"
    ):
        m.split_call_kwargs({"pre_treshold": 0.2}, max_new_tokens=None)


@pytest.mark.parametrize(
    ("base", "wanted", "expected"),
    [
        (ETAConfig(), None, {}),
        (ETAConfig(), ETAConfig(), {}),
        (ETAConfig(), ETAConfig(pre_threshold=0.3, seed=1), {"pre_threshold": 0.3, "seed": 1}),
        (ETAConfig(seed=1), ETAConfig(), {"seed": None}),
    ],
    ids=["none", "same", "two-differ", "back-to-default"],
)
def test_config_overrides(base, wanted, expected):
    assert m.config_overrides(base, wanted) == expected


# ---------------------------------------------------------------------------- results out
def _result(text: str = "ab") -> ETAResult:
    verdict = SafetyVerdict.combine(
        pre_threshold=0.16, post_threshold=0.06, pre_score=0.5, post_score=0.0
    )
    usage = TokenUsage(input_tokens=7, output_tokens=2, total_tokens=9, decoded_tokens=12)
    return ETAResult(
        text=text,
        verdict=verdict,
        aligned=True,
        usage=usage,
        finish_reason="stop",
        model_name="tiny",
    )


def test_result_kwargs():
    kw = m.result_kwargs(_result())
    assert kw["eta_verdict"]["unsafe"] is True and kw["eta_verdict"]["pre_score"] == 0.5
    assert kw["eta_aligned"] is True
    assert (kw["prompt_tokens"], kw["completion_tokens"], kw["total_tokens"]) == (7, 2, 9)
    assert (kw["finish_reason"], kw["model_name"]) == ("stop", "tiny")


def test_stream_accumulator_delta_and_cumulative_text():
    acc = m.StreamAccumulator()
    chunks = [
        ETAStreamChunk(text="a"),
        ETAStreamChunk(text="b"),
        ETAStreamChunk(text="", result=_result()),
    ]
    out = [acc.push(c) for c in chunks]
    assert [r.delta for r in out] == ["a", "b", ""]
    assert [r.message.content for r in out] == ["a", "ab", "ab"]
    assert all(r.message.role == MessageRole.ASSISTANT for r in out)
    assert [bool(r.additional_kwargs) for r in out] == [False, False, True]
    # LlamaIndex's token counter reads raw["usage"].
    assert out[-1].raw["usage"]["input_tokens"] == 7


def test_final_chat_and_completion():
    acc = m.StreamAccumulator()
    acc.push(ETAStreamChunk(text="ab"))
    last = acc.push(ETAStreamChunk(text="", result=_result()))
    chat = m.final_chat(last)
    assert (
        chat.delta is None
        and chat.message.content == "ab"
        and chat.additional_kwargs["eta_aligned"]
    )
    completion = m.to_completion(last)
    assert (completion.text, completion.delta) == ("ab", "")
    assert completion.additional_kwargs == last.additional_kwargs and completion.raw == last.raw
    with pytest.raises(RuntimeError, match="without a result"):
        m.final_chat(None)


def test_module_has_no_io_at_import():
    # pathlib is only used for type dispatch; the converters never open files themselves.
    assert m.image_block_source(ImageBlock(path=pathlib.Path(__file__))) == pathlib.Path(__file__)

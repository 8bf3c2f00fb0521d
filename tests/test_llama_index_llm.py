"""ETAMultiModalLLM end to end on tiny random checkpoints: every method, with images."""

# Fixtures are imported from llama_index_fixtures, so their use as arguments "redefines" them.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.prompts import ChatPromptTemplate
from llama_index.core.schema import ImageNode
from llama_index.llms.eta import ETAMultiModalLLM

from eta_guard import ETAConfig
from eta_guard.errors import InvalidInputError

sys.path.insert(0, str(Path(__file__).parent))
from llama_index_fixtures import (  # noqa: E402, F401
    FAST,
    FLAG_ALL,
    FLAG_NONE,
    image_dir,
    li_ckpt,
    li_eta,
    li_llm,
    png_b64,
    png_bytes,
)

QUESTION = "What is in this picture?"

# One image form per method, so that every form travels through a real call.
IMAGE_FORMS = {
    "path": lambda d: ImageBlock(path=d / "red.png"),
    "bytes": lambda d: ImageBlock(image=png_bytes("red")),
    "base64": lambda d: ImageBlock(image=png_b64("red").encode()),
    "data-url": lambda d: ImageBlock(url=f"data:image/png;base64,{png_b64('red')}"),
    "stream": lambda d: ImageBlock(image=io.BytesIO(png_bytes("red"))),
}


def _messages(block: ImageBlock) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, blocks=[block, TextBlock(text=QUESTION)])]


def _collect_stream(responses: list[Any]) -> dict[str, Any]:
    """Check the streaming contract and return what the call produced."""
    deltas = [r.delta for r in responses]
    texts = [r.message.content if hasattr(r, "message") else r.text for r in responses]
    running = ""
    for delta, text in zip(deltas, texts, strict=True):
        running += delta
        assert text == running, "text must be the cumulative sum of the deltas"
    assert all(not r.additional_kwargs for r in responses[:-1])
    last = responses[-1]
    return {
        "text": texts[-1],
        "kwargs": last.additional_kwargs,
        "raw": last.raw,
        "n": len(responses),
    }


def _done(response: Any) -> dict[str, Any]:
    text = response.message.content if hasattr(response, "message") else response.text
    assert response.delta is None
    return {"text": text, "kwargs": response.additional_kwargs, "raw": response.raw, "n": 1}


def _call(llm: ETAMultiModalLLM, method: str, block: ImageBlock, **kw: Any) -> dict[str, Any]:
    messages = _messages(block)
    if method == "chat":
        return _done(llm.chat(messages, **kw))
    if method == "complete":
        return _done(llm.complete(QUESTION, image_documents=[block], **kw))
    if method == "stream_chat":
        return _collect_stream(list(llm.stream_chat(messages, **kw)))
    if method == "stream_complete":
        return _collect_stream(list(llm.stream_complete(QUESTION, image_documents=[block], **kw)))

    async def run() -> dict[str, Any]:
        if method == "achat":
            return _done(await llm.achat(messages, **kw))
        if method == "acomplete":
            return _done(await llm.acomplete(QUESTION, image_documents=[block], **kw))
        if method == "astream_chat":
            return _collect_stream([r async for r in await llm.astream_chat(messages, **kw)])
        if method == "astream_complete":
            gen = await llm.astream_complete(QUESTION, image_documents=[block], **kw)
            return _collect_stream([r async for r in gen])
        raise AssertionError(method)

    return asyncio.run(run())


METHODS = [
    ("chat", "path"),
    ("complete", "bytes"),
    ("stream_chat", "base64"),
    ("stream_complete", "data-url"),
    ("achat", "stream"),
    ("acomplete", "path"),
    ("astream_chat", "bytes"),
    ("astream_complete", "base64"),
]


@pytest.fixture(scope="module")
def reference_text(li_llm, image_dir) -> str:
    return li_llm.chat(_messages(IMAGE_FORMS["path"](image_dir))).message.content


@pytest.mark.parametrize(("method", "form"), METHODS, ids=[f"{m}-{f}" for m, f in METHODS])
def test_every_method_with_an_image(li_llm, image_dir, reference_text, method, form):
    out = _call(li_llm, method, IMAGE_FORMS[form](image_dir))
    verdict = out["kwargs"]["eta_verdict"]
    # CLIP saw exactly the one image, whatever form it came in.
    assert len(verdict["image_scores"]) == 1 and verdict["pre_score"] is not None
    # Greedy decoding: every method and image form gives the same answer.
    assert out["text"] == reference_text and out["text"]
    assert out["kwargs"]["completion_tokens"] <= FAST["max_new_tokens"]
    assert out["kwargs"]["prompt_tokens"] > 0
    assert out["raw"]["text"] == out["text"]
    if "stream" in method:
        assert out["n"] > 2  # token by token (safe image: no hold-back), then the verdict chunk


def test_predict_and_stream_with_an_image_template(li_llm, image_dir, reference_text):
    """LlamaIndex's own helpers (``predict`` / ``stream`` over a chat template) carry images."""
    template = ChatPromptTemplate(
        message_templates=[
            ChatMessage(
                role="user", blocks=[ImageBlock(path=image_dir / "red.png"), TextBlock(text="{q}")]
            )
        ]
    )
    assert li_llm.predict(template, q=QUESTION) == reference_text
    assert "".join(li_llm.stream(template, q=QUESTION)) == reference_text


def test_alignment_forced_by_thresholds(li_llm, image_dir):
    block = IMAGE_FORMS["path"](image_dir)
    for method in ("chat", "stream_chat"):
        out = _call(li_llm, method, block, **FLAG_ALL)
        assert out["kwargs"]["eta_aligned"] is True
        assert out["kwargs"]["eta_verdict"]["unsafe"] is True
        assert out["text"].startswith("As an AI assistant")


def test_safe_image_skips_the_reward_model(li_llm, image_dir):
    out = _call(li_llm, "chat", IMAGE_FORMS["path"](image_dir), **FLAG_NONE)
    verdict = out["kwargs"]["eta_verdict"]
    assert out["kwargs"]["eta_aligned"] is False
    assert verdict["input_unsafe"] is False and verdict["post_score"] is None
    assert "post" in verdict["skipped"]


def test_config_of_the_llm_applies_to_a_ready_engine(li_eta, image_dir):
    llm = ETAMultiModalLLM(
        eta=li_eta, config=ETAConfig(**FAST, **FLAG_ALL), allow_local_image_files=True
    )
    assert _call(llm, "chat", IMAGE_FORMS["path"](image_dir))["kwargs"]["eta_aligned"] is True
    assert li_eta.config.pre_threshold == 0.16  # the shared engine is untouched


def test_max_new_tokens_of_the_llm(li_eta, image_dir):
    llm = ETAMultiModalLLM(eta=li_eta, max_new_tokens=2, allow_local_image_files=True)
    assert llm.metadata.num_output == 2
    out = _call(llm, "chat", IMAGE_FORMS["path"](image_dir))
    assert out["kwargs"]["completion_tokens"] <= 2
    assert (
        _call(llm, "chat", IMAGE_FORMS["path"](image_dir), max_new_tokens=1)["kwargs"][
            "completion_tokens"
        ]
        <= 1
    )


def test_multi_turn_with_system_and_two_images(li_llm, image_dir):
    messages = [
        ChatMessage(role="system", content="Answer briefly."),
        ChatMessage(
            role="user",
            blocks=[ImageBlock(path=image_dir / "red.png"), TextBlock(text="And this?")],
        ),
        ChatMessage(role="assistant", content="A red square."),
        ChatMessage(
            role="user",
            blocks=[ImageBlock(path=image_dir / "blue.png"), TextBlock(text="And this?")],
        ),
    ]
    verdict = li_llm.chat(messages).additional_kwargs["eta_verdict"]
    assert len(verdict["image_scores"]) == 2
    assert verdict["pre_score"] == max(verdict["image_scores"])


def test_leaving_a_stream_early_frees_the_engine(li_llm, image_dir, reference_text):
    messages = _messages(IMAGE_FORMS["path"](image_dir))
    for _ in li_llm.stream_chat(messages):
        break
    assert li_llm.chat(messages).message.content == reference_text

    async def run() -> str:
        gen = await li_llm.astream_chat(messages)
        async for _ in gen:
            break
        await gen.aclose()
        return (await asyncio.wait_for(li_llm.achat(messages), timeout=60)).message.content

    assert asyncio.run(run()) == reference_text


def test_text_only_chat(li_llm):
    out = li_llm.chat([ChatMessage(role="user", content="Hello there")])
    assert out.message.content
    assert out.additional_kwargs["eta_verdict"]["pre_score"] is None


def test_remote_image_url_when_enabled(li_llm, monkeypatch, reference_text):
    """Remote URLs pass through to the engine, which fetches them only when allowed."""
    import eta_guard.media

    fetched: list[str] = []

    def fetch_bytes(url, policy, *, label):
        fetched.append(url)
        return png_bytes("red")

    monkeypatch.setattr(eta_guard.media, "fetch_bytes", fetch_bytes)
    block = ImageBlock(url="https://example.com/red.png")
    with pytest.raises(InvalidInputError, match="remote images are disabled"):
        li_llm.chat(_messages(block))
    assert fetched == []
    with pytest.raises(InvalidInputError, match="allow_remote_images.*locked"):
        li_llm.chat(_messages(block), allow_remote_images=True)  # not per call: user input
    assert fetched == []
    allowed = ETAMultiModalLLM(
        eta=li_llm.engine,
        config=li_llm.engine.config.with_overrides(allow_remote_images=True),
        allow_local_image_files=True,
    )
    response = allowed.chat(_messages(block))
    assert fetched == ["https://example.com/red.png"]
    assert response.message.content == reference_text


# ---------------------------------------------------------------------------- bad input
def _deleted_path_block(tmp_path: Path) -> ImageBlock:
    path = tmp_path / "gone.png"
    path.write_bytes(png_bytes())
    block = ImageBlock(path=path)
    path.unlink()
    return block


BAD_BLOCKS = {
    "garbage-bytes": (lambda t: ImageBlock(image=b"definitely not an image"), "not an image"),
    "truncated-png": (lambda t: ImageBlock(image=png_bytes()[:40]), "image"),
    "missing-file": (_deleted_path_block, "image path refused"),
    "remote-url": (lambda t: ImageBlock(url="https://example.com/cat.png"), "remote"),
    "pdf-data-url": (
        lambda t: ImageBlock(url="data:application/pdf;base64,JVBERi0xLjQK"),
        "application/pdf",
    ),
    "empty-block": (lambda t: ImageBlock(), "no image data"),
}


@pytest.mark.parametrize("method", [m for m, _ in METHODS])
@pytest.mark.parametrize("bad", list(BAD_BLOCKS))
def test_bad_image_blocks_raise_invalid_input(li_llm, tmp_path, monkeypatch, method, bad):
    import eta_guard.media

    monkeypatch.setattr(
        eta_guard.media, "fetch_bytes", lambda *a, **k: pytest.fail("network access")
    )
    make, match = BAD_BLOCKS[bad]
    with pytest.raises(InvalidInputError, match=match):
        _call(li_llm, method, make(tmp_path))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda llm: llm.chat([ChatMessage(role="function", content="x")]), "role 'function'"),
        (
            lambda llm: llm.chat([ChatMessage(role="tool", content="x")]),
            "no assistant turn before it calls a tool",
        ),
        (
            lambda llm: llm.chat([ChatMessage(role="user", content="x")], pre_treshold=1),
            "pre_treshold",
        ),
        (lambda llm: llm.stream_chat([ChatMessage(role="user", content="x")], bogus=1), "bogus"),
        (lambda llm: llm.complete("x", image_documents=[42]), "unsupported image int"),
        (
            lambda llm: llm.chat([ChatMessage(role="user", content="x")], pre_threshold="high"),
            "pre_threshold",
        ),
    ],
    ids=[
        "function-role",
        "tool-without-call",
        "typo-kwarg",
        "stream-unknown-kwarg-eager",
        "bad-image-document",
        "bad-override",
    ],
)
def test_bad_calls_raise_invalid_input(li_llm, call, match):
    with pytest.raises(InvalidInputError, match=match):
        call(li_llm)  # raised at call time, before any streaming starts


# ---------------------------------------------------------------------------- LlamaIndex contract
def test_metadata_and_class_name():
    llm = ETAMultiModalLLM(vlm="some/vlm", max_new_tokens=32, context_window=4096)
    meta = llm.metadata
    assert meta.is_chat_model is True and meta.is_function_calling_model is False  # unknown
    assert (meta.num_output, meta.context_window, meta.model_name) == (32, 4096, "some/vlm")
    assert "multi" in ETAMultiModalLLM.class_name()
    assert ETAMultiModalLLM(vlm="x").metadata.num_output == ETAConfig().max_new_tokens


def test_metadata_of_a_ready_engine(li_eta, li_llm):
    assert li_llm.metadata.model_name == li_eta.model_name
    assert li_llm.metadata.num_output == FAST["max_new_tokens"]


def test_weights_load_lazily(li_ckpt, image_dir):
    llm = ETAMultiModalLLM(
        vlm=li_ckpt.vlm,
        clip=li_ckpt.clip,
        reward_model=li_ckpt.reward_model,
        config=ETAConfig(**FAST),
        allow_local_image_files=True,
    )
    assert not llm._engine.loaded
    llm.metadata, llm.to_dict()  # noqa: B018 -- neither touches the weights
    assert not llm._engine.loaded
    assert llm.chat(_messages(IMAGE_FORMS["path"](image_dir))).message.content
    assert llm._engine.loaded and llm.engine.config.max_new_tokens == FAST["max_new_tokens"]


def test_a_missing_model_fails_at_first_call_not_at_construction():
    llm = ETAMultiModalLLM(vlm="/no/such/vlm", clip="/no/such/clip", reward_model="/no/such/rm")
    with pytest.raises(Exception):  # noqa: B017 -- whatever the loader raises, it is raised now
        llm.chat([ChatMessage(role="user", content="hi")])


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"vlm": "a", "eta": object()}, {"eta": object()}],
    ids=["neither", "both", "not-an-eta"],
)
def test_constructor_refuses(kwargs):
    with pytest.raises(InvalidInputError):
        ETAMultiModalLLM(**kwargs)


def test_token_counting_callback_reads_eta_usage(li_eta, image_dir):
    counter = TokenCountingHandler()
    llm = ETAMultiModalLLM(
        eta=li_eta, callback_manager=CallbackManager([counter]), allow_local_image_files=True
    )
    response = llm.chat(_messages(IMAGE_FORMS["path"](image_dir)))
    assert counter.prompt_llm_token_count == response.additional_kwargs["prompt_tokens"]
    assert counter.completion_llm_token_count == response.additional_kwargs["completion_tokens"]


def test_complete_accepts_image_nodes(li_llm, image_dir, reference_text):
    node = ImageNode(image_path=str(image_dir / "red.png"))
    assert li_llm.complete(QUESTION, image_documents=[node]).text == reference_text


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_other_vlm_families(tiny_checkpoints_by_family, image_dir, family):
    """The adapter is template-agnostic: the same ChatMessages drive other VLM families."""
    ckpt = tiny_checkpoints_by_family(family)
    llm = ETAMultiModalLLM(
        vlm=ckpt.vlm,
        clip=ckpt.clip,
        reward_model=ckpt.reward_model,
        config=ETAConfig(**FAST),
        allow_local_image_files=True,
    )
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(
            role="user", blocks=[ImageBlock(path=image_dir / "red.png"), TextBlock(text="Hi")]
        ),
    ]
    chunks = list(llm.stream_chat(messages))
    assert chunks[-1].additional_kwargs["eta_verdict"]["image_scores"]
    assert chunks[-1].message.content == llm.chat(messages).message.content

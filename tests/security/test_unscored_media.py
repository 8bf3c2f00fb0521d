"""Issue 18, hardening item 5: the LangChain guards passed other media unscored.

``video``, ``audio``, Gemini ``inline_data``, ``file`` blocks of image bytes declared
``application/octet-stream`` and ``type: "IMAGE_URL"`` went through ``ETAInputGuard`` and
``ETAGuardMiddleware`` without any check, though a downstream model may see them. Now images in
any of those wrappings are scored (and forwarded as the scored PNG), and every other medium is
refused with a clear error. Video is refused, not split: a guard cannot know which frames a
model samples. Random tiny models: thresholds that flag everything force the decision
(mechanics, not safety).
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage

sys.path.insert(0, str(Path(__file__).parents[1]))
from langchain_eta import ETAGuardMiddleware, ETAInputGuard  # noqa: E402
from langchain_fixtures import (  # noqa: E402, F401
    FLAG_ALL,
    FLAG_NONE,
    lc_ckpt,
    lc_eta,
    lc_evaluator,
    png_b64,
)

from eta_guard.errors import GuardrailViolation, InvalidInputError  # noqa: E402

PNG = png_b64("noise")


def _image_wrappings() -> dict[str, dict[str, Any]]:
    return {
        "octet-stream-file": {
            "type": "file",
            "base64": PNG,
            "mime_type": "application/octet-stream",
        },
        "file-without-mime": {"type": "file", "base64": PNG},
        "gemini-inline_data": {"inline_data": {"mime_type": "image/png", "data": PNG}},
        "gemini-inlineData": {"inlineData": {"mimeType": "image/png", "data": PNG}},
        "IMAGE_URL": {"type": "IMAGE_URL", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    }


OTHER_MEDIA = {
    "video": {"type": "video", "base64": "AAAA", "mime_type": "video/mp4"},
    "video-url": {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
    "gemini-video-media": {"type": "media", "mime_type": "video/mp4", "data": "AAAA"},
    "audio": {"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"},
    "openai-input_audio": {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    "gemini-inline-audio": {"inline_data": {"mime_type": "audio/wav", "data": "AAAA"}},
    "pdf-file": {"type": "file", "base64": "JVBERi0xLjQK", "mime_type": "application/pdf"},
    "octet-stream-not-an-image": {
        "type": "file",
        "base64": base64.b64encode(b"\x00\x01garbage").decode(),
        "mime_type": "application/octet-stream",
    },
    "file-url": {"type": "file", "url": "https://example.com/x.bin"},
}


def _message(block: dict[str, Any]) -> HumanMessage:
    return HumanMessage(content=[{"type": "text", "text": "What is this?"}, block])


def _evaluator(lc_evaluator, thresholds):  # noqa: F811
    return lc_evaluator.with_config(lc_evaluator.config.with_overrides(**thresholds))


class _Recording(GenericFakeChatModel):
    seen: list[Any] = []

    def _generate(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(list(messages))
        return super()._generate(messages, *args, **kwargs)


@pytest.mark.parametrize("name", list(_image_wrappings()))
def test_input_guard_scores_images_in_every_wrapping(lc_evaluator, name):  # noqa: F811
    block = _image_wrappings()[name]
    with pytest.raises(GuardrailViolation):
        ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_ALL)).invoke([_message(block)])
    # Not flagged: forwarded as the scored PNG, in a standard image block.
    out = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE)).invoke([_message(block)])
    blocks = out[0].content_blocks
    assert [b["type"] for b in blocks] == ["text", "image"], blocks
    assert blocks[1]["mime_type"] == "image/png"


@pytest.mark.parametrize("name", list(OTHER_MEDIA))
def test_input_guard_refuses_media_it_cannot_score(lc_evaluator, name):  # noqa: F811
    guard = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE))
    with pytest.raises(InvalidInputError, match="cannot score") as info:
        guard.invoke([_message(OTHER_MEDIA[name])])
    if "video" in name:
        assert "frames" in str(info.value)


@pytest.mark.parametrize("name", ["video", "gemini-inline-audio", "pdf-file"])
def test_middleware_refuses_media_it_cannot_score_in_the_history(lc_evaluator, name):  # noqa: F811
    model = _Recording(messages=iter([AIMessage("ok")] * 5), seen=[])
    agent = create_agent(
        model=model,
        tools=[],
        middleware=[ETAGuardMiddleware(_evaluator(lc_evaluator, FLAG_NONE))],
    )
    history = [_message(OTHER_MEDIA[name]), AIMessage("seen"), HumanMessage("again")]
    with pytest.raises(InvalidInputError, match="cannot score"):
        agent.invoke({"messages": history})
    assert model.seen == []  # the model never got it


def test_middleware_scores_an_octet_stream_image(lc_evaluator):  # noqa: F811
    model = _Recording(messages=iter([AIMessage("ok")] * 5), seen=[])
    agent = create_agent(
        model=model,
        tools=[],
        middleware=[ETAGuardMiddleware(_evaluator(lc_evaluator, FLAG_ALL), on_violation="raise")],
    )
    block = _image_wrappings()["octet-stream-file"]
    with pytest.raises(GuardrailViolation):
        agent.invoke({"messages": [_message(block)]})
    assert model.seen == []


def test_text_and_text_files_still_pass(lc_evaluator):  # noqa: F811
    guard = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_ALL))
    text_file = {"type": "file", "base64": "aGk=", "mime_type": "text/plain"}
    out = guard.invoke([_message(text_file), AIMessage("hi")])
    assert len(out) == 2

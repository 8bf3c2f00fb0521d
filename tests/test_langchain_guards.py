"""ETAInputGuard / ETAOutputGuard around any chat model, decisions forced by thresholds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage

sys.path.insert(0, str(Path(__file__).parent))
from langchain_eta import (  # noqa: E402
    DEFAULT_REFUSAL,
    EVENT_NAME,
    ETAChatModel,
    ETAInputGuard,
    ETAOutputGuard,
)
from langchain_fixtures import FLAG_ALL, FLAG_NONE, lc_ckpt, lc_eta, lc_evaluator, png_b64  # noqa: E402, F401

from eta_guard.config import ETAConfig  # noqa: E402
from eta_guard.errors import GuardrailViolation  # noqa: E402

ANSWER = "The picture shows a red square. Nothing else is there."


def _evaluator(lc_evaluator, thresholds):  # noqa: F811
    return lc_evaluator.with_config(lc_evaluator.config.with_overrides(**thresholds))


def _fake_model(text: str = ANSWER) -> GenericFakeChatModel:
    """Any chat model: streams ``text`` word by word."""
    return GenericFakeChatModel(messages=iter([AIMessage(content=text)] * 50))


def _with_image(kind: str = "red") -> list[HumanMessage]:
    return [
        HumanMessage(
            content=[
                {"type": "text", "text": "What is this?"},
                {"type": "image", "base64": png_b64(kind), "mime_type": "image/png"},
            ]
        )
    ]


class _Events(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, data))


# ---------------------------------------------------------------- input guard


def test_input_guard_raise_carries_the_verdict(lc_evaluator):  # noqa: F811
    guard = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="raise")
    with pytest.raises(GuardrailViolation) as err:
        guard.invoke(_with_image())
    assert err.value.verdict.input_unsafe is True and err.value.verdict.pre_score is not None


def test_input_guard_replace_swaps_flagged_images_for_text(lc_evaluator):  # noqa: F811
    guard = ETAInputGuard(
        evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="replace", replacement="[gone]"
    )
    messages = _with_image()
    out = guard.invoke(messages)
    assert [b["type"] for b in out[0].content_blocks] == ["text", "text"]
    assert out[0].content_blocks[1]["text"] == "[gone]"
    assert messages[0].content[1]["type"] == "image"  # input untouched
    answer = (guard | _fake_model()).invoke(messages)  # the model still answers, without the image
    assert answer.text == ANSWER


def test_input_guard_flag_passes_through_with_the_verdict(lc_evaluator):  # noqa: F811
    guard = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="flag")
    out = guard.invoke(_with_image())
    assert out[0].content[1]["type"] == "image"
    assert out[-1].response_metadata["eta_guard_verdict"]["input_unsafe"] is True


@pytest.mark.parametrize("mode", ["raise", "replace"])
def test_input_guard_passes_safe_or_imageless_input_unchanged(lc_evaluator, mode):  # noqa: F811
    guard = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE), on_violation=mode)
    messages = _with_image()
    out = guard.invoke(messages)
    assert out[0].text == messages[0].text  # text untouched; the image is the scored PNG
    assert out[0].content_blocks[1]["mime_type"] == "image/png"
    strict = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation=mode)
    assert strict.invoke("no image here") == "no image here"


async def test_input_guard_async_matches_sync(lc_evaluator):  # noqa: F811
    guard = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="flag")
    sync = guard.invoke(_with_image())[-1].response_metadata["eta_guard_verdict"]
    asyn = (await guard.ainvoke(_with_image()))[-1].response_metadata["eta_guard_verdict"]
    assert asyn["pre_score"] == pytest.approx(sync["pre_score"])


# ---------------------------------------------------------------- output guard


@pytest.mark.parametrize("thresholds", [FLAG_ALL, FLAG_NONE], ids=["flagged", "safe"])
def test_output_guard_modes(lc_evaluator, thresholds):  # noqa: F811
    evaluator = _evaluator(lc_evaluator, thresholds)
    flagged = thresholds is FLAG_ALL
    chain = _fake_model() | ETAOutputGuard(evaluator=evaluator, on_violation="raise")
    if flagged:
        with pytest.raises(GuardrailViolation) as err:
            chain.invoke("hi")
        assert err.value.verdict.output_unsafe is True
    else:
        assert chain.invoke("hi").text == ANSWER
    replaced = (_fake_model() | ETAOutputGuard(evaluator=evaluator, on_violation="replace")).invoke(
        "hi"
    )
    assert replaced.text == (DEFAULT_REFUSAL if flagged else ANSWER)
    marked = (_fake_model() | ETAOutputGuard(evaluator=evaluator, on_violation="flag")).invoke("hi")
    assert marked.text == ANSWER
    assert marked.response_metadata["eta_guard_verdict"]["output_unsafe"] is flagged


def test_output_guard_on_strings(lc_evaluator):  # noqa: F811
    guard = ETAOutputGuard(
        evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="replace", refusal="No."
    )
    assert guard.invoke(ANSWER) == "No."
    assert guard.invoke("") == ""  # nothing to score


@pytest.mark.parametrize("mode", ["replace", "flag"])
def test_streaming_never_yields_text_before_it_is_checked(lc_evaluator, mode, monkeypatch):  # noqa: F811
    evaluator = _evaluator(lc_evaluator, FLAG_ALL)
    log: list[str] = []
    real = type(evaluator).evaluate_output
    monkeypatch.setattr(
        type(evaluator),
        "evaluate_output",
        lambda self, r: (log.append("checked"), real(self, r))[1],
    )
    chain = _fake_model() | ETAOutputGuard(evaluator=evaluator, on_violation=mode)
    chunks = []
    for chunk in chain.stream("hi"):
        log.append("yield")
        chunks.append(chunk)
    assert log[0] == "checked" and log.count("checked") == 1
    text = "".join(c.text for c in chunks)
    if mode == "replace":
        assert text == DEFAULT_REFUSAL and ANSWER[:5] not in text  # blocked text never leaked
        assert chunks[-1].chunk_position == "last"
    else:
        assert text == ANSWER and len(chunks) > 1  # the model's chunks, replayed after the check
        assert chunks[-1].response_metadata["eta_guard_verdict"]["output_unsafe"] is True


def test_streaming_raise_yields_nothing(lc_evaluator):  # noqa: F811
    chain = _fake_model() | ETAOutputGuard(
        evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="raise"
    )
    seen = []
    with pytest.raises(GuardrailViolation):
        for chunk in chain.stream("hi"):
            seen.append(chunk)
    assert seen == []


async def test_async_stream_matches_sync(lc_evaluator):  # noqa: F811
    guard = ETAOutputGuard(evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="replace")
    chain = _fake_model() | guard
    sync = "".join(c.text for c in chain.stream("hi"))
    asyn = "".join([c.text async for c in chain.astream("hi")])
    assert sync == asyn == DEFAULT_REFUSAL
    assert (await chain.ainvoke("hi")).text == DEFAULT_REFUSAL


def test_streamed_chunks_are_message_chunks(lc_evaluator):  # noqa: F811
    guard = ETAOutputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE), on_violation="raise")
    chunks = list((_fake_model() | guard).stream("hi"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)


# ---------------------------------------------------------------- events, ETAChatModel, loading


def test_verdicts_are_custom_callback_events(lc_evaluator):  # noqa: F811
    handler = _Events()
    chain = (
        ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE))
        | _fake_model()
        | ETAOutputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE))
    )
    chain.invoke(_with_image(), config={"callbacks": [handler]})
    assert [(name, data["source"]) for name, data in handler.events] == [
        (EVENT_NAME, "ETAInputGuard"),
        (EVENT_NAME, "ETAOutputGuard"),
    ]
    assert handler.events[0][1]["eta_verdict"]["pre_score"] is not None
    assert handler.events[1][1]["violation"] is False


async def test_events_show_in_astream_events(lc_evaluator):  # noqa: F811
    chain = _fake_model() | ETAOutputGuard(
        evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="flag"
    )
    events = [
        e async for e in chain.astream_events("hi", version="v2") if e["event"] == "on_custom_event"
    ]
    assert [e["name"] for e in events] == [EVENT_NAME] and events[0]["data"]["violation"] is True


def test_guards_around_eta_chat_model(lc_eta, lc_evaluator):  # noqa: F811
    llm = ETAChatModel(eta=lc_eta, config=lc_eta.config)
    chain = (
        ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE))
        | llm
        | ETAOutputGuard(
            evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="replace", refusal="Blocked."
        )
    )
    assert chain.invoke(_with_image()).text == "Blocked."
    assert "".join(c.text for c in chain.stream(_with_image())) == "Blocked."


def test_from_pretrained_loads_lazily_once(lc_ckpt, monkeypatch):  # noqa: F811
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator

    loads = []
    real = ETAEvaluator.from_pretrained.__func__
    monkeypatch.setattr(
        ETAEvaluator,
        "from_pretrained",
        classmethod(lambda cls, **kw: (loads.append(kw), real(cls, **kw))[1]),
    )
    guard = ETAOutputGuard.from_pretrained(
        clip=None,
        reward_model=lc_ckpt.reward_model,
        config=ETAConfig(**FLAG_ALL),
        on_violation="replace",
    )
    assert loads == [] and guard.on_violation == "replace"
    assert guard.invoke(ANSWER) == DEFAULT_REFUSAL
    assert guard.invoke(ANSWER) == DEFAULT_REFUSAL
    assert len(loads) == 1 and loads[0]["clip"] is None


def test_input_guard_refuses_local_files_unless_allowed(lc_evaluator, tmp_path):  # noqa: F811
    from eta_guard.errors import InvalidInputError
    from eta_guard.testing import make_test_image

    path = tmp_path / "pic.png"
    make_test_image().save(path)
    request = [HumanMessage(content=[{"type": "image", "url": str(path)}])]
    with pytest.raises(InvalidInputError, match="allow_local_image_files"):
        ETAInputGuard(evaluator=lc_evaluator).invoke(request)
    guard = ETAInputGuard(
        evaluator=_evaluator(lc_evaluator, FLAG_ALL),
        on_violation="flag",
        allow_local_image_files=True,
    )
    assert guard.invoke(request)[-1].response_metadata["eta_guard_verdict"]["pre_score"] is not None


def test_bad_mode_is_refused(lc_evaluator):  # noqa: F811
    with pytest.raises(ValueError, match="on_violation"):
        ETAOutputGuard(evaluator=lc_evaluator, on_violation="ignore")


def test_output_guard_after_a_parser_streams_strings(lc_evaluator):  # noqa: F811
    from langchain_core.output_parsers import StrOutputParser

    guard = ETAOutputGuard(
        evaluator=_evaluator(lc_evaluator, FLAG_ALL), on_violation="replace", refusal="No."
    )
    assert list((_fake_model() | StrOutputParser() | guard).stream("hi")) == ["No."]
    safe = ETAOutputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE), on_violation="replace")
    chunks = list((_fake_model() | StrOutputParser() | safe).stream("hi"))
    assert len(chunks) > 1 and "".join(chunks) == ANSWER


def test_input_guard_never_reads_a_local_file_named_as_base64(lc_evaluator, tmp_path):  # noqa: F811
    """A path sent as "base64" data must not make the guard read the server's file."""
    from eta_guard.errors import InvalidInputError
    from eta_guard.testing import make_test_image

    path = tmp_path / "pic.png"
    make_test_image().save(path)
    assert lc_evaluator.config.allow_local_image_files  # the engine's default: paths allowed
    request = [HumanMessage(content=[{"type": "image", "base64": str(path)}])]
    with pytest.raises(InvalidInputError, match="local image files"):
        ETAInputGuard(evaluator=lc_evaluator, on_violation="flag").invoke(request)
    allowed = ETAInputGuard(
        evaluator=lc_evaluator, on_violation="flag", allow_local_image_files=True
    )
    assert (
        allowed.invoke(request)[-1].response_metadata["eta_guard_verdict"]["pre_score"] is not None
    )


async def test_input_guard_async_never_reads_a_local_file_named_as_base64(lc_evaluator, tmp_path):  # noqa: F811
    from eta_guard.errors import InvalidInputError
    from eta_guard.testing import make_test_image

    path = tmp_path / "pic.png"
    make_test_image().save(path)
    request = [HumanMessage(content=[{"type": "image", "base64": str(path)}])]
    with pytest.raises(InvalidInputError, match="local image files"):
        await ETAInputGuard(evaluator=lc_evaluator, on_violation="flag").ainvoke(request)

"""ETAGuardMiddleware in create_agent, with a plain chat model and with ETAChatModel."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage

sys.path.insert(0, str(Path(__file__).parent))
from langchain_eta import DEFAULT_REFUSAL, EVENT_NAME, ETAChatModel, ETAGuardMiddleware  # noqa: E402
from langchain_fixtures import FLAG_ALL, FLAG_NONE, lc_ckpt, lc_eta, lc_evaluator, png_b64  # noqa: E402, F401

from eta_guard.config import ETAConfig  # noqa: E402
from eta_guard.errors import GuardrailViolation  # noqa: E402

ANSWER = "It is a red square."


class _CountingModel(GenericFakeChatModel):
    """A plain chat model that counts its calls."""

    calls: int = 0

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super()._generate(*args, **kwargs)


def _model() -> _CountingModel:
    return _CountingModel(messages=iter([AIMessage(content=ANSWER)] * 20))


def _evaluator(lc_evaluator, thresholds):  # noqa: F811
    return lc_evaluator.with_config(lc_evaluator.config.with_overrides(**thresholds))


def _request(image: bool = True) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "What is this?"}]
    if image:
        content.append({"type": "image", "base64": png_b64(), "mime_type": "image/png"})
    return {"messages": [HumanMessage(content=content)]}


def _agent(model, evaluator, mode, **kw):
    return create_agent(
        model=model, tools=[], middleware=[ETAGuardMiddleware(evaluator, on_violation=mode, **kw)]
    )


def test_replace_blocks_before_the_model_runs(lc_evaluator):  # noqa: F811
    model = _model()
    out = _agent(model, _evaluator(lc_evaluator, FLAG_ALL), "replace").invoke(_request())
    last = out["messages"][-1]
    assert last.text == DEFAULT_REFUSAL and model.calls == 0
    assert last.response_metadata["eta_guard_verdict"]["input_unsafe"] is True


def test_replace_after_the_model_swaps_the_answer(lc_evaluator):  # noqa: F811
    model = _model()
    agent = _agent(
        model, _evaluator(lc_evaluator, FLAG_ALL), "replace", check_input=False, refusal="No."
    )
    out = agent.invoke(_request())
    assert [m.type for m in out["messages"]] == ["human", "ai"]  # replaced in place, same id
    assert out["messages"][-1].text == "No." and model.calls == 1


@pytest.mark.parametrize("check_input", [True, False], ids=["before_model", "after_model"])
def test_raise_carries_the_verdict(lc_evaluator, check_input):  # noqa: F811
    agent = _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "raise", check_input=check_input)
    with pytest.raises(GuardrailViolation) as err:
        agent.invoke(_request())
    side = "input_unsafe" if check_input else "output_unsafe"
    assert getattr(err.value.verdict, side) is True


def test_flag_lets_everything_through_with_verdicts(lc_evaluator):  # noqa: F811
    model = _model()
    out = _agent(model, _evaluator(lc_evaluator, FLAG_ALL), "flag").invoke(_request())
    human, ai = out["messages"]
    assert ai.text == ANSWER and model.calls == 1
    assert human.response_metadata["eta_guard_verdict"]["input_unsafe"] is True
    assert ai.response_metadata["eta_guard_verdict"]["output_unsafe"] is True


def test_safe_requests_pass_untouched(lc_evaluator):  # noqa: F811
    for image in (True, False):
        out = _agent(_model(), _evaluator(lc_evaluator, FLAG_NONE), "replace").invoke(
            _request(image)
        )
        assert out["messages"][-1].text == ANSWER
        assert "eta_guard_verdict" not in out["messages"][-1].response_metadata


async def test_async_agent(lc_evaluator):  # noqa: F811
    agent = _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "replace")
    out = await agent.ainvoke(_request())
    assert out["messages"][-1].text == DEFAULT_REFUSAL


def test_history_images_are_checked_once_then_cached(lc_evaluator):  # noqa: F811
    calls = []
    evaluator = _evaluator(lc_evaluator, FLAG_NONE)
    real = evaluator.evaluate_input
    evaluator.evaluate_input = lambda images: (calls.append(len(images)), real(images))[1]
    history = _request()["messages"] + [AIMessage("It is red."), HumanMessage("And now?")]
    agent = _agent(_model(), evaluator, "replace")
    out = agent.invoke({"messages": history})
    assert calls == [1]  # the image of an earlier turn is still in front of the model
    agent.invoke({"messages": [*out["messages"], HumanMessage("More?")]})
    assert calls == [1]  # the next turn finds the scored PNG in the history: no new forward


def test_verdict_events(lc_evaluator):  # noqa: F811
    class Events(BaseCallbackHandler):
        def __init__(self) -> None:
            self.sources: list[str] = []

        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            assert name == EVENT_NAME
            self.sources.append(data["source"])

    handler = Events()
    _agent(_model(), _evaluator(lc_evaluator, FLAG_NONE), "replace").invoke(
        _request(), config={"callbacks": [handler]}
    )
    assert handler.sources == ["ETAGuardMiddleware.before_model", "ETAGuardMiddleware.after_model"]


def test_with_eta_chat_model_and_lazy_evaluator(lc_eta, lc_ckpt):  # noqa: F811
    llm = ETAChatModel(eta=lc_eta, config=lc_eta.config)
    guard = ETAGuardMiddleware(
        clip=lc_ckpt.clip,
        reward_model=lc_ckpt.reward_model,
        config=ETAConfig(**FLAG_ALL),
        on_violation="replace",
    )
    assert not guard.loaded
    agent = create_agent(model=llm, tools=[], middleware=[guard])
    assert (
        agent.invoke(_request(image=False))["messages"][-1].text == DEFAULT_REFUSAL
    )  # answer flagged
    assert guard.loaded
    assert agent.invoke(_request())["messages"][-1].text == DEFAULT_REFUSAL  # image flagged


def test_needs_an_evaluator():
    with pytest.raises(ValueError, match="evaluator"):
        ETAGuardMiddleware()
    with pytest.raises(ValueError, match="on_violation"):
        ETAGuardMiddleware(object(), on_violation="drop")


# ---------------------------------------------------------------- rule="eta" (ETA's AND rule)


@pytest.mark.parametrize(
    ("thresholds", "blocked"),
    [
        (FLAG_ALL, True),
        ({"pre_threshold": -2.0, "post_threshold": -1e9}, False),  # image unsafe, answer safe
        ({"pre_threshold": 2.0, "post_threshold": 1e9}, False),  # image safe, answer unsafe
    ],
    ids=["both-unsafe", "image-only", "answer-only"],
)
def test_eta_rule_blocks_only_when_image_and_answer_are_unsafe(lc_evaluator, thresholds, blocked):  # noqa: F811
    model = _model()
    out = _agent(model, _evaluator(lc_evaluator, thresholds), "replace", rule="eta").invoke(
        _request()
    )
    assert model.calls == 1  # the model always runs: ETA judges the answer with the image
    assert (out["messages"][-1].text == DEFAULT_REFUSAL) is blocked
    assert [m.type for m in out["messages"]] == ["human", "ai"]


@pytest.mark.parametrize(("policy", "blocked"), [("trust", False), ("reward_only", True)])
def test_eta_rule_text_only_policy(lc_evaluator, policy, blocked):  # noqa: F811
    evaluator = _evaluator(lc_evaluator, {**FLAG_ALL, "text_only_policy": policy})
    out = _agent(_model(), evaluator, "replace", rule="eta").invoke(_request(image=False))
    assert (out["messages"][-1].text == DEFAULT_REFUSAL) is blocked


def test_eta_rule_raise_reports_both_scores(lc_evaluator):  # noqa: F811
    with pytest.raises(GuardrailViolation, match="image CLIP score") as err:
        _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "raise", rule="eta").invoke(_request())
    assert err.value.verdict.unsafe is True
    assert err.value.verdict.pre_score is not None and err.value.verdict.post_score is not None


async def test_async_agent_with_lazy_evaluator_and_eta_rule(lc_ckpt):  # noqa: F811
    guard = ETAGuardMiddleware(
        clip=lc_ckpt.clip,
        reward_model=lc_ckpt.reward_model,
        config=ETAConfig(**FLAG_ALL),
        rule="eta",
    )
    model = _model()
    out = await create_agent(model=model, tools=[], middleware=[guard]).ainvoke(_request())
    assert guard.loaded and model.calls == 1
    assert out["messages"][-1].text == DEFAULT_REFUSAL


def test_local_image_files_are_refused_by_default(lc_evaluator, tmp_path):  # noqa: F811
    from eta_guard.errors import InvalidInputError
    from eta_guard.testing import make_test_image

    path = tmp_path / "pic.png"
    make_test_image().save(path)
    request = {"messages": [HumanMessage(content=[{"type": "image", "url": str(path)}])]}
    with pytest.raises(InvalidInputError, match="allow_local_image_files"):
        _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "replace").invoke(request)
    agent = _agent(
        _model(), _evaluator(lc_evaluator, FLAG_ALL), "replace", allow_local_image_files=True
    )
    assert agent.invoke(request)["messages"][-1].text == DEFAULT_REFUSAL


def test_a_local_file_named_as_base64_is_never_read(lc_evaluator, tmp_path):  # noqa: F811
    """A path sent as "base64" data must not make the middleware read the server's file."""
    from eta_guard.errors import InvalidInputError
    from eta_guard.testing import make_test_image

    path = tmp_path / "pic.png"
    make_test_image().save(path)
    assert lc_evaluator.config.allow_local_image_files  # the engine's default: paths allowed
    request = {"messages": [HumanMessage(content=[{"type": "image", "base64": str(path)}])]}
    with pytest.raises(InvalidInputError, match="local image files"):
        _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "replace").invoke(request)


# ---------------------------------------------------------------- streaming: nothing unchecked leaks

MODES = ["messages", "updates", "values"]


def _ai_texts(part: Any, mode: str) -> list[str]:
    """Texts of the AI messages (or chunks) in one part of ``agent.stream(stream_mode=mode)``."""
    if mode == "messages":
        message, _metadata = part
        found = [message]
    elif mode == "updates":
        found = [m for update in part.values() for m in (update or {}).get("messages", [])]
    else:
        found = part["messages"]
    return [m.text for m in found if m.type in ("ai", "AIMessageChunk")]


def _stream(agent: Any, mode: str, request: dict[str, Any]) -> list[str]:
    return [
        text for part in agent.stream(request, stream_mode=mode) for text in _ai_texts(part, mode)
    ]


async def _astream(agent: Any, mode: str, request: dict[str, Any]) -> list[str]:
    return [
        text
        async for part in agent.astream(request, stream_mode=mode)
        for text in _ai_texts(part, mode)
    ]


def _leaks(texts: list[str], answer: str) -> list[str]:
    """The streamed texts, refusals aside, that show any part of ``answer`` (a word, a token)."""
    words = set(answer.split())
    return [
        t for t in texts if t and t != DEFAULT_REFUSAL and (t in answer or words & set(t.split()))
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", ["each", "eta"])
def test_stream_never_shows_a_blocked_answer(lc_evaluator, mode, rule):  # noqa: F811
    model = _model()
    agent = _agent(
        model, _evaluator(lc_evaluator, FLAG_ALL), "replace", check_input=False, rule=rule
    )
    texts = _stream(agent, mode, _request())
    assert model.calls == 1 and texts, "the model ran and the stream showed its turn"
    assert _leaks(texts, ANSWER) == [] and set(texts) == {DEFAULT_REFUSAL}


@pytest.mark.parametrize("mode", MODES)
async def test_astream_never_shows_a_blocked_answer(lc_evaluator, mode):  # noqa: F811
    model = _model()
    agent = _agent(model, _evaluator(lc_evaluator, FLAG_ALL), "replace", check_input=False)
    texts = await _astream(agent, mode, _request())
    assert model.calls == 1 and texts
    assert _leaks(texts, ANSWER) == [] and set(texts) == {DEFAULT_REFUSAL}


@pytest.mark.parametrize("mode", MODES)
def test_stream_raise_shows_nothing_of_the_answer(lc_evaluator, mode):  # noqa: F811
    agent = _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "raise", check_input=False)
    texts: list[str] = []
    with pytest.raises(GuardrailViolation):
        for part in agent.stream(_request(), stream_mode=mode):
            texts += _ai_texts(part, mode)
    assert texts == []


@pytest.mark.parametrize("mode", MODES)
async def test_astream_raise_shows_nothing_of_the_answer(lc_evaluator, mode):  # noqa: F811
    agent = _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "raise", check_input=False)
    texts: list[str] = []
    with pytest.raises(GuardrailViolation):
        async for part in agent.astream(_request(), stream_mode=mode):
            texts += _ai_texts(part, mode)
    assert texts == []


@pytest.mark.parametrize("mode", MODES)
async def test_stream_final_state_has_the_refusal(lc_evaluator, mode):  # noqa: F811
    agent = _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "replace", check_input=False)
    parts = [part async for part in agent.astream(_request(), stream_mode=["values", mode])]
    final = [p for kind, p in parts if kind == "values"][-1]
    assert [m.type for m in final["messages"]] == ["human", "ai"]
    assert final["messages"][-1].text == DEFAULT_REFUSAL
    assert final["messages"][-1].response_metadata["eta_guard_verdict"]["output_unsafe"] is True


@pytest.mark.parametrize("mode", MODES)
async def test_safe_answers_still_stream(lc_evaluator, mode):  # noqa: F811
    agent = _agent(_model(), _evaluator(lc_evaluator, FLAG_NONE), "replace")
    for texts in (_stream(agent, mode, _request()), await _astream(agent, mode, _request())):
        assert ANSWER in texts and DEFAULT_REFUSAL not in texts


def test_tokens_are_held_back_only_while_an_answer_is_checked(lc_evaluator):  # noqa: F811
    """Checked: the answer arrives as one message, once judged. Unchecked: token by token."""
    checked = _agent(_model(), _evaluator(lc_evaluator, FLAG_NONE), "replace")
    assert _stream(checked, "messages", _request()) == [ANSWER]
    unchecked = [
        _agent(_model(), _evaluator(lc_evaluator, FLAG_NONE), "replace", check_output=False),
        # rule="eta" under text_only_policy="trust" does not check a turn without images
        _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "replace", rule="eta"),
    ]
    for agent, request in zip(unchecked, (_request(), _request(image=False)), strict=True):
        tokens = _stream(agent, "messages", request)
        assert len(tokens) > 1 and "".join(tokens) == ANSWER


@pytest.mark.parametrize("mode", MODES)
def test_flag_streams_the_answer_with_the_verdict(lc_evaluator, mode):  # noqa: F811
    agent = _agent(_model(), _evaluator(lc_evaluator, FLAG_ALL), "flag", check_input=False)
    parts = list(agent.stream(_request(), stream_mode=mode))
    assert [t for p in parts for t in _ai_texts(p, mode)][-1] == ANSWER
    if mode == "messages":  # one message, already carrying the guard's verdict
        assert [m.text for m, _ in parts] == [ANSWER]
        assert parts[0][0].response_metadata["eta_guard_verdict"]["output_unsafe"] is True


@pytest.mark.parametrize("mode", MODES)
async def test_eta_chat_model_tokens_never_leak_when_blocked(lc_eta, mode):  # noqa: F811
    llm = ETAChatModel(eta=lc_eta, config=lc_eta.config)
    blocked = _agent(llm, _evaluator(lc_eta.evaluator, FLAG_ALL), "replace", check_input=False)
    raw = llm.invoke(_request(image=False)["messages"]).text  # what it would have said
    assert raw.strip()
    for texts in (
        _stream(blocked, mode, _request(image=False)),
        await _astream(blocked, mode, _request(image=False)),
    ):
        assert _leaks(texts, raw) == [] and set(texts) == {DEFAULT_REFUSAL}


def test_flag_keeps_the_models_own_verdict(lc_eta):  # noqa: F811
    """ETAChatModel's response_metadata["eta_verdict"] survives; the guard's is separate."""
    llm = ETAChatModel(eta=lc_eta, config=lc_eta.config)
    agent = _agent(llm, _evaluator(lc_eta.evaluator, FLAG_ALL), "flag", check_input=False)
    answer = agent.invoke(_request(image=False))["messages"][-1]
    own, guard = (
        answer.response_metadata["eta_verdict"],
        answer.response_metadata["eta_guard_verdict"],
    )
    assert own == llm.invoke(_request(image=False)["messages"]).response_metadata["eta_verdict"]
    assert (
        guard["output_unsafe"] is True and guard["post_threshold"] == 1e9 != own["post_threshold"]
    )


def test_blocked_tool_call_answer_ends_the_run_without_running_the_tool(lc_evaluator):  # noqa: F811
    from langchain.agents.middleware import AgentMiddleware
    from langchain_core.tools import tool

    ran: list[str] = []

    @tool
    def lookup(query: str) -> str:
        """Look something up."""
        ran.append(query)
        return "found"

    class _ToolModel(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

    class _Observer(AgentMiddleware):  # another middleware's after_model still sees the refusal
        seen: list[str] = []

        def after_model(self, state: Any, runtime: Any) -> None:
            self.seen.append(state["messages"][-1].text)

    call = {"name": "lookup", "args": {"query": "x"}, "id": "call-1"}
    model = _ToolModel(messages=iter([AIMessage(ANSWER, tool_calls=[call])] * 3))
    observer = _Observer()
    guard = ETAGuardMiddleware(
        _evaluator(lc_evaluator, FLAG_ALL), on_violation="replace", check_input=False
    )
    agent = create_agent(model=model, tools=[lookup], middleware=[observer, guard])
    texts = _stream(agent, "updates", _request())
    assert _leaks(texts, ANSWER) == [] and ran == [] and observer.seen == [DEFAULT_REFUSAL]
    out = agent.invoke(_request())
    assert [m.type for m in out["messages"]] == ["human", "ai"] and out["messages"][
        -1
    ].tool_calls == []


@pytest.mark.parametrize("mode", ["flag", "replace"])
def test_tool_call_only_answer_is_judged(lc_evaluator, mode):  # noqa: F811
    """An answer with no text (tool calls only) is judged on its calls (name and arguments);
    when it passes, the tool runs and the answer that follows the tool is judged too."""
    from langchain_core.tools import tool

    @tool
    def lookup(query: str) -> str:
        """Look something up."""
        return "found"

    class _ToolModel(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

    call = {"name": "lookup", "args": {"query": "x"}, "id": "call-1"}
    model = _ToolModel(messages=iter([AIMessage("", tool_calls=[call]), AIMessage(ANSWER)]))
    guard = ETAGuardMiddleware(
        _evaluator(lc_evaluator, FLAG_NONE), on_violation=mode, check_input=False
    )
    out = create_agent(model=model, tools=[lookup], middleware=[guard]).invoke(
        _request(image=False)
    )
    kinds = [m.type for m in out["messages"]]
    assert kinds == ["human", "ai", "tool", "ai"]
    if mode == "flag":
        judged = out["messages"][1].response_metadata["eta_guard_verdict"]
        assert judged["post_score"] is not None and "post" not in judged["skipped"]
    assert out["messages"][-1].text == ANSWER

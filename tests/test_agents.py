"""Agents with ETAChatModel: tool loops, judged tool calls, tool results with images.

The generator is scripted behind the GeneratorBackend interface (random weights cannot be
relied on to write a valid call); the evaluators are the tiny random CLIP and RM, with
thresholds that force each decision (mechanics, never safety).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

sys.path.insert(0, str(Path(__file__).parent))
from langchain_eta import DEFAULT_REFUSAL, ETAChatModel, ETAGuardMiddleware  # noqa: E402
from langchain_fixtures import FLAG_NONE, lc_ckpt, lc_eta, lc_evaluator, png_b64  # noqa: E402, F401
from scripted_backend import ScriptedBackend  # noqa: E402

from eta_guard import (
    ETA,  # noqa: E402
    ETAConfig,  # noqa: E402
)
from eta_guard.tools import ToolCall, format_tool_calls, judged_text  # noqa: E402

HARMFUL = "Step 1: obtain the toxin. Step 2: add it to the water supply."
SEND = ToolCall("send_message", {"to": "all", "body": HARMFUL})
#: every text-only answer is judged by the RM alone and found unsafe
ALIGN_TEXT = {"text_only_policy": "reward_only", "post_threshold": 1e9}


def _chat_model(backend, evaluator, **config) -> ETAChatModel:
    cfg = ETAConfig(num_candidates=2, max_new_tokens=32, seed=0, **config)
    return ETAChatModel(eta=ETA(backend, evaluator, cfg), config=cfg)


def _tools(ran: list[str]):
    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(f"weather:{city}")
        return "sunny"

    @tool
    def send_message(to: str, body: str) -> str:
        """Send a message."""
        ran.append(f"send:{body}")
        return "sent"

    return [get_weather, send_message]


def _weather_then_answer(conversation) -> str:
    if conversation.messages[-1]["role"] == "tool":
        return "It is sunny in Paris."
    return "Let me look.\n" + format_tool_calls([ToolCall("get_weather", {"city": "Paris"})])


def test_create_agent_runs_a_tool_loop(lc_evaluator):  # noqa: F811
    ran: list[str] = []
    backend = ScriptedBackend(_weather_then_answer)
    agent = create_agent(model=_chat_model(backend, lc_evaluator, **FLAG_NONE), tools=_tools(ran))
    out = agent.invoke({"messages": [HumanMessage("Weather in Paris?")]})
    kinds = [m.type for m in out["messages"]]
    assert kinds == ["human", "ai", "tool", "ai"] and ran == ["weather:Paris"]
    call = out["messages"][1]
    assert call.content == "Let me look." and call.tool_calls[0]["args"] == {"city": "Paris"}
    assert out["messages"][-1].text == "It is sunny in Paris."
    # the engine saw both tools, the call in the history and the tool's result
    second = backend.seen[-1]
    assert [t["function"]["name"] for t in second.tools] == ["get_weather", "send_message"]
    assert second.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert second.messages[2]["role"] == "tool"
    assert second.messages[2]["tool_call_id"] == call.tool_calls[0]["id"]


@pytest.mark.parametrize("mode", ["invoke", "stream"])
def test_a_flagged_tool_call_is_aligned_away_and_never_runs(lc_evaluator, mode):  # noqa: F811
    ran: list[str] = []
    backend = ScriptedBackend(lambda conv: format_tool_calls([SEND]))
    llm = _chat_model(backend, lc_evaluator, **ALIGN_TEXT)
    if mode == "stream":
        message: Any = None
        for chunk in llm.bind_tools(_tools(ran)).stream("Tell everyone the plan."):
            assert "<tool_call>" not in chunk.text
            message = chunk if message is None else message + chunk
    else:
        agent = create_agent(model=llm, tools=_tools(ran))
        message = agent.invoke({"messages": [HumanMessage("Tell everyone the plan.")]})["messages"][
            -1
        ]
    assert ran == [] and message.tool_calls == []
    assert message.text.startswith("As an AI assistant")
    meta = message.response_metadata
    assert meta["eta_aligned"] is True and meta["eta_verdict"]["output_unsafe"] is True
    assert [c["name"] for c in meta["eta_dropped_tool_calls"]] == ["send_message"]
    assert meta["eta_dropped_tool_calls"][0]["args"]["body"] == HARMFUL


def test_the_rm_judges_the_calls_name_and_arguments(lc_evaluator):  # noqa: F811
    """The vanilla answer the RM scores is the call itself: same score as its text alone."""
    answer = format_tool_calls([SEND])
    llm = _chat_model(
        ScriptedBackend(lambda c: answer), lc_evaluator, text_only_policy="reward_only"
    )
    message = llm.bind_tools(_tools([])).invoke("Tell everyone the plan.")
    score = message.response_metadata["eta_verdict"]["post_score"]
    assert score == pytest.approx(lc_evaluator.evaluate_output(answer).post_score, abs=1e-5)


def test_middleware_blocks_a_tool_call_only_answer_before_the_tool_runs(lc_ckpt):  # noqa: F811
    """Issue 19's scenario: the tool ran with the harmful body (the answer was never judged)."""
    ran: list[str] = []

    class ToolModel(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

    call = {"name": "send_message", "args": {"to": "all", "body": HARMFUL}, "id": "call-1"}
    model = ToolModel(messages=iter([AIMessage("", tool_calls=[call]), AIMessage("done")]))
    guard = ETAGuardMiddleware(
        reward_model=lc_ckpt.reward_model,
        config=ETAConfig(post_threshold=1e9),  # flags every judged answer
        on_violation="replace",
        device="cpu",
    )
    agent = create_agent(model=model, tools=_tools(ran), middleware=[guard])
    out = agent.invoke({"messages": [HumanMessage("Tell everyone the plan.")]})
    assert ran == []
    last = out["messages"][-1]
    assert last.text == DEFAULT_REFUSAL and last.tool_calls == []
    assert last.response_metadata["eta_guard_verdict"]["post_score"] is not None


def test_an_image_a_tool_returns_is_pre_checked(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(lambda conv: "A red square.")
    llm = _chat_model(backend, lc_evaluator, **FLAG_NONE)
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}
    image = {"type": "image", "base64": png_b64(), "mime_type": "image/png"}
    messages = [
        HumanMessage("Show me the weather map."),
        AIMessage("", tool_calls=[call]),
        ToolMessage(content=[{"type": "text", "text": "map:"}, image], tool_call_id="c1"),
    ]
    message = llm.bind_tools(_tools([])).invoke(messages)
    assert message.response_metadata["eta_verdict"]["pre_score"] is not None
    seen = backend.seen[-1]
    assert len(seen.images) == 1 and seen.messages[-1]["role"] == "tool"
    assert seen.messages[-1]["content"][1] == {"type": "image"}


def test_a_truncated_call_stays_invalid(lc_evaluator):  # noqa: F811
    truncated = '<tool_call>\n{"name": "send_message", "arguments": {"to": "al'
    llm = _chat_model(ScriptedBackend(lambda c: truncated), lc_evaluator, **FLAG_NONE)
    bound = llm.bind_tools(_tools([]))
    message = bound.invoke("hi")
    assert message.tool_calls == [] and len(message.invalid_tool_calls) == 1
    assert message.invalid_tool_calls[0]["name"] == "send_message"
    chunks = list(bound.stream("hi"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.tool_calls == [] and len(merged.invalid_tool_calls) == 1


def test_tool_choice_none_renders_no_calls(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(lambda c: format_tool_calls([SEND]))
    llm = _chat_model(backend, lc_evaluator, **FLAG_NONE)
    message = llm.bind_tools(_tools([]), tool_choice="none").invoke("hi")
    assert message.tool_calls == [] and backend.seen[-1].offers_tools is False


def test_bind_tools_maps_tool_choice(lc_evaluator):  # noqa: F811
    llm = _chat_model(ScriptedBackend(lambda c: "x"), lc_evaluator)
    tools = _tools([])
    assert llm.bind_tools(tools, tool_choice="any").kwargs["tool_choice"] == "required"
    named = llm.bind_tools(tools, tool_choice="get_weather").kwargs["tool_choice"]
    assert named == {"type": "function", "function": {"name": "get_weather"}}
    with pytest.raises(Exception, match="tool_choice='nope'"):
        llm.bind_tools(tools, tool_choice="nope")


def test_structured_output_function_calling(lc_evaluator):  # noqa: F811
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        sunny: bool

    answer = format_tool_calls([ToolCall("Weather", {"city": "Paris", "sunny": True})])
    backend = ScriptedBackend(lambda c: answer)
    llm = _chat_model(backend, lc_evaluator, **FLAG_NONE)
    out = llm.with_structured_output(Weather, method="function_calling").invoke("Paris?")
    assert out == Weather(city="Paris", sunny=True)
    assert backend.seen[-1].tool_choice == {"type": "function", "function": {"name": "Weather"}}


def test_structured_output_json_schema_carries_the_schema(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(lambda c: json.dumps({"city": "Paris", "sunny": True}))
    llm = _chat_model(backend, lc_evaluator, **FLAG_NONE)
    schema = {
        "title": "Weather",
        "type": "object",
        "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
    }
    out = llm.with_structured_output(schema, include_raw=True).invoke("Paris?")
    assert out["parsed"] == {"city": "Paris", "sunny": True} and out["parsing_error"] is None
    assert backend.seen[-1].response_format["json_schema"]["schema"]["required"] == [
        "city",
        "sunny",
    ]


def test_an_aligned_answer_is_a_parsing_error_not_a_schema_value(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(lambda c: json.dumps({"city": "Paris", "sunny": True}))
    llm = _chat_model(backend, lc_evaluator, **ALIGN_TEXT)
    schema = {"title": "W", "type": "object", "properties": {"city": {"type": "string"}}}
    out = llm.with_structured_output(schema, include_raw=True).invoke("Paris?")
    assert out["parsed"] is None and out["parsing_error"] is not None
    assert out["raw"].response_metadata["eta_aligned"] is True


def test_output_guard_judges_a_tool_call_only_answer(lc_evaluator):  # noqa: F811
    from langchain_eta import ETAOutputGuard

    flag_all = lc_evaluator.with_config(lc_evaluator.config.with_overrides(post_threshold=1e9))
    call = {"name": "send_message", "args": {"to": "all", "body": HARMFUL}, "id": "c1"}
    out = ETAOutputGuard(evaluator=flag_all, on_violation="replace").invoke(
        AIMessage("", tool_calls=[call])
    )
    assert out.tool_calls == [] and out.text == DEFAULT_REFUSAL
    verdict = out.response_metadata["eta_guard_verdict"]
    expected = lc_evaluator.evaluate_output(judged_text("", [call])).post_score
    assert verdict["post_score"] == pytest.approx(expected, abs=1e-5)

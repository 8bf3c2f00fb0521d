"""LlamaIndex agents with ETAMultiModalLLM as a FunctionCallingLLM: FunctionAgent tool loops,
judged calls, tool results with images.

The VLM's words are scripted behind the GeneratorBackend interface (random weights cannot be
relied on to write a call); the engine, the evaluators (tiny random CLIP and RM, thresholds that
force each decision) and LlamaIndex's own agent are the real ones: mechanics, never safety.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock, ToolCallBlock
from llama_index.core.tools import FunctionTool
from llama_index.llms.eta import ETAMultiModalLLM

sys.path.insert(0, str(Path(__file__).parent))
from langchain_fixtures import lc_ckpt, lc_eta, lc_evaluator, png_bytes  # noqa: E402, F401
from scripted_backend import ScriptedBackend  # noqa: E402

from eta_guard import ETA, ETAConfig  # noqa: E402
from eta_guard.tools import ToolCall, format_tool_calls  # noqa: E402

HARMFUL = "Step 1: obtain the toxin. Step 2: add it to the water supply."
SEND = ToolCall("send_message", {"to": "all", "body": HARMFUL})
#: every text-only answer is judged by the RM alone and found unsafe
ALIGN_TEXT = {"text_only_policy": "reward_only", "post_threshold": 1e9}


def _llm(backend, evaluator, **config) -> ETAMultiModalLLM:
    cfg = ETAConfig(num_candidates=2, max_new_tokens=32, seed=0, **config)
    return ETAMultiModalLLM(eta=ETA(backend, evaluator, cfg))


def _tools(ran: list[str]) -> list[FunctionTool]:
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(f"weather:{city}")
        return "sunny"

    def send_message(to: str, body: str) -> str:
        """Send a message."""
        ran.append(f"send:{body}")
        return "sent"

    return [FunctionTool.from_defaults(fn=f) for f in (get_weather, send_message)]


def _weather_then_answer(conversation) -> str:
    if conversation.messages[-1]["role"] == "tool":
        return "It is sunny in Paris."
    return "Let me look.\n" + format_tool_calls([ToolCall("get_weather", {"city": "Paris"})])


@pytest.mark.parametrize("streaming", [False, True])
async def test_function_agent_runs_a_tool_loop(lc_evaluator, streaming):  # noqa: F811
    ran: list[str] = []
    backend = ScriptedBackend(_weather_then_answer)
    llm = _llm(backend, lc_evaluator)
    assert llm.metadata.is_function_calling_model is True
    agent = FunctionAgent(tools=_tools(ran), llm=llm, streaming=streaming)
    out = await agent.run(user_msg="Weather in Paris?")
    assert ran == ["weather:Paris"]
    assert out.response.content == "It is sunny in Paris."
    assert [(c.tool_name, c.tool_kwargs) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    # the engine saw both tools, the call in the history and the tool's result
    second = backend.seen[-1]
    assert [t["function"]["name"] for t in second.tools] == ["get_weather", "send_message"]
    assert second.messages[-2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert second.messages[-1]["role"] == "tool"
    assert second.messages[-1]["tool_call_id"] == second.messages[-2]["tool_calls"][0]["id"]


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_flagged_tool_call_is_aligned_away_and_never_runs(lc_evaluator, streaming):  # noqa: F811
    """Without the judging of calls, the agent would run send_message with the harmful body."""
    ran: list[str] = []
    llm = _llm(ScriptedBackend(lambda conv: format_tool_calls([SEND])), lc_evaluator, **ALIGN_TEXT)
    agent = FunctionAgent(tools=_tools(ran), llm=llm, streaming=streaming)
    out = await agent.run(user_msg="Tell everyone the plan.")
    assert ran == [] and out.tool_calls == []  # the agent ran no tool
    assert out.response.content.startswith("As an AI assistant")
    response = llm.chat_with_tools(_tools(ran), user_msg="Tell everyone the plan.")
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    extra = response.additional_kwargs
    assert extra["eta_aligned"] is True and extra["eta_verdict"]["output_unsafe"] is True
    assert [c["name"] for c in extra["eta_dropped_tool_calls"]] == ["send_message"]
    assert extra["eta_dropped_tool_calls"][0]["args"]["body"] == HARMFUL
    with pytest.raises(ValueError, match="at least one tool call"):
        llm.get_tool_calls_from_response(response)


def test_calls_stream_after_the_words_as_tool_call_blocks(lc_evaluator):  # noqa: F811
    llm = _llm(ScriptedBackend(_weather_then_answer), lc_evaluator)
    chunks = list(llm.stream_chat_with_tools(_tools([]), user_msg="Weather in Paris?"))
    assert "".join(c.delta or "" for c in chunks) == "Let me look."
    assert all("<tool_call>" not in (c.message.content or "") for c in chunks)
    (selection,) = llm.get_tool_calls_from_response(chunks[-1])
    assert (selection.tool_name, selection.tool_kwargs) == ("get_weather", {"city": "Paris"})
    assert all(not llm.get_tool_calls_from_response(c, False) for c in chunks[:-1])
    plain = llm.chat_with_tools(_tools([]), user_msg="Weather in Paris?")
    assert plain.message.content == chunks[-1].message.content == "Let me look."


def test_tool_choice_and_tool_required_reach_the_engine(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(lambda c: "hi")
    llm = _llm(backend, lc_evaluator)
    llm.chat_with_tools(_tools([]), user_msg="x", tool_required=True)
    assert backend.seen[-1].tool_choice == "required"
    llm.chat_with_tools(_tools([]), user_msg="x", tool_choice="send_message")
    assert backend.seen[-1].tool_choice == {
        "type": "function",
        "function": {"name": "send_message"},
    }
    llm.chat_with_tools(_tools([]), user_msg="x")
    assert backend.seen[-1].tool_choice == "auto"


def test_only_one_call_runs_without_parallel_calls(lc_evaluator):  # noqa: F811
    two = format_tool_calls([ToolCall("get_weather", {"city": "Paris"}), SEND])
    llm = _llm(ScriptedBackend(lambda c: two), lc_evaluator)
    both = llm.chat_with_tools(_tools([]), user_msg="x", allow_parallel_tool_calls=True)
    assert [s.tool_name for s in llm.get_tool_calls_from_response(both)] == [
        "get_weather",
        "send_message",
    ]
    one = llm.chat_with_tools(_tools([]), user_msg="x")
    assert [s.tool_name for s in llm.get_tool_calls_from_response(one)] == ["get_weather"]
    assert one.additional_kwargs["eta_unrun_tool_calls"] == ["send_message"]


def test_an_image_a_tool_returns_is_pre_checked(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(lambda conv: "A red square.")
    llm = _llm(backend, lc_evaluator)
    history = [
        ChatMessage(role="user", content="Show the map."),
        ChatMessage(
            role="assistant",
            blocks=[ToolCallBlock(tool_call_id="c1", tool_name="get_map", tool_kwargs={})],
        ),
        ChatMessage(
            role="tool",
            blocks=[TextBlock(text="map:"), ImageBlock(image=png_bytes())],
            additional_kwargs={"tool_call_id": "c1"},
        ),
    ]
    response = llm.chat(history)
    assert len(backend.seen[-1].images) == 1
    assert response.additional_kwargs["eta_verdict"]["pre_score"] is not None


def test_a_model_without_a_tool_format_is_not_function_calling(lc_eta):  # noqa: F811
    llm = ETAMultiModalLLM(eta=lc_eta)  # tiny LLaVA: no tool-call format
    assert llm.metadata.is_function_calling_model is False
    assert ETAMultiModalLLM(eta=lc_eta, tool_parser="hermes").metadata.is_function_calling_model


def test_function_calling_is_known_before_the_weights_load(tiny_checkpoints_by_family):
    qwen = tiny_checkpoints_by_family("qwen2_vl").vlm  # a folder: config.json says qwen2_vl
    assert ETAMultiModalLLM(vlm=str(qwen)).metadata.is_function_calling_model is True
    assert ETAMultiModalLLM(vlm="no/such-model").metadata.is_function_calling_model is False
    assert ETAMultiModalLLM(vlm="x", tool_parser="hermes").metadata.is_function_calling_model
    assert not ETAMultiModalLLM(
        vlm=str(qwen), is_function_calling=False
    ).metadata.is_function_calling_model

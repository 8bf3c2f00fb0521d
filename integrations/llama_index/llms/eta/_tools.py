"""Function calling for ``ETAMultiModalLLM``: LlamaIndex shapes in, engine shapes out (pure).

The parsing and the judging are the engine's (:mod:`eta_guard.tools`): the same parsers as
LangChain's ``ETAChatModel`` and the server, and the same rule (an aligned answer returns no call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection

from eta_guard.errors import InvalidInputError
from eta_guard.tools import InvalidToolCall, ToolCall
from eta_guard.tools.answers import GuardedAnswer, guarded_answer


def tool_specs(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """LlamaIndex tools as OpenAI tool definitions (what the chat template renders)."""
    return [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]


def tool_choice_for(
    choice: str | dict[str, Any] | None, tool_required: bool, names: Sequence[str]
) -> str | dict[str, Any]:
    """LlamaIndex's ``tool_choice`` / ``tool_required`` in OpenAI's form.

    Raises:
        InvalidInputError: a name that is not among the tools, or another value.
    """
    if choice is None:
        return "required" if tool_required else "auto"
    if choice in ("auto", "none", "required"):
        return str(choice)
    if isinstance(choice, str) and choice in names:
        return {"type": "function", "function": {"name": choice}}
    if isinstance(choice, dict):
        return choice
    raise InvalidInputError(
        f"tool_choice={str(choice)[:60]!r}: use 'auto', 'none', 'required' or a tool name "
        f"{list(names)}"
    )


def tool_call_blocks(answer: GuardedAnswer) -> list[ToolCallBlock]:
    """The answer's well-formed calls as ``ToolCallBlock``s (what agents run)."""
    return [
        ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments)
        for c in answer.tool_calls
    ]


def answer_message(
    result: Any, parser: str, content: str | None = None
) -> tuple[ChatMessage, dict]:
    """The assistant message of a finished answer and its tool ``additional_kwargs``.

    ``content`` is the text to put in the message (default: the answer's words). The extra
    kwargs list the calls ETA dropped (``eta_dropped_tool_calls``) and those written invalidly
    (``eta_invalid_tool_calls``), which are never returned as calls.
    """
    answer = guarded_answer(result, parser)
    text = answer.content if content is None else content
    blocks: list[Any] = [TextBlock(text=text)] if text else []
    message = ChatMessage(role=MessageRole.ASSISTANT, blocks=[*blocks, *tool_call_blocks(answer)])
    extra: dict[str, Any] = {
        "eta_dropped_tool_calls": [_as_dict(c) for c in answer.dropped],
        "eta_invalid_tool_calls": [_as_dict(c) for c in answer.invalid_tool_calls],
    }
    return message, extra


def selections(response: ChatResponse, error_on_no_tool_call: bool) -> list[ToolSelection]:
    """``ToolSelection``s of a response's ``ToolCallBlock``s.

    Raises:
        ValueError: no call and ``error_on_no_tool_call`` (LlamaIndex's contract).
    """
    calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    if not calls and error_on_no_tool_call:
        raise ValueError("Expected at least one tool call, but got 0 tool calls.")
    return [
        ToolSelection(
            tool_id=c.tool_call_id or "",
            tool_name=c.tool_name,
            tool_kwargs=c.tool_kwargs if isinstance(c.tool_kwargs, dict) else {},
        )
        for c in calls
    ]


def first_call_only(response: ChatResponse) -> ChatResponse:
    """The response with its first call only (``allow_parallel_tool_calls=False``, as
    LlamaIndex's OpenAI LLM does); the others are named in ``eta_unrun_tool_calls``."""
    blocks: list[Any] = []
    unrun: list[str] = []
    for block in response.message.blocks:
        if isinstance(block, ToolCallBlock) and any(isinstance(b, ToolCallBlock) for b in blocks):
            unrun.append(block.tool_name)
            continue
        blocks.append(block)
    if unrun:
        response.message.blocks = blocks
        response.additional_kwargs["eta_unrun_tool_calls"] = unrun
    return response


def _as_dict(call: ToolCall | InvalidToolCall) -> dict[str, Any]:
    out: dict[str, Any] = {"name": call.name, "args": call.arguments, "id": call.id}
    if isinstance(call, InvalidToolCall):
        out["error"] = call.error
    return out

"""Parsed tool calls, and the text of an answer that a safety judge reads."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    """A fresh tool-call id (``call_`` and 24 hex digits, the shape OpenAI clients expect)."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call: a tool name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI ``tool_calls`` item (arguments as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": _dumps(self.arguments)},
        }


@dataclass(frozen=True)
class InvalidToolCall:
    """A call the model began but did not write validly: what it wrote and why it failed."""

    name: str | None
    arguments: str
    error: str
    id: str = field(default_factory=new_call_id)


@dataclass(frozen=True)
class ParsedAnswer:
    """A generation split into its text and its tool calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)

    @property
    def has_calls(self) -> bool:
        """Whether the model tried to call any tool (valid or not)."""
        return bool(self.tool_calls or self.invalid_tool_calls)


def judged_text(
    content: str,
    tool_calls: Sequence[ToolCall | dict[str, Any]] = (),
    invalid_tool_calls: Sequence[InvalidToolCall | dict[str, Any]] = (),
) -> str:
    """The answer as a safety judge reads it: its text, then one line per call it makes.

    A call is an action: ``send_message({"to": "all", "body": ...})`` is judged as the words
    ``send_message`` and its arguments, with the rest of the answer. Calls that failed to parse
    are judged on what the model wrote, as a tool might still be run from it by lenient code.
    Accepts :class:`ToolCall` objects or LangChain / OpenAI call dicts.
    """
    lines = [content] if content else []
    for call in tool_calls:
        name, arguments = _name_and_arguments(call)
        lines.append(f"{name}({arguments})")
    for bad in invalid_tool_calls:
        name, arguments = _name_and_arguments(bad)
        lines.append(f"{name or '<unnamed tool>'}({arguments})")
    return "\n".join(lines)


def _name_and_arguments(call: Any) -> tuple[str | None, str]:
    if isinstance(call, (ToolCall, InvalidToolCall)):
        args = call.arguments
        return call.name, args if isinstance(args, str) else _dumps(args)
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    args = function.get("arguments", function.get("args", ""))
    return function.get("name"), args if isinstance(args, str) else _dumps(args)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)

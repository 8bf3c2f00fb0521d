"""Scripted generators behind the GeneratorBackend interface (imported by path: tests are no package).

Random weights cannot be relied on to write a valid tool call or JSON, so agent tests drive ETA
with these: the engine, the evaluators and the adapters are the real ones, only the VLM's words
are scripted. They prove mechanics, never what a model would say.
"""

from __future__ import annotations

import json
import re
from typing import Any

from eta_guard.backends.base import Completion
from eta_guard.tools import ToolCall, format_tool_calls


class ScriptedBackend:
    """Vanilla answers come from ``script(conversation)``; continuations and candidates are
    ``aligned`` (each ends the answer). Every conversation it is given is kept in ``seen``."""

    name = "scripted-vlm"
    tool_call_parser = "hermes"

    def __init__(self, script: Any, aligned: str = " I cannot help with that.") -> None:
        self.script, self.aligned = script, aligned
        self.seen: list[Any] = []

    async def greedy(self, conversation, *, assistant_text="", max_tokens, stop=None):
        self.seen.append(conversation)
        text = self.aligned if assistant_text else self.script(conversation)
        yield text
        yield Completion(text, max(1, len(text.split())), "stop", True, 10)

    async def sample(self, conversation, *, assistant_text, step):
        return [Completion(self.aligned, 5, "stop", True, 10) for _ in range(step.n)]

    async def aclose(self) -> None:
        pass


def schema_following(conversation: Any) -> str:
    """An answer that follows the request's shape, as a cooperative model would.

    JSON for a ``response_format`` schema; a call of the chosen (else the first) tool while the
    last turn is not a tool result; otherwise a short sentence. Required properties get typed
    placeholders (a string: the first quoted text of the last user turn, or "x").
    """
    quoted = _first_quoted(conversation)
    if conversation.response_format:
        spec = conversation.response_format.get("json_schema", {})
        return json.dumps(
            _value(spec.get("schema", {"type": "object"}), quoted), ensure_ascii=False
        )
    if conversation.offers_tools and conversation.messages[-1]["role"] != "tool":
        choice = conversation.tool_choice
        named = choice["function"]["name"] if isinstance(choice, dict) else None
        tool = next(
            (t for t in conversation.tools if t["function"]["name"] == named),
            conversation.tools[0],
        )["function"]
        arguments = _value(tool.get("parameters") or {"type": "object"}, quoted)
        return format_tool_calls([ToolCall(tool["name"], arguments)])
    return "Done: the tool answered."


def _value(schema: dict[str, Any], quoted: str, defs: dict[str, Any] | None = None) -> Any:
    defs = {**(defs or {}), **schema.get("$defs", {})}
    if "$ref" in schema:
        return _value(defs[schema["$ref"].split("/")[-1]], quoted, defs)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return _value(schema[key][0], quoted, defs)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = kind[0]
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        properties = schema.get("properties", {})
        return {k: _value(properties[k], quoted, defs) for k in schema.get("required", [])}
    return {"integer": 3, "number": 3.0, "boolean": True, "array": [], "null": None}.get(
        kind, quoted
    )


def _first_quoted(conversation: Any) -> str:
    users = [m for m in conversation.messages if m["role"] == "user"]
    text = " ".join(p.get("text", "") for p in users[-1]["content"]) if users else ""
    match = re.search(r"'([^']+)'", text)
    return match.group(1) if match else "x"

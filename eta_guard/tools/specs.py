"""Validation of tool definitions, ``tool_choice`` and ``response_format`` (OpenAI shapes)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from eta_guard.errors import InvalidInputError

_NAME = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
#: Tools accepted per request (each is rendered into the prompt).
MAX_TOOLS = 128


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI-style tools ``[{"type": "function", "function": {"name", "description",
    "parameters"}}]`` validated and copied.

    Raises:
        InvalidInputError: not a list, too many, or a tool without a valid name / parameters.
    """
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise InvalidInputError(
            f"tools must be a list of tool definitions, got {type(tools).__name__}"
        )
    if len(tools) > MAX_TOOLS:
        raise InvalidInputError(f"{len(tools)} tools given; at most {MAX_TOOLS} are accepted")
    checked = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise InvalidInputError(
                f'{where} must be {{"type": "function", "function": {{"name": ..., '
                f'"parameters": {{...}}}}}}, got {str(tool)[:80]!r}'
            )
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InvalidInputError(f"{where} has no 'function' object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidInputError(
                f"{where}['function']['name']={str(name)[:80]!r}: use 1 to 64 letters, digits, "
                "'_', '.' or '-'"
            )
        if name in seen:
            raise InvalidInputError(f"{where}: tool name {name!r} is given twice")
        seen.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise InvalidInputError(
                f"{where}['function']['parameters'] must be a JSON schema object"
            )
        description = function.get("description", "")
        if not isinstance(description, str):
            raise InvalidInputError(f"{where}['function']['description'] must be a str")
        checked.append(
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": description,
                    "parameters": dict(parameters),
                },
            }
        )
    return checked


def check_tool_choice(choice: Any, tools: Sequence[Mapping[str, Any]]) -> str | dict[str, Any]:
    """``"auto" | "none" | "required"`` or ``{"type": "function", "function": {"name": n}}``.

    Raises:
        InvalidInputError: another value, or a named tool that is not among ``tools``.
    """
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return str(choice)
    name = None
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
    names = [t["function"]["name"] for t in tools]
    if not isinstance(name, str) or name not in names:
        raise InvalidInputError(
            f"tool_choice={str(choice)[:80]!r}: use 'auto', 'none', 'required' or "
            f'{{"type": "function", "function": {{"name": <one of {names}>}}}}'
        )
    return {"type": "function", "function": {"name": name}}


def check_response_format(value: Any) -> dict[str, Any] | None:
    """``{"type": "text"}`` (None), ``{"type": "json_object"}`` or ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}}}``.

    Raises:
        InvalidInputError: another shape.
    """
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise InvalidInputError(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}"
            )
        return {
            "type": "json_schema",
            "json_schema": {"name": str(spec.get("name") or "response"), "schema": dict(schema)},
        }
    raise InvalidInputError(
        f"response_format={str(value)[:80]!r}: use {{'type': 'text' | 'json_object' | "
        "'json_schema', ...}}"
    )


def tool_strings(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any]) -> list[str]:
    """Every string in tool definitions and in the messages' tool calls and tool ids.

    A chat template renders these outside the messages' text parts; backends check them for
    control markers (message text is never control).
    """
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(list(tools))
    for message in messages:
        walk([message.get(k) for k in ("tool_calls", "tool_call_id", "name") if k in message])
    return found

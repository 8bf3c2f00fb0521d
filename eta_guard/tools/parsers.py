"""Tool-call parsers, one per template family, named like vLLM's ``--tool-call-parser`` choices.

Each parser is a pure function ``text -> ParsedAnswer`` over the decoded generation (special
tokens skipped). Formats (sources in docs/agents.md):

- ``hermes`` (Qwen2/2.5/3-VL, Hermes-2-Pro; vLLM ``Hermes2ProToolParser``): text, then one or
  more ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; an unclosed last
  ``<tool_call>`` (the budget ran out) is read to the end.
- ``llama3_json`` (Llama 3.1/3.2 incl. 3.2 Vision; vLLM ``Llama3JsonToolParser``): the whole
  answer is ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``), several joined by
  ``;``, optionally after ``<|python_tag|>``.
- ``pythonic`` (Gemma 3 with vLLM's ``tool_chat_template_gemma3_pythonic.jinja``, Llama 3.2's
  pythonic template; vLLM ``PythonicToolParser``): the whole answer is a Python list of calls
  ``[get_weather(city="Paris"), ...]`` with literal keyword arguments.

A call the model began but wrote invalidly is returned in ``invalid_tool_calls`` (never run,
never silently dropped). Model output is untrusted: nothing here evaluates it (``ast`` literals
only) and the text parsed is bounded by :data:`MAX_CALL_TEXT`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from eta_guard.errors import InvalidInputError
from eta_guard.tools.calls import InvalidToolCall, ParsedAnswer, ToolCall

#: Characters of tool-call text parsed at most (a longer call is returned as invalid).
MAX_CALL_TEXT = 200_000

Parser = Callable[[str], ParsedAnswer]

_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_FENCE = re.compile(r"\A```(?:tool_code|python)?\s*\n(.*?)\n?```\Z", re.DOTALL)
_PYTHONIC_START = re.compile(r"\A\[\s*[A-Za-z_][\w.]*\(")


def parse_hermes(text: str) -> ParsedAnswer:
    """Hermes ``<tool_call>`` JSON blocks after optional text."""
    start = text.find("<tool_call>")
    if start < 0:
        return ParsedAnswer(content=text)
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for match in _HERMES.finditer(text, start):
        _add_json_call((match.group(1) or match.group(2) or "").strip(), calls, invalid)
    # Only the whitespace before the call goes: the words keep the shape they had (and the shape
    # they streamed in, eta_guard.tools.streaming).
    return ParsedAnswer(content=text[:start].rstrip(), tool_calls=calls, invalid_tool_calls=invalid)


def parse_llama3_json(text: str) -> ParsedAnswer:
    """Llama 3 JSON calls: the answer is one or more ``{"name", "parameters"}`` objects."""
    body = text.strip()
    tagged = body.startswith(_PYTHON_TAG)
    if tagged:
        body = body[len(_PYTHON_TAG) :].lstrip()
    if not body.startswith("{") or (not tagged and '"name"' not in body):
        return ParsedAnswer(content=text)
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    if len(body) > MAX_CALL_TEXT:
        invalid.append(InvalidToolCall(None, body[:200], "tool call text too long"))
        return ParsedAnswer(content="", invalid_tool_calls=invalid)
    decoder = json.JSONDecoder()
    at = 0
    while at < len(body):
        try:
            value, end = decoder.raw_decode(body, at)
        except json.JSONDecodeError as e:
            invalid.append(InvalidToolCall(_guess_name(body[at:]), body[at:], f"invalid JSON: {e}"))
            break
        _add_call_object(value, body[at:end], calls, invalid, args_keys=("parameters", "arguments"))
        at = end
        while at < len(body) and (body[at].isspace() or body[at] == ";"):
            at += 1
    return ParsedAnswer(content="", tool_calls=calls, invalid_tool_calls=invalid)


def parse_pythonic(text: str) -> ParsedAnswer:
    """Python-list calls: ``[name(key=literal, ...), ...]`` (optionally in a code fence)."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not _PYTHONIC_START.match(body):
        return ParsedAnswer(content=text)
    if len(body) > MAX_CALL_TEXT:
        bad = InvalidToolCall(None, body[:200], "tool call text too long")
        return ParsedAnswer(content="", invalid_tool_calls=[bad])
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        bad = InvalidToolCall(_guess_name(body[1:]), body, f"not a Python list of calls: {e}")
        return ParsedAnswer(content="", invalid_tool_calls=[bad])
    if not isinstance(tree, ast.List):
        bad = InvalidToolCall(None, body, "not a Python list of calls")
        return ParsedAnswer(content="", invalid_tool_calls=[bad])
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for element in tree.elts:
        source = ast.get_source_segment(body, element) or ""
        try:
            calls.append(_pythonic_call(element))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as e:
            name = (
                element.func.id
                if isinstance(element, ast.Call) and isinstance(element.func, ast.Name)
                else None
            )
            invalid.append(InvalidToolCall(name, source, str(e) or type(e).__name__))
    return ParsedAnswer(content="", tool_calls=calls, invalid_tool_calls=invalid)


#: Parser name -> parser (the names of vLLM's ``--tool-call-parser`` choices).
PARSERS: dict[str, Parser] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "pythonic": parse_pythonic,
}

#: ``config.model_type`` of a VLM checkpoint -> the parser of its family's tool-call format.
MODEL_TYPE_PARSERS: dict[str, str] = {
    "qwen2_vl": "hermes",
    "qwen2_5_vl": "hermes",
    "qwen3_vl": "hermes",
    "qwen3_vl_moe": "hermes",
    "mllama": "llama3_json",
    "gemma3": "pythonic",
}


def parse_tool_calls(text: str, parser: str) -> ParsedAnswer:
    """Split ``text`` into content and tool calls with the named parser.

    Raises:
        InvalidInputError: unknown parser name.
    """
    return _parser(parser)(text)


def parser_for_model_type(model_type: str | None) -> str | None:
    """The parser name for a checkpoint's ``model_type`` (``None``: no known tool format)."""
    return MODEL_TYPE_PARSERS.get(model_type or "")


def format_tool_calls(calls: Sequence[ToolCall], parser: str = "hermes") -> str:
    """Calls written in the format ``parser`` reads (an engine's parsed calls, as text again)."""
    _parser(parser)
    if parser == "hermes":
        return "\n".join(
            "<tool_call>\n"
            + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
            + "\n</tool_call>"
            for c in calls
        )
    if parser == "llama3_json":
        return "; ".join(
            json.dumps({"name": c.name, "parameters": c.arguments}, ensure_ascii=False)
            for c in calls
        )
    items = ", ".join(
        f"{c.name}(" + ", ".join(f"{k}={v!r}" for k, v in c.arguments.items()) + ")" for c in calls
    )
    return f"[{items}]"


# --------------------------------------------------------------------------- helpers


def _parser(name: str) -> Parser:
    try:
        return PARSERS[name]
    except (KeyError, TypeError):
        raise InvalidInputError(
            f"tool_parser={str(name)[:40]!r} is unknown; use one of {', '.join(PARSERS)}"
        ) from None


def _add_json_call(raw: str, calls: list[ToolCall], invalid: list[InvalidToolCall]) -> None:
    if len(raw) > MAX_CALL_TEXT:
        invalid.append(InvalidToolCall(None, raw[:200], "tool call text too long"))
        return
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        invalid.append(InvalidToolCall(_guess_name(raw), raw, f"invalid JSON: {e}"))
        return
    _add_call_object(value, raw, calls, invalid, args_keys=("arguments", "parameters"))


def _add_call_object(
    value: Any,
    raw: str,
    calls: list[ToolCall],
    invalid: list[InvalidToolCall],
    *,
    args_keys: tuple[str, ...],
) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        invalid.append(InvalidToolCall(None, raw, 'a tool call must be an object with a "name"'))
        return
    name = value["name"]
    key = next((k for k in args_keys if k in value), None)
    arguments = value.get(key, {}) if key else {}
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            invalid.append(InvalidToolCall(name, value[key], f"arguments are not JSON: {e}"))
            return
    if not isinstance(arguments, dict):
        invalid.append(InvalidToolCall(name, raw, "the arguments must be a JSON object"))
        return
    calls.append(ToolCall(name=name, arguments=arguments))


def _pythonic_call(node: ast.expr) -> ToolCall:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError("each item must be a call of a tool by name")
    if node.args:
        raise ValueError("tool arguments must be given by keyword")
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ValueError("**kwargs is not allowed in a tool call")
        arguments[keyword.arg] = ast.literal_eval(keyword.value)
    return ToolCall(name=node.func.id, arguments=arguments)


def _guess_name(raw: str) -> str | None:
    match = re.search(r'"name"\s*:\s*"([^"]{1,128})"', raw) or re.match(r"\s*([A-Za-z_]\w*)\(", raw)
    return match.group(1) if match else None

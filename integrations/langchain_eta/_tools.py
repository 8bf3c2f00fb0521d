"""Tool calling and structured output for ``ETAChatModel``: LangChain shapes in, engine shapes out.

Pure helpers; the parsing itself is the engine's (:mod:`eta_guard.tools`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from langchain_core.messages import AIMessageChunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from eta_guard.errors import InvalidInputError
from eta_guard.tools import InvalidToolCall, ToolCall
from eta_guard.tools.answers import guarded_answer, tool_parser_of

METHODS = ("json_schema", "json_mode", "function_calling")


def format_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """LangChain tools, functions, pydantic models or dicts as OpenAI tool definitions."""
    return [convert_to_openai_tool(tool) for tool in tools]


def tool_choice_for(choice: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any] | None:
    """LangChain's ``tool_choice`` (``"auto"``, ``"any"``, ``True``, a name...) in OpenAI's form."""
    names = [t["function"]["name"] for t in tools]
    if choice is None or choice == "auto":
        return None
    if choice in ("any", "required") or choice is True:
        return "required"
    if choice == "none":
        return "none"
    if isinstance(choice, str) and choice in names:
        return {"type": "function", "function": {"name": choice}}
    if isinstance(choice, dict):
        return choice
    raise InvalidInputError(
        f"tool_choice={str(choice)[:60]!r}: use 'auto', 'none', 'any', True or a tool name {names}"
    )


def engine_tool_parser(engine: Any, override: str | None = None) -> str:
    """The tool-call parser of an engine (``ETAChatModel(tool_parser=...)`` wins).

    Raises:
        InvalidInputError: the family has no known tool-call format.
    """
    try:
        return tool_parser_of(engine, override)
    except InvalidInputError as e:
        raise InvalidInputError(f"{e} (ETAChatModel(tool_parser=...))") from e


def answer_parts(result: Any, parser: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``AIMessageChunk`` fields of an answer (content and calls), and the calls ETA dropped.

    An aligned answer never calls a tool: its text is returned as it is, and the calls of the
    answer it replaced (and any the aligned text itself wrote) are reported as dropped.
    """
    answer = guarded_answer(result, parser)
    if result.aligned:
        return {"content": answer.content}, [_as_dict(c) for c in answer.dropped]
    fields = {
        "content": answer.content,
        "tool_calls": [
            {"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"}
            for c in answer.tool_calls
        ],
        "invalid_tool_calls": [
            {
                "name": c.name,
                "args": c.arguments,
                "id": c.id,
                "error": c.error,
                "type": "invalid_tool_call",
            }
            for c in answer.invalid_tool_calls
        ],
    }
    return fields, []


def merge_safe_chunks(message: AIMessageChunk) -> list[dict[str, Any]]:
    """Tool-call chunks that stay what they are when LangChain merges chunks.

    Merging re-reads chunk arguments with a lenient partial-JSON parser, which would turn a
    truncated (invalid) call into a valid one; an invalid call's text is therefore carried as a
    JSON string, which never reads as arguments.
    """
    chunks = [
        {
            "name": c["name"],
            "args": json.dumps(c["args"]),
            "id": c["id"],
            "index": i,
            "type": "tool_call_chunk",
        }
        for i, c in enumerate(message.tool_calls)
    ]
    offset = len(chunks)
    chunks += [
        {
            "name": c["name"],
            "args": json.dumps(c["args"]),
            "id": c["id"],
            "index": offset + i,
            "type": "tool_call_chunk",
        }
        for i, c in enumerate(message.invalid_tool_calls)
    ]
    return chunks


def structured_output(
    model: Any, schema: Any, *, method: str, include_raw: bool, **kwargs: Any
) -> Runnable[Any, Any]:
    """``model.with_structured_output(schema, method=..., include_raw=...)``."""
    kwargs.pop("strict", None)  # the local grammar and engines' structured outputs are strict
    if kwargs:
        raise InvalidInputError(f"with_structured_output got unknown arguments {sorted(kwargs)}")
    if method not in METHODS:
        raise InvalidInputError(f"method={method!r}: use one of {', '.join(METHODS)}")
    is_model = isinstance(schema, type) and is_basemodel_subclass(schema)
    if method == "function_calling":
        tool = convert_to_openai_tool(schema)
        name = tool["function"]["name"]
        llm = model.bind_tools(
            [schema],
            tool_choice=name,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": tool},
        )
        parser: Any = (
            PydanticToolsParser(tools=[schema], first_tool_only=True)
            if is_model
            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        )
    else:
        if method == "json_mode":
            response_format: dict[str, Any] = {"type": "json_object"}
            described: Any = schema
        else:
            if schema is None:
                raise InvalidInputError("method='json_schema' needs a schema")
            described = convert_to_json_schema(schema)
            name = str(described.get("title") or "response")
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": described},
            }
        llm = model.bind(
            response_format=response_format,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": described},
        )
        parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")


def _as_dict(call: ToolCall | InvalidToolCall) -> dict[str, Any]:
    out = {"name": call.name, "args": call.arguments, "id": call.id}
    if isinstance(call, InvalidToolCall):
        out["error"] = call.error
    return out

"""An engine result as the answer a caller gets: content and calls, with ETA's decision applied.

One rule for every consumer (LangChain, LlamaIndex, the HTTP server): the calls are parsed from
the answer the reward model judged; when ETA aligned, the aligned text replaces the whole
answer, no call is returned (not even one the aligned text itself might write), and the calls
of the replaced answer are reported as dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eta_guard.errors import InvalidInputError
from eta_guard.tools.calls import InvalidToolCall, ToolCall
from eta_guard.tools.parsers import PARSERS, parse_tool_calls, parser_for_model_type


@dataclass(frozen=True)
class GuardedAnswer:
    """What a caller gets of one answer.

    Attributes:
        content: the answer's words (the aligned text when ETA aligned).
        tool_calls: well-formed calls to run (none when ETA aligned).
        invalid_tool_calls: calls the model began but wrote invalidly (never to run).
        dropped: calls ETA withheld because it aligned the answer.
    """

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    dropped: list[ToolCall | InvalidToolCall] = field(default_factory=list)


def guarded_answer(result: Any, parser: str) -> GuardedAnswer:
    """Split an ``ETAResult`` into content and calls with ``parser``, ETA's decision applied."""
    parsed = parse_tool_calls(result.text, parser)
    if result.aligned:
        vanilla = parse_tool_calls(result.vanilla_text or "", parser)
        dropped: list[ToolCall | InvalidToolCall] = [
            *vanilla.tool_calls,
            *vanilla.invalid_tool_calls,
            *parsed.tool_calls,
            *parsed.invalid_tool_calls,
        ]
        return GuardedAnswer(content=result.text, dropped=dropped)
    return GuardedAnswer(
        content=parsed.content,
        tool_calls=list(parsed.tool_calls),
        invalid_tool_calls=list(parsed.invalid_tool_calls),
    )


def tool_parser_of(engine: Any, override: str | None = None) -> str:
    """The tool-call parser for an ``ETA`` engine: ``override``, its VLM family's, or its
    remote backend's (``backend.tool_call_parser``).

    Raises:
        InvalidInputError: an unknown override, or no known tool-call format for the model.
    """
    if override is not None:
        if override not in PARSERS:
            raise InvalidInputError(
                f"tool_parser={str(override)[:40]!r} is unknown; use one of {', '.join(PARSERS)}"
            )
        return override
    vlm = getattr(engine, "vlm", None)
    if vlm is not None:
        model_type = getattr(getattr(vlm.model, "config", None), "model_type", None)
        name = parser_for_model_type(model_type)
        what = f"model_type {model_type!r}"
    else:
        backend = getattr(engine, "backend", None)
        name = getattr(backend, "tool_call_parser", None)
        what = f"backend {type(backend).__name__}"
    if name is None:
        raise InvalidInputError(
            f"no known tool-call format for {what}; set the tool parser ('hermes', "
            "'llama3_json' or 'pythonic') matching the model's chat template"
        )
    return name

"""Tool calling and structured output, torch-free: tool specs, call parsers, judged text.

- :mod:`eta_guard.tools.specs`: validate OpenAI-style tool definitions and ``tool_choice``.
- :mod:`eta_guard.tools.parsers`: parse tool calls out of a generation, one parser per template
  family, named like vLLM's ``--tool-call-parser`` choices (``hermes``, ``llama3_json``,
  ``pythonic``); :func:`parser_for_model_type` picks one from a checkpoint's ``model_type``.
- :mod:`eta_guard.tools.calls`: parsed calls, and :func:`judged_text`, the text a safety judge
  reads of an answer (its words and its calls).
- :mod:`eta_guard.tools.answers`: an engine result as the caller's answer (calls parsed, ETA's
  decision applied: an aligned answer returns no call); one rule for every adapter and the server.
- :mod:`eta_guard.tools.streaming`: stream an answer's words, never what may begin a call.
- :mod:`eta_guard.tools.request`: one call's tool fields and the engine request they make (what
  the adapters hand ``ETA``).
- :mod:`eta_guard.tools.constraints`: what a local answer is decoded as (a forced call in the
  family's format, a JSON answer, free text).
"""

from __future__ import annotations

from eta_guard.tools.calls import InvalidToolCall, ParsedAnswer, ToolCall, judged_text
from eta_guard.tools.parsers import (
    PARSERS,
    format_tool_calls,
    parse_tool_calls,
    parser_for_model_type,
)
from eta_guard.tools.specs import check_response_format, check_tool_choice, check_tools

__all__ = [
    "PARSERS",
    "InvalidToolCall",
    "ParsedAnswer",
    "ToolCall",
    "check_response_format",
    "check_tool_choice",
    "check_tools",
    "format_tool_calls",
    "judged_text",
    "parse_tool_calls",
    "parser_for_model_type",
]

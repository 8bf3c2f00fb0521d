"""Tool-call parsers on recorded outputs in each family's documented format (docs/agents.md).

Each table row is an answer as the family writes it (decoded, special tokens skipped), and the
calls a parser must read from it. Pure Python: no model runs.
"""

from __future__ import annotations

import pytest

from eta_guard.errors import InvalidInputError
from eta_guard.tools import (
    ToolCall,
    format_tool_calls,
    judged_text,
    parse_tool_calls,
    parser_for_model_type,
)

# Qwen2.5 function-calling guide (Hermes style): the template's own example and a real answer.
QWEN_TWO_CALLS = (
    "<tool_call>\n"
    '{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    "</tool_call>\n"
    "<tool_call>\n"
    '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", '
    '"date": "2024-10-01"}}\n'
    "</tool_call>"
)
# Llama 3.1/3.2 JSON tool calling (Meta's prompt format; vLLM llama3_json).
LLAMA_JSON = '{"name": "get_weather", "parameters": {"city": "San Francisco", "unit": "celsius"}}'
# Gemma 3 with vLLM's tool_chat_template_gemma3_pythonic.jinja (a Python list of calls).
GEMMA_PYTHONIC = '[get_weather(city="Paris", unit="celsius"), get_time(zone="CET")]'

CASES = [
    # parser, text, content, [(name, args)], number of invalid calls
    (
        "hermes",
        QWEN_TWO_CALLS,
        "",
        [
            ("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"}),
        ],
        0,
    ),
    (
        "hermes",
        "Let me check.\n" + QWEN_TWO_CALLS.split("\n<tool_call>")[0],
        "Let me check.",
        [("get_current_temperature", {"location": "San Francisco, CA, USA"})],
        0,
    ),
    ("hermes", "It is sunny today.", "It is sunny today.", [], 0),
    # the budget ran out inside a call: unclosed and truncated -> invalid, never a valid call
    ("hermes", '<tool_call>\n{"name": "send", "arguments": {"to": "a', "", [], 1),
    (
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        "",
        [("f", {"a": 1})],
        0,
    ),
    ("hermes", '<tool_call>\n["not", "an", "object"]\n</tool_call>', "", [], 1),
    (
        "llama3_json",
        LLAMA_JSON,
        "",
        [("get_weather", {"city": "San Francisco", "unit": "celsius"})],
        0,
    ),
    (
        "llama3_json",
        "<|python_tag|>" + LLAMA_JSON,
        "",
        [("get_weather", {"city": "San Francisco", "unit": "celsius"})],
        0,
    ),
    (
        "llama3_json",
        LLAMA_JSON + "; " + '{"name": "get_time", "arguments": {}}',
        "",
        [("get_weather", {"city": "San Francisco", "unit": "celsius"}), ("get_time", {})],
        0,
    ),
    ("llama3_json", "The weather is fine.", "The weather is fine.", [], 0),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "San', "", [], 1),
    (
        "pythonic",
        GEMMA_PYTHONIC,
        "",
        [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "CET"})],
        0,
    ),
    (
        "pythonic",
        "```tool_code\n[get_time(zone='UTC')]\n```",
        "",
        [("get_time", {"zone": "UTC"})],
        0,
    ),
    ("pythonic", "[get_time(zone=os.system('x'))]", "", [], 1),  # not a literal: never evaluated
    ("pythonic", "[get_weather(city='Paris'", "", [], 1),
    ("pythonic", "[1, 2] is a list.", "[1, 2] is a list.", [], 0),
]


@pytest.mark.parametrize(("parser", "text", "content", "calls", "invalid"), CASES)
def test_parsers_read_each_familys_format(parser, text, content, calls, invalid):
    parsed = parse_tool_calls(text, parser)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    assert len(parsed.invalid_tool_calls) == invalid
    assert all(c.id.startswith("call_") for c in parsed.tool_calls)


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "pythonic"])
def test_format_then_parse_round_trips(parser):
    calls = [ToolCall("send_message", {"to": "all", "body": "hi"}), ToolCall("noop", {})]
    parsed = parse_tool_calls(format_tool_calls(calls, parser), parser)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        (c.name, c.arguments) for c in calls
    ]


def test_model_types_map_to_their_parsers():
    table = {
        "qwen2_5_vl": "hermes",
        "qwen3_vl": "hermes",
        "mllama": "llama3_json",
        "gemma3": "pythonic",
        "llava": None,
        "idefics3": None,
    }
    assert {k: parser_for_model_type(k) for k in table} == table


def test_unknown_parser_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="tool_parser='mistral'.*hermes"):
        parse_tool_calls("x", "mistral")


def test_judged_text_holds_the_calls_name_and_arguments():
    body = "Step 1: obtain the toxin."
    call = {"name": "send_message", "args": {"to": "all", "body": body}, "id": "1"}
    text = judged_text("", [call])
    assert text.startswith("send_message(") and body in text
    assert judged_text("Sure.", [ToolCall("f", {"a": 1})]) == 'Sure.\nf({"a": 1})'
    bad = {"name": None, "args": '{"x": ', "id": "2", "error": "bad"}
    assert judged_text("", [], [bad]) == '<unnamed tool>({"x": )'

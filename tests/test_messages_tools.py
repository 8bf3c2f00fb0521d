"""The request form of ``normalize_messages``: tools, tool turns, tool_choice, response_format."""

from __future__ import annotations

import pytest

from eta_guard.errors import InvalidInputError
from eta_guard.messages import normalize_messages

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
LOOP = [
    {"role": "user", "content": "Find x."},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "x is 1"},
    {"role": "tool", "tool_call_id": "c2", "content": "more"},
]


def test_a_tool_loop_normalizes_with_calls_as_dicts_and_separate_results():
    conv = normalize_messages({"messages": LOOP, "tools": [TOOL], "tool_choice": "required"})
    assert conv.tools[0]["function"]["name"] == "lookup" and conv.tool_choice == "required"
    assert conv.offers_tools and conv.response_format is None
    assistant, first, second = conv.messages[1:]
    assert assistant == {
        "role": "assistant",
        "content": [],
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "lookup", "arguments": {"q": "x"}},
                "id": "c1",
            }
        ],
    }
    assert first["tool_call_id"] == "c1" and second["tool_call_id"] == "c2"  # never merged


def test_plain_lists_carry_no_tools():
    conv = normalize_messages([{"role": "user", "content": "hi"}])
    assert conv.tools == [] and conv.tool_choice == "auto" and not conv.offers_tools


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"messages": LOOP, "tools": [TOOL], "temperature": 0}, "unknown keys \\['temperature'\\]"),
        ({"messages": LOOP, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "name"),
        ({"messages": LOOP, "tools": [TOOL, TOOL]}, "given twice"),
        (
            {"messages": LOOP, "tools": [TOOL], "tool_choice": {"function": {"name": "nope"}}},
            "nope",
        ),
        ({"messages": LOOP, "response_format": {"type": "xml"}}, "response_format"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "no assistant turn before it calls"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                    },
                    {"role": "tool", "content": "r"},
                ]
            },
            "arguments are not JSON",
        ),
    ],
)
def test_bad_requests_are_refused_clearly(request_, match):
    with pytest.raises(InvalidInputError, match=match):
        normalize_messages(request_)


def test_tool_calls_count_against_the_text_limit():
    from eta_guard.limits import RequestLimits

    big = {**CALL, "function": {"name": "lookup", "arguments": {"q": "x" * 5000}}}
    messages = [LOOP[0], {"role": "assistant", "content": "", "tool_calls": [big]}, LOOP[2]]
    with pytest.raises(InvalidInputError):
        normalize_messages(messages, limits=RequestLimits(max_text_chars=1000))

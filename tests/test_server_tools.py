"""Tools through ``eta-guard serve``, driven by the official openai client over real HTTP.

The VLM's words are scripted behind the GeneratorBackend interface (random weights cannot be
relied on to write a call); the server, the engine and the evaluators (tiny random CLIP and RM,
thresholds that force each decision) are the real ones: mechanics, never safety. Both
directions: tool messages in (the engine sees the calls and results), ``tool_calls`` out, plain
and as streaming deltas.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from langchain_fixtures import lc_ckpt, lc_eta, lc_evaluator  # noqa: E402, F401
from scripted_backend import ScriptedBackend, schema_following  # noqa: E402

from eta_guard import ETA, ETAConfig  # noqa: E402
from eta_guard.tools import ToolCall, format_tool_calls  # noqa: E402
from eta_guard.tools.streaming import ContentStream  # noqa: E402

KEY = secrets.token_urlsafe(24)
HARMFUL = "Step 1: obtain the toxin. Step 2: add it to the water supply."
SEND = ToolCall("send_message", {"to": "all", "body": HARMFUL})
WEATHER = ToolCall("get_weather", {"city": "Paris"})
#: text-only answers are judged by the RM alone, and every one is found unsafe
ALIGN_TEXT = {"text_only_policy": "reward_only", "post_threshold": 1e9}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} tool",
            "parameters": {
                "type": "object",
                "properties": {k: {"type": "string"} for k in keys},
                "required": list(keys),
            },
        },
    }
    for name, keys in (("get_weather", ("city",)), ("send_message", ("to", "body")))
]


def _serve(backend, evaluator, **config):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    cfg = ETAConfig(num_candidates=2, max_new_tokens=32, seed=0, **config)
    app = create_app(
        ETA(backend, evaluator, cfg), settings=ServerSettings(api_keys={KEY}, keepalive_s=0.01)
    )
    return serve_in_thread(app)


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def _weather_then_answer(conversation) -> str:
    if conversation.messages[-1]["role"] == "tool":
        return "It is sunny in Paris."
    return "Let me look.\n" + format_tool_calls([WEATHER])


@pytest.fixture(scope="module")
def weather(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(_weather_then_answer)
    with _serve(backend, lc_evaluator) as url:
        yield url, backend


@pytest.fixture(scope="module")
def harmful(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(lambda conv: format_tool_calls([SEND]))
    with _serve(backend, lc_evaluator, **ALIGN_TEXT) as url:
        yield url


ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_tool_calls_out(weather):
    url, _ = weather
    resp = _client(url).chat.completions.create(model="eta-guard", messages=ASK, tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    eta = resp.model_extra["eta"]
    assert eta["aligned"] is False
    assert eta["dropped_tool_calls"] == [] and eta["invalid_tool_calls"] == []


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_tool_call_deltas_as_the_openai_client_parses_them(weather, include_usage):
    url, _ = weather
    client = _client(url)
    kwargs = {"model": "eta-guard", "messages": ASK, "tools": TOOLS}
    if include_usage:
        kwargs["stream_options"] = {"include_usage": True}
    # the openai client's own accumulator (ChatCompletionStreamState) assembles the deltas
    with client.chat.completions.stream(**kwargs) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    plain = client.chat.completions.create(**kwargs)
    assert call.function.arguments == plain.choices[0].message.tool_calls[0].function.arguments
    # OpenAI's delta shape: a header (index, id, type, name, empty arguments), then the arguments
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    head, body = deltas
    assert (head.index, head.type, head.function.name, head.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert head.id == call.id and body.id is None and body.function.name is None
    assert body.index == 0 and body.function.arguments == call.function.arguments
    # no call markup in the content, and the calls come after the words
    text = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(text) == "Let me look." and not any("<tool_call>" in t for t in text)
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["eta"]["dropped_tool_calls"] == []
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_tool_messages_in(weather):
    url, backend = weather
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client = _client(url)
    resp = client.chat.completions.create(model="eta-guard", messages=history, tools=TOOLS)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == "It is sunny in Paris."
    assert resp.choices[0].message.tool_calls is None
    seen = backend.seen[-1]
    assert [t["function"]["name"] for t in seen.tools] == ["get_weather", "send_message"]
    assert seen.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert seen.messages[2]["role"] == "tool" and seen.messages[2]["tool_call_id"] == "call_1"
    # streamed, the answer after a tool result streams its words as usual
    chunks = list(
        client.chat.completions.create(
            model="eta-guard", messages=history, tools=TOOLS, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "It is sunny in Paris."


def test_an_image_a_tool_returns_is_pre_checked(weather):
    import base64

    from langchain_fixtures import png_bytes

    url, backend = weather
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "c1",
            "content": [
                {"type": "text", "text": "map:"},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        },
    ]
    resp = _client(url).chat.completions.create(model="eta-guard", messages=history, tools=TOOLS)
    assert len(backend.seen[-1].images) == 1
    eta = resp.model_extra["eta"]
    assert len(eta["scores"]["image_clip"]) == 1 and eta["scores"]["clip"] is not None


@pytest.mark.parametrize("stream", [False, True])
def test_a_flagged_tool_call_is_dropped_and_replaced_by_the_aligned_answer(harmful, stream):
    """Without the judging of calls, the harmful call would come back as a call to run."""
    body = {"model": "eta-guard", "messages": ASK, "tools": TOOLS, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    raw = httpx.post(harmful + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert raw.status_code == 200
    assert HARMFUL not in raw.text and "<tool_call>" not in raw.text  # nothing withheld leaks
    client = _client(harmful)
    if stream:
        with client.chat.completions.stream(model="eta-guard", messages=ASK, tools=TOOLS) as s:
            chunks = [e.chunk for e in s if e.type == "chunk"]
            resp = s.get_final_completion()
        eta = next(c for c in chunks if c.choices and c.choices[0].finish_reason).model_extra["eta"]
    else:
        resp = client.chat.completions.create(model="eta-guard", messages=ASK, tools=TOOLS)
        eta = resp.model_extra["eta"]
    choice = resp.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason == "stop"
    assert choice.message.content.startswith("As an AI assistant")
    assert eta["aligned"] is True and eta["output_unsafe"] is True
    assert eta["dropped_tool_calls"] == ["send_message"]


def test_response_format_reaches_the_engine(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(schema_following)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
    }
    with _serve(backend, lc_evaluator) as url:
        client = _client(url)
        resp = client.chat.completions.create(
            model="eta-guard",
            messages=[{"role": "user", "content": "Weather in 'Paris'?"}],
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
        )
        assert json.loads(resp.choices[0].message.content) == {"city": "Paris", "sunny": True}
        assert backend.seen[-1].response_format["json_schema"]["schema"] == schema
        client.chat.completions.create(
            model="eta-guard", messages=ASK, response_format={"type": "json_object"}
        )
        assert backend.seen[-1].response_format == {"type": "json_object"}


def test_structured_output_through_the_clients_parse_helpers(lc_evaluator):  # noqa: F811
    """openai's ``chat.completions.parse`` and LangChain's ``with_structured_output`` (strict
    json_schema): the schema reaches the engine, the answer parses into the client's type."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        sunny: bool

    backend = ScriptedBackend(schema_following)
    ask = [{"role": "user", "content": "Weather in 'Paris'?"}]
    with _serve(backend, lc_evaluator) as url:
        parsed = _client(url).chat.completions.parse(
            model="eta-guard", messages=ask, response_format=Weather
        )
        assert parsed.choices[0].message.parsed == Weather(city="Paris", sunny=True)
        sent = backend.seen[-1].response_format["json_schema"]
        assert sent["name"] == "Weather" and sent["schema"]["required"] == ["city", "sunny"]
        import openai

        called = _client(url).chat.completions.parse(
            model="eta-guard", messages=ask, tools=[openai.pydantic_function_tool(Weather)]
        )
        (call,) = called.choices[0].message.tool_calls
        assert call.function.parsed_arguments == Weather(city="Paris", sunny=True)
        llm = ChatOpenAI(model="eta-guard", base_url=url + "/v1", api_key=KEY, max_retries=0)
        out = llm.with_structured_output(Weather, method="json_schema").invoke(ask)
        assert out == Weather(city="Paris", sunny=True)


def test_tool_choice_none_and_named(lc_evaluator):  # noqa: F811
    backend = ScriptedBackend(schema_following)
    with _serve(backend, lc_evaluator) as url:
        client = _client(url)
        named = {"type": "function", "function": {"name": "send_message"}}
        resp = client.chat.completions.create(
            model="eta-guard", messages=ASK, tools=TOOLS, tool_choice=named
        )
        assert resp.choices[0].message.tool_calls[0].function.name == "send_message"
        assert backend.seen[-1].tool_choice == named
        resp = client.chat.completions.create(
            model="eta-guard", messages=ASK, tools=TOOLS, tool_choice="none"
        )
        assert resp.choices[0].message.tool_calls is None
        assert backend.seen[-1].offers_tools is False
        assert (
            "tool_calls" not in resp.model_extra["eta"]
            and "dropped_tool_calls" not in (resp.model_extra["eta"])
        )


def test_tool_errors_are_400s(weather, lc_evaluator):  # noqa: F811
    url, _ = weather
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path, **body):
        return httpx.post(
            url + path, json={"model": "eta-guard", **body}, headers=headers, timeout=30
        )

    cases = [
        ("/v1/chat/completions", {"messages": ASK, "tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"messages": ASK, "tools": TOOLS, "tool_choice": "x"}, "tool"),
        ("/v1/chat/completions", {"messages": ASK, "tools": [{"type": "function"}]}, "function"),
        ("/v1/chat/completions", {"messages": ASK, "response_format": {"type": "xml"}}, "xml"),
        (
            "/v1/chat/completions",
            {"messages": [*ASK, {"role": "tool", "content": "x"}]},
            "tool_call_id",
        ),
        ("/v1/chat/completions", {"messages": ASK, "functions": [{"name": "f"}]}, "functions"),
        ("/v1/completions", {"prompt": "hi", "tools": TOOLS}, "tools"),
    ]
    for path, body, needle in cases:
        resp = post(path, **body)
        assert resp.status_code == 400, (body, resp.text)
        assert needle in resp.json()["error"]["message"], resp.text

    class NoFormat(ScriptedBackend):
        tool_call_parser = None

    with _serve(NoFormat(lambda c: "hi"), lc_evaluator) as other:
        resp = httpx.post(
            other + "/v1/chat/completions",
            json={"model": "eta-guard", "messages": ASK, "tools": TOOLS},
            headers=headers,
            timeout=30,
        )
    assert resp.status_code == 400 and "no known tool-call format" in resp.text


def test_langchain_chat_openai_binds_tools_against_the_server(weather):
    from langchain_openai import ChatOpenAI

    url, _ = weather
    llm = ChatOpenAI(model="eta-guard", base_url=url + "/v1", api_key=KEY, max_retries=0)
    bound = llm.bind_tools(TOOLS)
    for message in (bound.invoke("Weather in Paris?"), _merged(bound.stream("Weather?"))):
        assert message.tool_calls[0]["name"] == "get_weather"
        assert message.tool_calls[0]["args"] == {"city": "Paris"}
        assert message.content == "Let me look."


def _merged(chunks):
    out = None
    for chunk in chunks:
        out = chunk if out is None else out + chunk
    return out


# ----------------------------------------------------------------------------- content stream

STREAM_CASES = [
    # parser, pieces, what streams before the end
    ("hermes", ["Let me ", "look.\n<tool", "_call>\n{", "}"], "Let me look."),
    ("hermes", ["Hi", " <", "tool"], "Hi"),  # '<tool' may begin a call: held
    ("hermes", ["It is ", "sunny. ", "Yes."], "It is sunny. Yes."),
    ("hermes", ["a <b> c"], "a <b> c"),
    ("llama3_json", [" ", '{"name": "f", ', '"parameters": {}}'], ""),
    ("llama3_json", [" ", "Sunny", " today."], " Sunny today."),
    ("pythonic", ["[get_weather(", 'city="Paris")]'], ""),
    ("pythonic", ["```tool_code\n[f()]\n```"], ""),
    ("pythonic", ["It is ", "sunny."], "It is sunny."),
]


@pytest.mark.parametrize(("parser", "pieces", "streamed"), STREAM_CASES)
def test_content_stream_holds_back_what_may_be_a_call(parser, pieces, streamed):
    from eta_guard.tools import parse_tool_calls

    stream = ContentStream(parser)
    out = "".join(stream.feed(p) for p in pieces)
    assert out == streamed
    content = parse_tool_calls("".join(pieces), parser).content
    assert out + stream.finish(content) == content  # streamed + rest == the parsed content


def test_content_stream_refuses_an_answer_it_did_not_stream():
    stream = ContentStream("hermes")
    stream.feed("Sure, here is")
    with pytest.raises(RuntimeError, match="not the start"):
        stream.finish("As an AI assistant")

"""eta-guard serve driven by the real clients: openai (sync, async, stream, usage, moderation),
LangChain ChatOpenAI and LlamaIndex OpenAILike, on random tiny checkpoints over real HTTP.

Thresholds force the branches (cosines lie in [-1, 1]): the "safe" server never flags an image,
the "flagged" one always flags and always judges the answer unsafe, so it aligns. Random models
prove mechanics, never safety.
"""

from __future__ import annotations

import base64
import io
import math
import secrets

import httpx
import pytest

KEY = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def image_url():
    from eta_guard.testing import make_test_image

    buf = io.BytesIO()
    make_test_image("gradient").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def tiny_eta(tiny_checkpoints):
    from eta_guard import ETA, ETAConfig

    cfg = ETAConfig(max_new_tokens=12, num_candidates=2, max_sentence_tokens=6, seed=0)
    c = tiny_checkpoints
    return ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model, config=cfg)


def _variant(eta, **overrides):
    """Same loaded models, other thresholds (the model's lock is shared: two servers never overlap)."""
    from eta_guard import ETA

    other = ETA(eta.vlm, eta.evaluator, eta.config.with_overrides(**overrides))
    return other


@pytest.fixture(scope="module")
def safe_url(tiny_eta):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    app = create_app(
        _variant(tiny_eta, pre_threshold=1.01), settings=ServerSettings(api_keys={KEY})
    )
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def flagged_url(tiny_eta):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    eta = _variant(tiny_eta, pre_threshold=-1.01, post_threshold=1e9)
    app = create_app(eta, settings=ServerSettings(api_keys={KEY}, keepalive_s=0.005))
    with serve_in_thread(app) as url:
        yield url


def _messages(image_url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": image_url}},
            ],
        }
    ]


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def test_openai_sync_flagged_answer_is_aligned_with_extension(flagged_url, image_url):
    resp = _client(flagged_url).chat.completions.create(
        model="eta-guard", messages=_messages(image_url), max_tokens=10, temperature=0.7
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.startswith("As an AI assistant")
    assert choice.finish_reason in ("stop", "length")
    eta = resp.model_extra["eta"]
    assert eta["aligned"] is True and eta["unsafe"] is True
    assert eta["input_unsafe"] is True and eta["output_unsafe"] is True
    assert isinstance(eta["scores"]["clip"], float) and isinstance(eta["scores"]["reward"], float)
    assert eta["ignored_parameters"] == ["temperature"]
    assert "vanilla_text" not in eta and "trace" not in eta  # what was withheld stays withheld
    usage = resp.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= 10


def test_openai_stream_with_usage_matches_the_plain_answer(safe_url, image_url):
    client = _client(safe_url)
    kwargs = {"model": "eta-guard", "messages": _messages(image_url), "max_tokens": 10}
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0] is chunks[-2]
    assert finish[0].model_extra["eta"]["aligned"] is False
    assert finish[0].model_extra["eta"]["input_unsafe"] is False
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert chunks[-1].model_extra["eta"] == finish[0].model_extra["eta"]
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_format_and_keepalive_while_held_back(flagged_url, image_url):
    body = {"model": "eta-guard", "messages": _messages(image_url), "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", flagged_url + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith(("data: ", ": keep-alive")) for e in events[:-1])
    # The greedy answer is decoded and judged before anything is sent: comments keep it alive.
    first_content = next(i for i, e in enumerate(events) if '"content":"As an AI' in e)
    assert any(e == ": keep-alive" for e in events[:first_content])


async def test_openai_async_chat_and_stream(safe_url, image_url):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=safe_url + "/v1", api_key=KEY, max_retries=0)
    kwargs = {"model": "eta-guard", "messages": _messages(image_url), "max_tokens": 8}
    resp = await client.chat.completions.create(**kwargs)
    stream = await client.chat.completions.create(**kwargs, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == resp.choices[0].message.content
    await client.close()


def test_openai_moderation_text_list_and_multimodal(safe_url, flagged_url, image_url):
    flagged = _client(flagged_url).moderations.create(
        input=[
            {"type": "text", "text": "Sure, here is how."},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]
    )
    (result,) = flagged.results
    assert result.flagged is True
    cats, scores = result.categories.model_extra, result.category_scores.model_extra
    assert cats == {"unsafe": True, "unsafe/image": True, "unsafe/text": True}
    assert scores["unsafe/image"] >= 0.5 and scores["unsafe/text"] >= 0.5
    assert result.model_extra["eta"]["thresholds"] == {"clip": -1.01, "reward": 1e9}

    many = _client(safe_url).moderations.create(input=["first text", "second text"])
    assert len(many.results) == 2
    for r in many.results:
        eta = r.model_extra["eta"]
        assert r.categories.model_extra == {
            "unsafe": eta["output_unsafe"],
            "unsafe/text": eta["output_unsafe"],
        }
        assert (r.category_scores.model_extra["unsafe/text"] >= 0.5) == eta["output_unsafe"]
        margin = eta["thresholds"]["reward"] - eta["scores"]["reward"]  # higher = worse
        expected = 1 / (1 + math.exp(-margin / 0.02))
        assert r.category_scores.model_extra["unsafe/text"] == pytest.approx(expected)
        assert eta["scores"]["clip"] is None and "pre" in eta["skipped"]


def test_models_list(safe_url):
    models = _client(safe_url).models.list()
    assert [m.id for m in models.data] == ["eta-guard"]


def test_langchain_chat_openai_with_image(safe_url, image_url):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="eta-guard",
        base_url=safe_url + "/v1",
        api_key=KEY,
        max_tokens=8,
        max_retries=0,
        stream_usage=True,
    )
    message = HumanMessage(content=_messages(image_url)[0]["content"])
    answer = llm.invoke([message])
    assert isinstance(answer.content, str)
    assert answer.usage_metadata["total_tokens"] > 0
    chunks = list(llm.stream([message]))
    streamed = chunks[0]
    for c in chunks[1:]:
        streamed = streamed + c
    assert streamed.content == answer.content
    assert streamed.usage_metadata["output_tokens"] == answer.usage_metadata["output_tokens"]


def test_llama_index_openai_like_chat_with_image_and_completions(safe_url, image_url):
    from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.openai_like import OpenAILike

    common = {"model": "eta-guard", "api_base": safe_url + "/v1", "api_key": KEY}
    chat_llm = OpenAILike(**common, is_chat_model=True, max_tokens=8, max_retries=0)
    png = base64.b64decode(image_url.split(",", 1)[1])
    message = ChatMessage(
        role="user", blocks=[TextBlock(text="What is in this picture?"), ImageBlock(image=png)]
    )
    answer = chat_llm.chat([message])
    assert isinstance(answer.message.content, str)
    streamed = "".join(r.delta or "" for r in chat_llm.stream_chat([message]))
    assert streamed == answer.message.content

    text_llm = OpenAILike(**common, is_chat_model=False, max_tokens=8, max_retries=0)
    completion = text_llm.complete("Say something.")
    assert isinstance(completion.text, str)
    assert (
        "".join(r.delta or "" for r in text_llm.stream_complete("Say something."))
        == completion.text
    )


def test_seed_makes_the_aligned_answer_reproducible(flagged_url, image_url):
    client = _client(flagged_url)
    kwargs = {"model": "eta-guard", "messages": _messages(image_url), "max_tokens": 12}

    def answer(seed):
        return client.chat.completions.create(**kwargs, seed=seed).choices[0].message.content

    first = answer(3)
    assert answer(3) == first and first.startswith("As an AI assistant")
    # The request's seed is used (the server's config has seed=0): other seeds, other samples.
    assert len({first, *(answer(s) for s in (4, 5, 6))}) > 1


def test_serves_a_backend_eta_over_an_openai_compatible_engine(tiny_eta, image_url):
    """eta-guard serve in front of ETA.from_openai_compatible's BackendETA (a stub engine here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from backend_stub import StubServer

    from eta_guard import ETAConfig
    from eta_guard.backends import HTTPSettings, OpenAICompatibleBackend
    from eta_guard.pipeline import BackendETA
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    with StubServer() as stub:
        backend = OpenAICompatibleBackend(stub.url, "tiny-vlm", http=HTTPSettings(timeout=5.0))
        eta = BackendETA(backend, tiny_eta.evaluator, ETAConfig(pre_threshold=2.0, seed=0))
        app = create_app(eta, settings=ServerSettings(api_keys={KEY}))
        with serve_in_thread(app) as url:
            client = _client(url)
            kwargs = {"model": "eta-guard", "messages": _messages(image_url), "max_tokens": 16}
            plain = client.chat.completions.create(**kwargs)
            assert plain.choices[0].message.content == "Sure, here is how."
            assert plain.model_extra["eta"]["input_unsafe"] is False
            streamed = client.chat.completions.create(**kwargs, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            assert text == "Sure, here is how."


def test_backend_eta_calls_run_concurrently_when_allowed(tiny_eta, image_url):
    """max_concurrent_calls > 1 lets a batching engine see several calls at once."""
    import sys
    import threading
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from backend_stub import StubServer

    from eta_guard import ETAConfig
    from eta_guard.backends import HTTPSettings, OpenAICompatibleBackend
    from eta_guard.pipeline import BackendETA
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    with StubServer() as stub:
        stub.delay = 1.0  # every engine request takes a second: calls overlap if allowed to
        backend = OpenAICompatibleBackend(stub.url, "tiny-vlm", http=HTTPSettings(timeout=10.0))
        eta = BackendETA(backend, tiny_eta.evaluator, ETAConfig(pre_threshold=2.0))
        settings = ServerSettings(api_keys={KEY}, max_concurrent_calls=4)
        with serve_in_thread(create_app(eta, settings=settings)) as url:
            body = {"model": "eta-guard", "messages": [{"role": "user", "content": "Hi"}]}
            threads = [
                threading.Thread(
                    target=httpx.post,
                    args=(url + "/v1/chat/completions",),
                    kwargs={
                        "json": body,
                        "headers": {"Authorization": f"Bearer {KEY}"},
                        "timeout": 30,
                    },
                )
                for _ in range(4)
            ]
            for t in threads:
                t.start()
            deadline, busiest = time.monotonic() + 10, 0.0
            while time.monotonic() < deadline and busiest < 4:
                metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
                line = next(x for x in metrics.text.splitlines() if x.startswith("eta_model_busy "))
                busiest = max(busiest, float(line.split()[1]))
                time.sleep(0.02)
            for t in threads:
                t.join(timeout=30)
            assert busiest == 4

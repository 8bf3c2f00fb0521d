"""eta-guard serve: authentication, every error status with its OpenAI body, the queue, the
deadline and cancellation (a client that disconnects mid-stream stops its generation).

Real uvicorn on 127.0.0.1 and a free port, random tiny checkpoints (mechanics, not safety).
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import threading
import time

import httpx
import pytest

KEY = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def parts(tiny_checkpoints):
    from eta_guard import ETA, ETAConfig

    c = tiny_checkpoints
    cfg = ETAConfig(max_new_tokens=2000, pre_threshold=1.01)  # images pass: tokens stream
    return ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model, config=cfg)


@pytest.fixture(scope="module")
def image_url():
    from eta_guard.testing import make_test_image

    buf = io.BytesIO()
    make_test_image("noise").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _serve(eta, **settings):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    return serve_in_thread(create_app(eta, settings=ServerSettings(api_keys={KEY}, **settings)))


@pytest.fixture(scope="module")
def url(parts):
    with _serve(parts, max_request_bytes=64 * 1024, max_tokens_limit=2000) as base:
        yield base


def _chat(text="Hi", **extra):
    return {"model": "eta-guard", "messages": [{"role": "user", "content": text}], **extra}


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return error


# ----------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"Authorization": f"Basic {KEY}"}],
    ids=["missing", "wrong", "not-bearer"],
)
def test_auth_failures_get_401(url, headers):
    for method, path, body in [
        ("POST", "/v1/chat/completions", _chat()),
        ("POST", "/v1/moderations", {"input": "x"}),
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
    ]:
        resp = httpx.request(method, url + path, json=body, headers=headers)
        error = _error(resp, 401)
        assert error["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"


def test_openai_client_raises_authentication_error(url):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="not-the-key-at-all", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_health_needs_no_key(url):
    assert httpx.get(url + "/health").json() == {"status": "ok", "mode": "guarded-generation"}


def test_keys_load_from_file_and_env(tmp_path, monkeypatch):
    from eta_guard.errors import InvalidInputError
    from eta_guard.server import load_api_keys

    path = tmp_path / "keys"
    path.write_text(f"# comment\n{KEY}\n\n")
    monkeypatch.setenv("ETA_GUARD_API_KEYS", "b" * 20 + ",c" * 1 + "c" * 19)
    assert load_api_keys(path) == {KEY, "b" * 20, "c" * 20}
    path.write_text("short\n")
    with pytest.raises(InvalidInputError, match="at least 16"):
        load_api_keys(path)


# ----------------------------------------------------------------------------- 400 / 404 / 405 / 413


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_chat(n=2), "n"),
        (_chat(tools=[{"type": "function"}]), "tools"),
        (_chat(functions=[{"name": "f"}]), "functions"),
        (_chat(max_tokens=5000), "max_tokens"),
        (_chat(max_tokens=0), "max_tokens"),
        (_chat(response_format={"type": "xml"}), "response_format"),
        ({"model": "eta-guard", "messages": []}, "messages"),
        (
            {"model": "eta-guard", "messages": [{"role": "critic", "content": "x"}]},
            "messages.0.role",
        ),
        (
            {"model": "eta-guard", "messages": [{"role": "tool", "content": "x"}]},
            "messages[0].tool_call_id",
        ),
        (_chat([{"type": "input_audio", "input_audio": {}}]), "messages[0].content[0]"),
        (
            _chat([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]),
            "messages[0].content[0]",
        ),
        (
            _chat([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]),
            "messages[0].content[0]",
        ),
        (
            _chat([{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]),
            "messages[0].content[0]",
        ),
    ],
    ids=[
        "n",
        "tools",
        "functions",
        "max_tokens-high",
        "max_tokens-zero",
        "json",
        "empty",
        "unknown-role",
        "tool-without-id",
        "audio",
        "path",
        "file-url",
        "remote",
    ],
)
def test_bad_requests_get_400_naming_the_field(url, body, param):
    error = _error(httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_undecodable_image_gets_400_before_any_stream(url):
    bad = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    body = _chat([{"type": "image_url", "image_url": {"url": bad}}], stream=True)
    error = _error(httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH), 400)
    assert "not an image" in error["message"]


def test_invalid_json_gets_400(url):
    resp = httpx.post(
        url + "/v1/chat/completions",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert "not valid JSON" in _error(resp, 400)["message"]


def test_unknown_model_route_and_method(url):
    assert (
        _error(
            httpx.post(
                url + "/v1/chat/completions", json={**_chat(), "model": "gpt-x"}, headers=AUTH
            ),
            404,
        )["code"]
        == "model_not_found"
    )
    assert _error(httpx.get(url + "/v1/nothing", headers=AUTH), 404)["code"] == "not_found"
    _error(httpx.get(url + "/v1/chat/completions", headers=AUTH), 405)


def test_too_large_body_gets_413(url):
    big = _chat("x" * (70 * 1024))
    error = _error(httpx.post(url + "/v1/chat/completions", json=big, headers=AUTH), 413)
    assert error["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds on the bytes actually sent
        yield b'{"model": "eta-guard", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}]}'

    resp = httpx.post(
        url + "/v1/chat/completions",
        content=chunked(),
        headers={**AUTH, "content-type": "application/json"},
    )
    _error(resp, 413)


def test_moderation_limits(url):
    error = _error(
        httpx.post(url + "/v1/moderations", json={"input": ["a"] * 33}, headers=AUTH), 400
    )
    assert "at most 32" in error["message"]
    _error(httpx.post(url + "/v1/moderations", json={"input": []}, headers=AUTH), 400)


# ----------------------------------------------------------------------------- 500 / 503 / 429 / 504


async def _until_metric(client: httpx.AsyncClient, line: str, timeout_s: float = 20.0) -> None:
    """Wait (bounded) until /metrics shows ``line``: no guessing how long a step takes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if line in (await client.get("/metrics")).text.splitlines():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"/metrics never showed {line!r}")


class _Gated:
    """An ETA stand-in whose calls wait for a gate (or their cancel event), then fail or answer."""

    def __init__(self, eta, *, fail: bool = False) -> None:
        self.eta, self.fail = eta, fail
        self.evaluator = eta.evaluator
        self.gate = threading.Event()
        self.stopped = threading.Event()

    async def astream(self, messages, *, stop=None, cancel=None, **overrides):
        while not self.gate.is_set():
            if cancel is not None and cancel.is_set():
                self.stopped.set()
                return
            await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("secret internals at /home/user/model.py line 3")
        async for chunk in self.eta.astream(messages, stop=stop, cancel=cancel, **overrides):
            yield chunk

    async def aclose(self):
        await self.eta.aclose()


def test_unexpected_error_is_500_without_internals(parts):
    gated = _Gated(parts, fail=True)
    gated.gate.set()
    with _serve(gated) as base:
        for stream in (False, True):
            resp = httpx.post(
                base + "/v1/chat/completions", json=_chat(stream=stream), headers=AUTH
            )
            error = _error(resp, 500)
            assert "secret" not in error["message"] and "/home" not in error["message"]
            assert error["code"] == "internal_error"
            assert resp.headers["x-request-id"] in error["message"]


def test_loading_server_is_503_until_ready(parts):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    release = threading.Event()

    def loader():
        release.wait(10)
        return parts, parts.evaluator

    app = create_app(loader=loader, settings=ServerSettings(api_keys={KEY}))
    with serve_in_thread(app) as base:
        assert httpx.get(base + "/health").status_code == 503
        resp = httpx.post(base + "/v1/moderations", json={"input": "x"}, headers=AUTH)
        assert _error(resp, 503)["code"] == "not_ready"
        assert resp.headers["retry-after"]
        release.set()
        for _ in range(200):
            if httpx.get(base + "/health").status_code == 200:
                break
            time.sleep(0.05)
        assert (
            httpx.post(base + "/v1/moderations", json={"input": "x"}, headers=AUTH).status_code
            == 200
        )


async def test_full_queue_is_429_and_deadline_is_504(parts):
    gated = _Gated(parts)
    with _serve(gated, max_queue=1, request_timeout_s=1.5) as base:
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=30) as client:
            running = asyncio.create_task(client.post("/v1/chat/completions", json=_chat()))
            await _until_metric(client, "eta_model_busy 1.0")  # holds the model
            queued = asyncio.create_task(client.post("/v1/chat/completions", json=_chat()))
            await _until_metric(client, "eta_queue_depth 1.0")  # waits in the queue (1 place)
            refused = await client.post("/v1/chat/completions", json=_chat())
            assert _error(refused, 429)["type"] == "rate_limit_error"
            assert refused.headers["retry-after"] == "1"
            first, second = await running, await queued
        assert _error(first, 504)["code"] == "deadline_exceeded"
        assert _error(second, 504)["code"] == "deadline_exceeded"
        assert gated.stopped.wait(5)  # the deadline stopped the running call
        metrics = httpx.get(base + "/metrics", headers=AUTH).text
        assert 'eta_cancelled_total{reason="deadline"} 2.0' in metrics
        assert 'eta_requests_total{route="chat",status="429"} 1.0' in metrics


# ----------------------------------------------------------------------------- cancellation


class _RecordingVLM:
    """Proxy of a VLMAdapter that counts its model's forwards (to see when decoding stopped)."""

    def __init__(self, inner) -> None:
        self.inner, self.forwards = inner, 0
        self._hook = inner.model.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.forwards += 1

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stopped_early(self, budget: int) -> bool:
        """Decoding ran, stopped before ``budget`` tokens and stays stopped; removes the hook."""
        seen = self.forwards
        time.sleep(0.3)
        self._hook.remove()
        return 0 < seen == self.forwards < budget


@pytest.mark.parametrize("path", ["streamed", "held_back"])
def test_client_disconnect_stops_generation_and_frees_the_model(parts, image_url, path):
    from eta_guard import ETA

    vlm = _RecordingVLM(parts.vlm)
    threshold = {"streamed": 1.01, "held_back": -1.01}[path]
    eta = ETA(vlm, parts.evaluator, parts.config.with_overrides(pre_threshold=threshold))
    body = _chat(
        [
            {"type": "text", "text": "Describe it."},
            {"type": "image_url", "image_url": {"url": image_url}},
        ],
        max_tokens=2000,
        stream=True,
    )
    with _serve(eta, keepalive_s=0.02) as base:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH) as resp:
            lines = resp.iter_lines()
            for _ in range(3):  # role chunk and a keep-alive or two / first tokens
                next(lines)
        # The connection is closed now. The server must stop decoding and free the model.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = httpx.get(base + "/metrics", headers=AUTH).text
            if "eta_model_busy 0.0" in metrics and vlm.forwards:
                break
            time.sleep(0.05)
        assert 'eta_cancelled_total{reason="client_gone"} 1.0' in metrics
        assert vlm.stopped_early(2000)  # stopped early, not decoded to the end
        # The next request runs normally.
        nxt = httpx.post(base + "/v1/chat/completions", json=_chat(max_tokens=4), headers=AUTH)
        assert nxt.status_code == 200 and nxt.json()["choices"][0]["finish_reason"]


def test_error_after_the_stream_started_is_an_sse_error_event(parts):
    import openai

    gated = _Gated(parts, fail=True)
    threading.Timer(0.5, gated.gate.set).start()  # fails after the first keep-alive period
    with _serve(gated, keepalive_s=0.05) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        stream = client.chat.completions.create(**_chat(), stream=True)
        with pytest.raises(openai.APIError, match="internal server error") as info:
            for _ in stream:
                pass
        assert "secret" not in str(info.value)
        metrics = httpx.get(base + "/metrics", headers=AUTH).text
        assert 'eta_requests_total{route="chat",status="500"} 1.0' in metrics


def test_unauthenticated_bad_body_gets_401_not_validation_details(url):
    resp = httpx.post(url + "/v1/chat/completions", json={"messages": "nonsense"})
    _error(resp, 401)


def test_one_log_line_per_request_without_contents(url, caplog):
    secret = "my-private-question-" + secrets.token_hex(4)
    with caplog.at_level("INFO", logger="eta_guard.server"):
        resp = httpx.post(
            url + "/v1/chat/completions", json=_chat(secret, max_tokens=3), headers=AUTH
        )
        assert resp.status_code == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            resp.headers["x-request-id"] in r.getMessage() for r in caplog.records
        ):
            time.sleep(0.02)
    lines = [
        r.getMessage() for r in caplog.records if resp.headers["x-request-id"] in r.getMessage()
    ]
    assert len(lines) == 1
    assert "POST /v1/chat/completions 200" in lines[0] and "verdict=safe" in lines[0]
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_moderation_only_mode(parts):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    app = create_app(evaluator=parts.evaluator, settings=ServerSettings(api_keys={KEY}))
    with serve_in_thread(app) as base:
        assert httpx.get(base + "/health").json()["mode"] == "moderation-only"
        chat = httpx.post(base + "/v1/chat/completions", json=_chat(), headers=AUTH)
        assert _error(chat, 404)["code"] == "moderation_only"
        mod = httpx.post(base + "/v1/moderations", json={"input": "text"}, headers=AUTH)
        assert mod.status_code == 200 and len(mod.json()["results"]) == 1


async def test_too_many_concurrent_requests_get_429_before_their_body_is_read(parts):
    gated = _Gated(parts)
    with _serve(gated, max_concurrent_requests=1) as base:
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=30) as client:
            running = asyncio.create_task(
                client.post("/v1/chat/completions", json=_chat(max_tokens=4))
            )
            await _until_metric(client, "eta_model_busy 1.0")
            refused = await client.post("/v1/moderations", json={"input": "x"})
            error = _error(refused, 429)
            assert error["code"] == "too_many_requests" and refused.headers["retry-after"] == "1"
            gated.gate.set()
            assert (await running).status_code == 200
        assert (
            httpx.post(base + "/v1/moderations", json={"input": "x"}, headers=AUTH).status_code
            == 200
        )


def test_non_streaming_client_that_gives_up_stops_its_generation(parts, image_url):
    from eta_guard import ETA

    vlm = _RecordingVLM(parts.vlm)
    eta = ETA(vlm, parts.evaluator, parts.config.with_overrides(pre_threshold=-1.01))
    content = [
        {"type": "text", "text": "Describe it."},
        {"type": "image_url", "image_url": {"url": image_url}},
    ]
    with _serve(eta) as base:
        with pytest.raises(httpx.ReadTimeout):  # the client closes its connection
            httpx.post(
                base + "/v1/chat/completions",
                json=_chat(content, max_tokens=2000),
                headers=AUTH,
                timeout=0.5,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = httpx.get(base + "/metrics", headers=AUTH).text
            if "eta_model_busy 0.0" in metrics and vlm.forwards:
                break
            time.sleep(0.05)
        assert 'eta_cancelled_total{reason="client_gone"} 1.0' in metrics
        assert vlm.stopped_early(2000)


def test_explicit_nulls_mean_defaults(url):
    body = _chat(
        n=None,
        stream=None,
        stop=None,
        seed=None,
        temperature=None,
        max_tokens=None,
        stream_options=None,
        tools=None,
        user="someone",
    )
    resp = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 3}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "chat.completion"


def test_engine_request_limits_give_400_on_a_streaming_request(url):
    """More images than ETAConfig.max_images_per_request: a 400, also on a streaming request."""
    from eta_guard import ETAConfig
    from eta_guard.testing import image_to_data_url, make_test_image

    many = ETAConfig().max_images_per_request + 1
    small = image_to_data_url(make_test_image("red", (8, 8)))
    content = [{"type": "image_url", "image_url": {"url": small}}] * many
    body = _chat([*content, {"type": "text", "text": "?"}], stream=True)
    error = _error(httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH), 400)
    assert str(many) in error["message"]


def test_streaming_client_that_leaves_while_queued_leaves_the_queue(parts):
    gated = _Gated(parts)
    with _serve(gated, max_queue=1, keepalive_s=30) as base:
        holder = threading.Thread(
            target=httpx.post,
            args=(base + "/v1/chat/completions",),
            kwargs={"json": _chat(max_tokens=3), "headers": AUTH, "timeout": 30},
        )
        holder.start()

        async def model_busy():  # the first request holds the model
            async with httpx.AsyncClient(base_url=base, headers=AUTH) as client:
                await _until_metric(client, "eta_model_busy 1.0")

        asyncio.run(model_busy())
        with pytest.raises(httpx.ReadTimeout):  # no headers yet: it waits in the queue, gives up
            httpx.post(
                base + "/v1/chat/completions", json=_chat(stream=True), headers=AUTH, timeout=0.5
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            metrics = httpx.get(base + "/metrics", headers=AUTH).text
            if 'eta_cancelled_total{reason="client_gone"} 1.0' in metrics:
                break
            time.sleep(0.05)
        assert 'eta_cancelled_total{reason="client_gone"} 1.0' in metrics
        assert "eta_queue_depth 0.0" in metrics
        gated.gate.set()
        holder.join(timeout=30)


def test_failed_load_is_reported_not_hidden(caplog):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    def loader():
        raise OSError("no such checkpoint /secret/path")

    app = create_app(loader=loader, settings=ServerSettings(api_keys={KEY}))
    with caplog.at_level("ERROR", logger="eta_guard.server"), serve_in_thread(app) as base:
        for _ in range(100):
            if httpx.get(base + "/health").json()["status"] == "failed":
                break
            time.sleep(0.05)
        assert httpx.get(base + "/health").json()["status"] == "failed"
        error = _error(httpx.post(base + "/v1/moderations", json={"input": "x"}, headers=AUTH), 503)
        assert error["code"] == "load_failed" and "/secret" not in error["message"]
    assert any("loading the models failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_budget_fields(url, field):
    resp = httpx.post(url + "/v1/chat/completions", json=_chat(**{field: 2}), headers=AUTH)
    assert resp.status_code == 200
    assert resp.json()["usage"]["completion_tokens"] <= 2
    assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")

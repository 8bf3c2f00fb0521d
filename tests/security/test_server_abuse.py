"""Issue 18, hardening items 3, 6 and 8: what a client can do to `eta-guard serve`.

3. Slow request bodies without a key must not lock authenticated clients out (the in-flight
   cap was taken before authentication and before the body was read, with no body timeout).
6. A non-streaming request whose client left must stop at the next token (the disconnect was
   noticed only after 0.5 s without a token, i.e. never while tokens flow).
8. 400 bodies never quote the checkpoint path or inner exception text; the key is checked before
   the body is read (invalid JSON without a key is a 401, and a big body is not parsed); a keyless
   server reached on loopback answers only loopback Host names (DNS rebinding).

Real uvicorn on 127.0.0.1 and a free port, bounded loops; random tiny checkpoints (mechanics,
not safety).
"""

from __future__ import annotations

import base64
import io
import secrets
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from eta_guard import ETA, ETAConfig, ETAEvaluator

KEY = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {KEY}"}


def _serve(target, **settings):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    if isinstance(target, ETAEvaluator):
        return serve_in_thread(create_app(evaluator=target, settings=ServerSettings(**settings)))
    return serve_in_thread(create_app(target, settings=ServerSettings(**settings)))


@pytest.fixture(scope="module")
def evaluator(tiny_checkpoints) -> ETAEvaluator:
    c = tiny_checkpoints
    return ETAEvaluator.from_pretrained(clip=c.clip, reward_model=c.reward_model)


@pytest.fixture(scope="module")
def eta(tiny_checkpoints) -> ETA:
    c = tiny_checkpoints
    cfg = ETAConfig(max_new_tokens=2000, pre_threshold=1.01)  # images pass: tokens flow
    return ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model, config=cfg)


def _slow_post(base: str, *, key: str | None = None) -> socket.socket:
    """Open a POST that declares 1,000 body bytes and sends one."""
    u = urlparse(base)
    sock = socket.create_connection((u.hostname, u.port), timeout=5)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock.sendall(
        (
            f"POST /v1/moderations HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        ).encode()
    )
    return sock


def _status_of(sock: socket.socket, timeout: float) -> int | None:
    sock.settimeout(timeout)
    try:
        head = sock.recv(64)
    except (TimeoutError, OSError):
        return None
    return int(head.split()[1]) if head.startswith(b"HTTP/") else None


# ------------------------------------------------------------------ item 3: slow bodies


def test_slow_bodies_without_a_key_never_take_a_slot(evaluator):
    with _serve(evaluator, api_keys={KEY}, max_concurrent_requests=4) as base:
        socks = [_slow_post(base) for _ in range(12)]
        try:
            # Each is refused from its headers alone, before its body.
            assert [_status_of(s, 5.0) for s in socks] == [401] * 12
            resp = httpx.post(f"{base}/v1/moderations", json={"input": "hi"}, headers=AUTH)
            assert resp.status_code == 200, resp.text
        finally:
            for s in socks:
                s.close()


def test_a_slow_body_with_a_key_times_out_and_frees_its_place(evaluator):
    with _serve(evaluator, api_keys={KEY}, max_concurrent_requests=2, body_timeout_s=1.0) as base:
        socks = [_slow_post(base, key=KEY) for _ in range(2)]
        try:
            started = time.monotonic()
            # While they trickle, the ready request still gets a slot (slots are taken after the
            # body): only the reading places are full, so it is 429 now, and fine after 408s.
            statuses = [_status_of(s, 5.0) for s in socks]
            waited = time.monotonic() - started
            assert statuses == [408, 408] and waited < 3.0, (statuses, waited)
            resp = httpx.post(f"{base}/v1/moderations", json={"input": "hi"}, headers=AUTH)
            assert resp.status_code == 200, resp.text
        finally:
            for s in socks:
                s.close()


# ------------------------------------------------------------- item 6: client disconnect


class _Recorder:
    """Wraps an ETA: counts the tokens its stream yields and notes when the stream ended."""

    def __init__(self, eta: ETA) -> None:
        self.eta, self.evaluator = eta, eta.evaluator
        self.items = 0
        self.ended = threading.Event()
        self.ended_at = 0.0

    async def astream(self, messages, *, stop=None, cancel=None, **overrides):
        try:
            async for item in self.eta.astream(messages, stop=stop, cancel=cancel, **overrides):
                self.items += 1
                yield item
        finally:
            self.ended_at = time.monotonic()
            self.ended.set()

    async def aclose(self):
        await self.eta.aclose()


def test_non_streaming_request_stops_when_its_client_leaves(eta):
    recorder = _Recorder(eta)
    body = {
        "model": "eta-guard",
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": 2000,
    }
    with _serve(recorder) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=body, timeout=httpx.Timeout(1.5))
        left = time.monotonic()
        at_leave = recorder.items
        assert recorder.ended.wait(30)
    assert at_leave > 0, "no token was generated before the client left"
    stopped_after = recorder.ended_at - left
    print(f"generation stopped {stopped_after:.3f} s after the client left")
    assert stopped_after < 0.5, f"kept generating {stopped_after:.2f} s after the client left"
    assert recorder.items < 1900  # not run to max_tokens


# --------------------------------------------------------------- item 8: what leaks, when


def test_key_is_checked_before_the_body_is_parsed(evaluator):
    with _serve(evaluator, api_keys={KEY}) as base:
        bad_json = httpx.post(
            f"{base}/v1/moderations",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert bad_json.status_code == 401, bad_json.text
        big = b'{"input": "' + b"a" * (19 * 1024 * 1024) + b'"}'
        started = time.perf_counter()
        resp = httpx.post(
            f"{base}/v1/moderations", content=big, headers={"content-type": "application/json"}
        )
        elapsed = time.perf_counter() - started
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        # With a key, invalid JSON is the 400 it was.
        assert (
            httpx.post(
                f"{base}/v1/moderations",
                content=b"{not json",
                headers={**AUTH, "content-type": "application/json"},
            ).status_code
            == 400
        )
    print(f"19 MB body without a key: 401 in {elapsed:.3f} s")


def test_keyless_loopback_server_refuses_foreign_host_names(evaluator):
    with _serve(evaluator) as base:
        port = urlparse(base).port
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io"):
            resp = httpx.post(
                f"{base}/v1/moderations", json={"input": "hi"}, headers={"Host": host}
            )
            assert resp.status_code == 421, (host, resp.text)
            assert httpx.get(f"{base}/v1/models", headers={"Host": host}).status_code == 421
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
            resp = httpx.post(
                f"{base}/v1/moderations", json={"input": "hi"}, headers={"Host": host}
            )
            assert resp.status_code == 200, (host, resp.text)
    with _serve(evaluator, allowed_hosts={"guard.internal"}) as base:
        resp = httpx.post(
            f"{base}/v1/moderations", json={"input": "hi"}, headers={"Host": "guard.internal"}
        )
        assert resp.status_code == 200
    with _serve(evaluator, api_keys={KEY}) as base:  # keys: a rebinding page cannot authenticate
        resp = httpx.post(
            f"{base}/v1/moderations", json={"input": "hi"}, headers={**AUTH, "Host": "a.example"}
        )
        assert resp.status_code == 200


def _data_url() -> str:
    from eta_guard.testing import make_test_image

    buf = io.BytesIO()
    make_test_image("noise").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    "template",
    [
        # Drops the image placeholder: the processor raises with transformers' own text.
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}",
        "{{ raise_exception('Conversation roles must alternate') }}",
    ],
    ids=["processor", "template"],
)
def test_400_bodies_quote_neither_the_checkpoint_path_nor_inner_text(tiny_checkpoints, template):
    c = tiny_checkpoints
    eta = ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model)
    eta.vlm.processor.chat_template = template
    body = {
        "model": "eta-guard",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _data_url()}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
    }
    with _serve(eta) as base:
        resp = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert str(c.vlm) not in message and "tiny" not in message.lower(), message
    assert "<image> tokens" not in message and "Traceback" not in message, message

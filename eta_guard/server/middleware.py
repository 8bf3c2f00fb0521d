"""Pure-ASGI middleware: request id, concurrency cap (429), body size limit (413), one log line
and request metrics.

The body is read here, up to the limit, before any route sees it, so an oversized or endless
(chunked) upload is cut off without being parsed. The log line has the method, route, status,
time, size and ETA's verdict, never message contents.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eta_guard.server.auth import key_error
from eta_guard.server.errors import APIError

log = logging.getLogger("eta_guard.server")
ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/moderations": "moderations",
    "/v1/models": "models",
    "/health": "health",
    "/metrics": "metrics",
}


class RequestGuard:
    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app, self.state = app, state
        self.inflight = 0  # POST requests being handled (the event loop is single-threaded)
        self.reading = 0  # authenticated POST bodies being read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = secrets.token_hex(6)
        scope.setdefault("state", {})["request_id"] = request_id
        route = ROUTES.get(scope["path"].rstrip("/") or "/", "other")
        status = {"code": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        size, body = 0, b""
        counted = False  # holds an in-flight slot
        try:
            refused = _host_error(scope, self.state.settings)
            if refused is None and scope["method"] in ("POST", "PUT", "PATCH"):
                # Order matters: who may send (key), then the body (bounded in time and size),
                # then a slot. A client without a key, or a slow body, never holds a slot.
                refused = key_error(_header(scope, b"authorization"), self.state.settings.api_keys)
                if refused is None:
                    body, refused = await self._read_body_bounded(scope, receive)
                if refused is None:
                    size = len(body)
                    receive = _replay(body, receive)
                    counted = True
                    self.inflight += 1
                    if self.inflight > self.state.settings.max_concurrent_requests:
                        refused = _too_many()
            if refused is not None:
                await _send_error(send_wrapper, refused)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                self.inflight -= 1
            elapsed = time.perf_counter() - started
            code = scope["state"].get("stream_error") or status["code"] or 499
            metrics = self.state.metrics
            metrics.requests.labels(route, str(code)).inc()
            metrics.latency.labels(route).observe(elapsed)
            extra = scope["state"].get("log_extra") or {}
            log.info(
                "%s %s %s %s %.3fs %dB%s",
                request_id,
                scope["method"],
                scope["path"] if route != "other" else "(other)",
                code,
                elapsed,
                size,
                "".join(f" {k}={v}" for k, v in extra.items()),
            )

    async def _read_body_bounded(
        self, scope: Scope, receive: Receive
    ) -> tuple[bytes, APIError | None]:
        """The body, or the error to answer: too many bodies being read (429), too large (413),
        not sent within ``body_timeout_s`` (408)."""
        settings = self.state.settings
        if self.reading >= settings.max_concurrent_requests:
            return b"", _too_many()
        self.reading += 1
        try:
            body = await asyncio.wait_for(self._read_body(scope, receive), settings.body_timeout_s)
        except TimeoutError:
            return b"", _body_timeout(settings.body_timeout_s)
        finally:
            self.reading -= 1
        if body is None:
            return b"", _too_large(settings.max_request_bytes)
        return body, None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it exceeds the limit (header or actual bytes)."""
        limit = self.state.settings.max_request_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


def _host_error(scope: Scope, settings: Any) -> APIError | None:
    """421 for a keyless server reached on a loopback address under a foreign ``Host``.

    A web page can point its own domain at 127.0.0.1 (DNS rebinding) and then talk to a local
    keyless server as same-origin; its requests carry that domain as ``Host``. With keys the page
    cannot authenticate, and a non-loopback bind is the operator's explicit choice.
    """
    if settings.api_keys:
        return None
    server = scope.get("server")
    try:
        loopback = server is not None and ipaddress.ip_address(server[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    host = _header(scope, b"host").strip().lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name in _LOOPBACK_NAMES or host in _LOOPBACK_NAMES or name in settings.allowed_hosts:
        return None
    return APIError(
        421,
        "this server has no API keys and answers only Host: localhost / 127.0.0.1 / [::1]; "
        "set keys or list the host in ServerSettings.allowed_hosts",
        code="host_not_allowed",
    )


def _body_timeout(seconds: float) -> APIError:
    return APIError(
        408,
        f"the request body was not received within {seconds:g} s",
        code="request_timeout",
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for http.disconnect, as the server's would

    return replay


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes; send smaller "
        "or fewer images",
        code="request_too_large",
    )


def _too_many() -> APIError:
    return APIError(
        429,
        "the server is handling too many requests at once; retry later",
        type="rate_limit_error",
        code="too_many_requests",
        headers={"Retry-After": "1"},
    )


async def _send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"connection", b"close"),
                *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

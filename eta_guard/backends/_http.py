"""HTTP to an OpenAI-compatible engine: one pooled async client per event loop, retries, typed errors."""

from __future__ import annotations

import asyncio
import json
import random
import weakref
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

try:
    import httpx
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "talking to an OpenAI-compatible engine needs httpx: pip install 'eta-guard[remote]'"
    ) from e

from eta_guard.errors import BackendError, InvalidInputError
from eta_guard.sync_bridge import run_sync

T = TypeVar("T")

#: Statuses worth another try: the engine is overloaded, restarting or behind a proxy that is.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HTTPSettings:
    """How ETA talks to an engine.

    Attributes:
        timeout: seconds for one request (connect, each read, write); a streamed answer may take
            longer in total, but never ``timeout`` between two chunks.
        connect_timeout: seconds to open a connection.
        max_retries: further tries after a connection error, a timeout or a 408/429/5xx answer
            (0: one try). A stream is retried only before its first chunk arrived.
        backoff: seconds before the first retry; doubled each time, with jitter.
        max_connections: pooled connections per event loop (bounds the requests in flight).
    """

    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_retries: int = 2
    backoff: float = 0.25
    max_connections: int = 64

    def __post_init__(self) -> None:
        for name in ("timeout", "connect_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise InvalidInputError(f"{name}={value!r}: must be a positive number of seconds")
        if not (isinstance(self.max_retries, int) and self.max_retries >= 0):
            raise InvalidInputError(f"max_retries={self.max_retries!r}: must be an int >= 0")
        if not (isinstance(self.backoff, (int, float)) and self.backoff >= 0):
            raise InvalidInputError(f"backoff={self.backoff!r}: must be >= 0 seconds")
        if not (isinstance(self.max_connections, int) and self.max_connections >= 1):
            raise InvalidInputError(
                f"max_connections={self.max_connections!r}: must be an int >= 1"
            )


class EngineClient:
    """JSON over HTTP to one engine, usable from any event loop and from plain threads.

    httpx's async client belongs to the loop that created it, so each loop gets its own pooled
    client; synchronous callers run on one background loop owned by this object.

    Args:
        base_url: the engine's root, e.g. ``http://127.0.0.1:8000`` or ``.../v1`` (the ``/v1``
            suffix is optional: paths below are given from the root).
        api_key: sent as ``Authorization: Bearer <key>``.
        settings: timeouts, retries, pool size.
    """

    def __init__(
        self, base_url: str, *, api_key: str | None = None, settings: HTTPSettings | None = None
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidInputError(
                f"base_url={base_url!r}: give the engine's http(s) URL, e.g. 'http://127.0.0.1:8000'"
            )
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.settings = settings or HTTPSettings()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    # ----- clients -----
    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            s = self.settings
            client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._headers,
                timeout=httpx.Timeout(s.timeout, connect=s.connect_timeout),
                limits=httpx.Limits(
                    max_connections=s.max_connections, max_keepalive_connections=s.max_connections
                ),
                trust_env=False,  # never route an engine on 127.0.0.1 through a proxy
            )
            self._clients[loop] = client
        return client

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the shared background loop and wait for it (for synchronous callers)."""
        return run_sync(coro)

    async def aclose(self) -> None:
        """Close the client of the running loop."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def close(self) -> None:
        """Close the background loop's client (clients of other loops close with :meth:`aclose`)."""
        run_sync(self.aclose())

    # ----- requests -----
    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` and return the JSON object answered, retrying transient failures."""
        for attempt in range(self.settings.max_retries + 1):
            try:
                response = await self._client().post(path, json=body)
            except httpx.TimeoutException as e:
                error = BackendError(
                    f"the engine at {self.base_url} did not answer POST {path} within "
                    f"{self.settings.timeout}s ({type(e).__name__}); raise HTTPSettings.timeout "
                    "or check the engine's load"
                )
            except httpx.TransportError as e:
                error = BackendError(
                    f"cannot reach the engine at {self.base_url} (POST {path}): "
                    f"{type(e).__name__}: {e}; is it running, and is base_url right?"
                )
            else:
                if response.status_code < 400:
                    return _json_object(response, path)
                error = _status_error(response, path)
                if response.status_code not in _RETRY_STATUSES:
                    raise error
            if attempt == self.settings.max_retries:
                raise error
            await self._sleep(attempt)
        raise AssertionError("unreachable")

    async def stream_sse(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST ``body`` with ``stream=true`` and yield each ``data:`` event's JSON object.

        Retries like :meth:`post_json` until the first event arrived; after that a failure is
        raised (a half-sent answer cannot be replayed).
        """
        for attempt in range(self.settings.max_retries + 1):
            started = False
            try:
                async with self._client().stream("POST", path, json=body) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        error = _status_error(response, path)
                        if response.status_code not in _RETRY_STATUSES:
                            raise error
                    else:
                        async for line in response.aiter_lines():
                            if not line.startswith("data:"):
                                continue  # SSE comments, event names, blank separators
                            data = line[len("data:") :].strip()
                            if data == "[DONE]":
                                return
                            started = True
                            yield _json_event(data, path)
                        raise BackendError(
                            f"the engine's stream for POST {path} ended without 'data: [DONE]'"
                        )
            except httpx.TimeoutException as e:
                error = BackendError(
                    f"the engine at {self.base_url} went silent for over {self.settings.timeout}s "
                    f"during POST {path} ({type(e).__name__})"
                )
                if started:
                    raise error from e
            except httpx.TransportError as e:
                error = BackendError(
                    f"lost the engine at {self.base_url} during POST {path}: "
                    f"{type(e).__name__}: {e}"
                    if started
                    else f"cannot reach the engine at {self.base_url} (POST {path}): "
                    f"{type(e).__name__}: {e}; is it running, and is base_url right?"
                )
                if started:
                    raise error from e
            if attempt == self.settings.max_retries:
                raise error
            await self._sleep(attempt)

    async def _sleep(self, attempt: int) -> None:
        delay = self.settings.backoff * (2**attempt)
        await asyncio.sleep(delay * (0.5 + random.random()))  # jitter spreads retry storms


def _status_error(response: httpx.Response, path: str) -> BackendError:
    try:
        detail = response.json()
        message = detail.get("error", {}).get("message") if isinstance(detail, dict) else None
        message = message or detail.get("message") or str(detail)
    except (ValueError, AttributeError):
        message = response.text[:300]
    return BackendError(
        f"the engine answered POST {path} with HTTP {response.status_code}: {message}",
        status=response.status_code,
    )


def _json_object(response: httpx.Response, path: str) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError as e:
        raise BackendError(
            f"the engine answered POST {path} with non-JSON: {response.text[:200]!r}"
        ) from e
    if not isinstance(value, dict):
        raise BackendError(
            f"the engine answered POST {path} with {type(value).__name__}, not an object"
        )
    return value


def _json_event(data: str, path: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as e:
        raise BackendError(f"the engine streamed non-JSON for POST {path}: {data[:200]!r}") from e
    if not isinstance(value, dict):
        raise BackendError(f"the engine streamed {type(value).__name__} for POST {path}")
    if "error" in value and "choices" not in value:
        err = value["error"]
        message = err.get("message") if isinstance(err, dict) else err
        raise BackendError(f"the engine reported an error mid-stream for POST {path}: {message}")
    return value


class ReplyShapeError(BackendError):
    """The engine answered 2xx but not in the API's shape."""


def field(obj: Any, *path: str | int, kind: type | tuple[type, ...] = object, what: str) -> Any:
    """``obj[path...]`` checked against ``kind``; a :class:`ReplyShapeError` naming ``what`` otherwise."""
    value = obj
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError) as e:
            raise ReplyShapeError(
                f"malformed reply to {what}: missing {'.'.join(map(str, path))}"
            ) from e
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise ReplyShapeError(
            f"malformed reply to {what}: {'.'.join(map(str, path))} is {type(value).__name__}"
        )
    return value

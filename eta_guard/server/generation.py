"""The core both generation routes share: validate, queue, run ETA, answer (JSON or SSE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from eta_guard.limits import RequestLimits
from eta_guard.messages import normalize_messages
from eta_guard.remote_fetch import RemoteFetchPolicy
from eta_guard.server.disconnect import watch_disconnect
from eta_guard.server.errors import bad_request, from_exception, request_id_of
from eta_guard.server.openai_format import KEEPALIVE, Formatter, Kind, sse
from eta_guard.server.scheduler import Event, Job
from eta_guard.server.schemas import GenerationRequest
from eta_guard.server.state import ServerState
from eta_guard.verdict import ETAResult

#: Longest wait for an event before a non-streaming request looks at its disconnect watcher.
_DISCONNECT_POLL_S = 0.5


async def generate(
    request: Request,
    state: ServerState,
    body: GenerationRequest,
    messages: Any,
    *,
    kind: Kind,
    route: str,
    tool_parser: str | None = None,
) -> Response:
    """Answer ``messages`` with ETA as ``kind`` (chat or text completion), streamed if asked.

    ``messages`` is a message list or the engine's request form (with ``tools``...);
    ``tool_parser`` names the parser that reads the answer's calls when tools are offered.
    """
    eta = state.require_eta()
    state.check_model(body.model)
    body.check_supported()
    cfg = state.config()
    overrides: dict[str, Any] = {"allow_local_image_files": False}
    limit = state.settings.max_tokens_limit or cfg.max_new_tokens
    wanted = body.requested_max_tokens()
    if wanted is not None and wanted > limit:
        raise bad_request(
            f"max_tokens={wanted} is above this server's limit of {limit}", param="max_tokens"
        )
    overrides["max_new_tokens"] = min(wanted or limit, limit)
    if body.seed is not None:
        overrides["seed"] = body.seed
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    # Check the messages and decode the images now, so that bad input gets a 400 before it is
    # queued or any stream starts (the engine checks them again, with the same settings). A
    # worker thread, not the model thread: decoding images runs no model, and fetching a remote
    # one is I/O that must never hold the model thread.
    await asyncio.to_thread(_check_like_the_engine, messages, cfg)
    request.state.log_extra = {}
    job = state.scheduler.submit(
        lambda cancel: eta.astream(messages, stop=stop, cancel=cancel, **overrides),
        timeout_s=state.settings.request_timeout_s,
        route=route,
    )
    fmt = Formatter(kind, state.settings.served_model_name, tool_parser=tool_parser)
    ignored = body.ignored_parameters()
    if not body.streaming:
        return await _answer(request, state, job, fmt, ignored, route)
    # Wait a little for the first event: an error raised right away (e.g. a prompt too long for
    # the context) still gets its proper HTTP status instead of an error event.
    try:
        first, gone = await _first_event(request, job, state.settings.keepalive_s)
    except BaseException:
        job.close()
        raise
    if gone:
        job.cancel("client_gone")
        return Response(status_code=499)
    if first is not None and first[0] == "error":
        job.close()
        raise from_exception(first[1], request_id_of(request))
    return StreamingResponse(
        _stream(request, state, job, fmt, ignored, route, first, body.include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _first_event(request: Request, job: Job, wait_s: float) -> tuple[Event | None, bool]:
    """``(event, client_gone)``: the job's first event within ``wait_s`` (None if none came)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        event = await job.next(min(left, _DISCONNECT_POLL_S))
        if event is not None:
            return event, False
        if await request.is_disconnected():
            return None, True
    return None, False


def _check_like_the_engine(messages: Any, cfg: Any) -> None:
    """``normalize_messages`` with the arguments ``ETA`` passes (every request limit included)."""
    normalize_messages(
        messages,
        allow_remote_images=cfg.allow_remote_images,
        allow_local_image_files=False,
        max_image_pixels=cfg.max_image_pixels,
        limits=RequestLimits.from_config(cfg),
        remote=RemoteFetchPolicy.from_config(cfg),
    )


async def _answer(
    request: Request, state: ServerState, job: Job, fmt: Formatter, ignored: list[str], route: str
) -> Response:
    result: ETAResult | None = None
    watcher = watch_disconnect(request, job)  # cancels the job at once: the next token stops it
    try:
        while True:
            event = await job.next(_DISCONNECT_POLL_S)
            if watcher.done():
                return Response(status_code=499)  # nobody reads it; logged as such
            if event is None:
                continue
            kind, value = event
            if kind == "item":
                result = value.result or result
            elif kind == "error":
                raise from_exception(value, request_id_of(request))
            else:
                break
    finally:
        watcher.cancel()
        job.close()
    if result is None:
        raise from_exception(
            RuntimeError("the engine ended without a result"), request_id_of(request)
        )
    _record(request, state, route, result)
    return JSONResponse(fmt.response(result, ignored))


async def _stream(
    request: Request,
    state: ServerState,
    job: Job,
    fmt: Formatter,
    ignored: list[str],
    route: str,
    first: Event | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    keepalive = state.settings.keepalive_s
    result: ETAResult | None = None
    try:
        opening = fmt.first_chunk(include_usage)
        if opening is not None:
            yield opening
        pending = first
        while True:
            event = pending if pending is not None else await job.next(keepalive)
            pending = None
            if event is None:  # held back for the reward model, or queued: keep proxies alive
                yield KEEPALIVE
                continue
            kind, value = event
            if kind == "item":
                if value.result is not None:
                    result = value.result
                elif value.text and (chunk := fmt.text_chunk(value.text, include_usage)):
                    yield chunk
            elif kind == "done" and result is not None:
                try:
                    last = fmt.last_chunks(result, ignored, include_usage)
                except RuntimeError as e:  # streamed text the answer does not start with
                    kind, value = "error", e
                else:
                    _record(request, state, route, result)
                    for chunk in last:
                        yield chunk
                    return
            if kind != "item":
                if kind == "done":  # the engine promises a result; never end a stream silently
                    value = RuntimeError("the engine ended without a result")
                error = from_exception(value, request_id_of(request))
                request.state.stream_error = error.status
                yield sse(error.body())
                yield "data: [DONE]\n\n"
                return
    finally:
        job.close()  # a client that went away (Starlette cancels us) stops the generation


def _record(request: Request, state: ServerState, route: str, result: ETAResult) -> None:
    verdict = "unsafe" if result.verdict.unsafe else "safe"
    state.metrics.verdicts.labels(route, verdict).inc()
    if result.aligned:
        state.metrics.aligned.inc()
    request.state.log_extra = {"verdict": verdict, "aligned": result.aligned}

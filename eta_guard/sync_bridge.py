"""Bridges between synchronous and async code.

One background event loop runs async code for synchronous callers (a daemon thread, started
lazily): :func:`run_sync`, :func:`iterate_sync`. Async callers (the server included) drive the
async core directly; model work runs on the model thread either way (:mod:`eta_guard.model_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, daemon=True, name="eta-guard-loop").start()
            _loop = loop
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and wait for its result (never call it from that loop)."""
    loop = background_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("run_sync called from the background loop itself: await instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


def iterate_sync(items: AsyncIterator[T]) -> Iterator[T]:
    """Drive an async iterator from synchronous code; closing this iterator closes it."""
    try:
        while True:
            try:
                item: T = run_sync(items.__anext__())  # type: ignore[arg-type]
            except StopAsyncIteration:
                return
            yield item
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            run_sync(close())


@contextlib.asynccontextmanager
async def aclosing(items: Any) -> AsyncIterator[Any]:
    """``contextlib.aclosing`` for any async iterator: ``aclose()`` it on exit when it has one.

    Leaving an ``async for`` early does not close the generator it iterates (that is left to the
    garbage collector); every stage that holds a model, a cache or a request closes it here.
    """
    try:
        yield items
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()

"""Bridges between synchronous and async code.

One background event loop runs async code for synchronous callers (a daemon thread, started
lazily): :func:`run_sync`, :func:`iterate_sync`. :func:`aiter_in_thread` goes the other way: a
blocking iterator driven in a worker thread, its items yielded on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
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


async def aiter_in_thread(make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Drive a blocking iterator in a worker thread and yield its items on the event loop.

    Closing the async iterator early closes the blocking one in its thread (releasing its locks)
    and waits for that thread.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stopped = threading.Event()

    def target() -> None:
        iterator = make_iter()
        try:
            for item in iterator:
                loop.call_soon_threadsafe(items.put_nowait, ("item", item))
                if stopped.is_set():
                    break
            loop.call_soon_threadsafe(items.put_nowait, ("done", None))
        except BaseException as e:  # re-raised on the loop
            loop.call_soon_threadsafe(items.put_nowait, ("error", e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    worker = loop.run_in_executor(None, target)
    try:
        while True:
            kind, value = await items.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stopped.set()
        await asyncio.shield(worker)


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

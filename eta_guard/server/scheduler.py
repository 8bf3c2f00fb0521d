"""A bounded queue in front of the model, which works on ``concurrency`` calls at a time.

``Scheduler.submit`` admits a call or raises 429 at once (queue full); an admitted :class:`Job`
waits for the model, then runs its blocking iterator in a thread of its own and hands the items
to the event loop. A job ends early when its client goes away or its deadline passes: it sets
the engine's cancel event and closes the engine's iterator, so the generation stops at its next
token. The model counts as free only when that thread has really finished, so the next call
never overlaps an orphaned one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from eta_guard.server.errors import deadline_exceeded, queue_full
from eta_guard.server.metrics import Metrics

log = logging.getLogger("eta_guard.server")

#: ``(kind, value)``: ``("item", x)``, ``("done", None)`` or ``("error", exception)``.
Event = tuple[Literal["item", "done", "error"], Any]
#: Builds the engine iterator; receives the cancel event to hand to the engine.
MakeIter = Callable[[threading.Event], Iterator[Any]]


class Scheduler:
    """Admission (at most ``max_queue`` waiting) and ``concurrency`` model calls at a time."""

    def __init__(self, max_queue: int, metrics: Metrics, concurrency: int = 1) -> None:
        self.max_queue = max_queue
        self.metrics = metrics
        self.concurrency = concurrency
        self.waiting = 0
        self._slot: asyncio.Semaphore | None = None

    def submit(self, make_iter: MakeIter, *, timeout_s: float, route: str) -> Job:
        """Admit a call (or raise the 429 error) and start it; see :class:`Job`."""
        if self.waiting >= self.max_queue + (0 if self._busy() else 1):
            raise queue_full()
        if self._slot is None:
            self._slot = asyncio.Semaphore(self.concurrency)
        job = Job(self, make_iter, timeout_s=timeout_s, route=route)
        job.start()
        return job

    def _busy(self) -> bool:
        return self._slot is not None and self._slot.locked()

    def _enter_queue(self) -> None:
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)

    def _leave_queue(self) -> None:
        self.waiting -= 1
        self.metrics.queue_depth.set(self.waiting)


class Job:
    """One admitted model call. Read its events with :meth:`next`; :meth:`cancel` to stop it."""

    def __init__(
        self, scheduler: Scheduler, make_iter: MakeIter, *, timeout_s: float, route: str
    ) -> None:
        self.scheduler, self.make_iter, self.route = scheduler, make_iter, route
        self.timeout_s = timeout_s
        self.cancel_event = threading.Event()
        self.finished = threading.Event()  # the worker thread (if any) has returned
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._ended = False  # the consumer has read the terminal event

    def start(self) -> None:
        self.scheduler._enter_queue()
        self._task = asyncio.ensure_future(self._wait_for_model())
        self._timer = self._loop.call_later(self.timeout_s, self._expire)

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or ``None`` if none came within ``timeout`` seconds."""
        try:
            event = await asyncio.wait_for(self._events.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if event[0] != "item":
            self._ended = True
        return event

    def cancel(self, reason: str = "client_gone") -> None:
        """Stop the call: a queued one leaves the queue, a running one stops at its next token."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # still queued: never starts
        if not self._ended:  # a job whose answer was read in full is not "cancelled"
            self.scheduler.metrics.cancelled.labels(reason).inc()
            self.cancel_event.set()

    def close(self) -> None:
        """Release the job after its last event was read (or stop it if it still runs)."""
        self.cancel("client_gone")

    # ------------------------------------------------------------------ internals
    def _expire(self) -> None:
        if self._closed or self._ended:
            return
        self._events.put_nowait(("error", deadline_exceeded(self.timeout_s)))
        self.cancel("deadline")

    async def _wait_for_model(self) -> None:
        slot = self.scheduler._slot
        assert slot is not None
        try:
            await slot.acquire()
        finally:
            self.scheduler._leave_queue()
        if self.cancel_event.is_set():
            slot.release()
            return
        self.scheduler.metrics.running.inc()
        thread = threading.Thread(target=self._work, daemon=True, name="eta-guard-model")
        thread.start()

    def _work(self) -> None:
        started = time.perf_counter()
        try:
            iterator = self.make_iter(self.cancel_event)
            try:
                for item in iterator:
                    self._post(("item", item))
                    if self.cancel_event.is_set():
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()  # stops the engine's decoding thread and releases its lock
            self._post(("done", None))
        except BaseException as e:  # handed to the consumer, mapped to an HTTP error there
            self._post(("error", e))
        finally:
            self.scheduler.metrics.model_seconds.labels(self.route).observe(
                time.perf_counter() - started
            )
            self.finished.set()
            self._call(self._release)

    def _release(self) -> None:
        self.scheduler.metrics.running.dec()
        assert self.scheduler._slot is not None
        self.scheduler._slot.release()

    def _post(self, event: Event) -> None:
        self._call(self._events.put_nowait, event)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed (server shutdown): nobody is listening
            pass

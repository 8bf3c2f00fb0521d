"""A bounded queue in front of the model, which works on ``concurrency`` calls at a time.

``Scheduler.submit`` admits a call or raises 429 at once (queue full); an admitted :class:`Job`
waits for a slot, then drives the engine's async iterator (``ETA.astream``) on the server's own
event loop and queues its items for the route. No thread per request: the engine's model work
runs on the model thread (:mod:`eta_guard.model_thread`), which owns torch's OpenMP pool, and
every other await leaves the loop free. A job ends early when its client goes away or its
deadline passes: it sets the engine's cancel event, so the generation stops at its next token,
and closes the iterator. The slot is freed only when the iterator has really finished (closed
included), so the next call never overlaps an orphaned one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from eta_guard.server.errors import deadline_exceeded, queue_full
from eta_guard.server.metrics import Metrics
from eta_guard.sync_bridge import aclosing

log = logging.getLogger("eta_guard.server")

#: ``(kind, value)``: ``("item", x)``, ``("done", None)`` or ``("error", exception)``.
Event = tuple[Literal["item", "done", "error"], Any]
#: Builds the engine's async iterator; receives the cancel event to hand to the engine.
MakeIter = Callable[[threading.Event], AsyncIterator[Any]]


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
        self.finished = asyncio.Event()  # the engine's iterator has ended (closed included)
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._running = False  # holds a slot: only the cancel event stops it now
        self._closed = False
        self._ended = False  # the consumer has read the terminal event

    def start(self) -> None:
        self.scheduler._enter_queue()
        self._task = asyncio.ensure_future(self._run())
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
        if self._task is not None and not self._running:
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

    async def _run(self) -> None:
        slot = self.scheduler._slot
        assert slot is not None
        try:
            await slot.acquire()
        finally:
            self.scheduler._leave_queue()
        if self.cancel_event.is_set():
            slot.release()
            return
        # From here on the task is never cancelled by cancel() (it is not asyncio-cancellable
        # halfway through a model call anyway): the cancel event stops the engine instead.
        self._running = True
        self.scheduler.metrics.running.inc()
        started = time.perf_counter()
        try:
            await self._work()
        finally:
            self.scheduler.metrics.model_seconds.labels(self.route).observe(
                time.perf_counter() - started
            )
            self.finished.set()
            self.scheduler.metrics.running.dec()
            slot.release()

    async def _work(self) -> None:
        try:
            # aclosing: a job that stops early closes the engine's iterator (its decode rows,
            # its search) before the slot is freed.
            async with aclosing(self.make_iter(self.cancel_event)) as items:
                async for item in items:
                    self._events.put_nowait(("item", item))
                    if self.cancel_event.is_set():
                        break
            self._events.put_nowait(("done", None))
        except Exception as e:  # handed to the consumer, mapped to an HTTP error there
            self._events.put_nowait(("error", e))

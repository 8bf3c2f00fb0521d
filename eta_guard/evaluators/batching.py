"""Cross-request micro-batching of evaluator calls: concurrent scorings share one forward.

A :class:`MicroBatcher` wraps a batch function ``run(key, items) -> results`` (one result per
item, in order). Calls with the same ``key`` (e.g. the reward model's instruction) that arrive
while another call is in flight are grouped: the first caller of a group (its leader) waits at
most ``max_wait_s`` for others (not at all when it is alone), then queues the group's run on
``worker`` (the models' thread, :mod:`eta_guard.model_thread`). The group closes only when the
run starts (on that thread, under ``run_lock``): callers arriving while the model thread is busy
with other work (a decode step, another scoring) join it, up to ``max_batch`` items. Each caller
gets its own slice back.

Why the wait happens in the caller's thread: a leader that waited *on* the model thread would
block the very callers queued behind it. A call made on the model thread itself therefore never
waits: it takes the open group of its key (if its items fit) and runs it at once; the run its
leader queued then finds the group done. If a grouped run fails, each caller's items are run
again alone, so one caller's bad input or failure never becomes another caller's error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from eta_guard.errors import InvalidInputError
from eta_guard.model_thread import ModelThread, run_on

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Group(Generic[T, R]):
    items: list[T] = field(default_factory=list)
    callers: int = 0
    closed: bool = False
    ran: bool = False
    results: list[R] | None = None
    failed: bool = False
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class BatchStats:
    """Counts since creation: ``calls`` submitted, ``runs`` of the batch function, ``grouped``
    calls that shared a run with another, ``reruns`` after a grouped run failed."""

    calls: int = 0
    runs: int = 0
    grouped: int = 0
    reruns: int = 0


class MicroBatcher(Generic[T, R]):
    """Group concurrent ``__call__(key, items)`` into runs of ``run(key, all_items)``.

    Args:
        run: The batch function; must return one result per item, in order.
        run_lock: Held around every ``run`` (the models' lock), taken on ``worker``.
        worker: The thread every ``run`` happens on (``None``: the leader's own thread).
        max_wait_s: Longest a group's leader waits for more calls (only when another call is
            in flight; a lone call runs at once).
        max_batch: Most items per run; a call with more runs alone.
    """

    def __init__(
        self,
        run: Callable[[Any, list[T]], Sequence[R]],
        *,
        run_lock: Any = None,
        worker: ModelThread | None = None,
        max_wait_s: float = 0.002,
        max_batch: int = 32,
    ) -> None:
        if not (isinstance(max_wait_s, (int, float)) and 0 <= max_wait_s <= 1):
            raise InvalidInputError(f"max_wait_s={max_wait_s!r} must be within [0, 1] seconds")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidInputError(f"max_batch={max_batch!r} must be a positive int")
        self._run = run
        self._run_lock = run_lock if run_lock is not None else threading.RLock()
        self.worker = worker
        self.max_wait_s = float(max_wait_s)
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._open: dict[Hashable, _Group[T, R]] = {}
        self._in_flight = 0
        self.stats = BatchStats()

    def __call__(self, key: Hashable, items: Sequence[T]) -> list[R]:
        """Results for ``items`` (blocking), computed in a run shared with concurrent calls."""
        items = list(items)
        if not items:
            return []
        inline = self.worker is not None and self.worker.is_current()
        with self._cond:
            self.stats.calls += 1
            self._in_flight += 1
            group = self._open.get(key)
            leader = group is None or len(group.items) + len(items) > self.max_batch
            if leader:
                group = _Group()
                if len(items) < self.max_batch and not inline:
                    self._open[key] = group
                else:
                    group.closed = True
            assert group is not None
            offset = len(group.items)
            group.items.extend(items)
            group.callers += 1
            if len(group.items) >= self.max_batch:
                self._close(key, group)
            alone = self._in_flight == 1
        try:
            if inline:  # on the model thread: never wait for callers queued behind us
                self._execute(key, group)
            elif leader:
                self._lead(key, group, wait=not alone)
            else:
                group.done.wait()
            if group.error is not None:  # a lone caller's own error
                raise group.error
            if group.failed:  # rerun alone: the error (if any) is this caller's own
                with self._cond:
                    self.stats.reruns += 1
                return run_on(self.worker, self._run_alone, key, items)
            assert group.results is not None
            return group.results[offset : offset + len(items)]
        finally:
            with self._cond:
                self._in_flight -= 1

    def _lead(self, key: Hashable, group: _Group[T, R], *, wait: bool) -> None:
        if wait:
            deadline = time.monotonic() + self.max_wait_s
            with self._cond:
                while not group.closed and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
        run_on(self.worker, self._execute, key, group)

    def _execute(self, key: Hashable, group: _Group[T, R]) -> None:
        """Close ``group`` and run it once (a no-op if a model-thread caller already ran it)."""
        try:
            with self._run_lock:
                with self._cond:
                    if group.ran:
                        return
                    group.ran = True
                    self._close(key, group)
                    self.stats.runs += 1
                    if group.callers > 1:
                        self.stats.grouped += group.callers
                try:
                    group.results = self._checked(self._run(key, group.items), len(group.items))
                except Exception as e:
                    if group.callers == 1:
                        group.error = e  # the lone caller's own error, raised in its thread
                    else:
                        group.failed = True
        finally:
            group.done.set()

    def _run_alone(self, key: Hashable, items: list[T]) -> list[R]:
        with self._run_lock:
            return self._checked(self._run(key, items), len(items))

    def _close(self, key: Hashable, group: _Group[T, R]) -> None:
        group.closed = True
        if self._open.get(key) is group:
            del self._open[key]
        self._cond.notify_all()

    @staticmethod
    def _checked(results: Sequence[R], n: int) -> list[R]:
        out = list(results)
        if len(out) != n:
            raise RuntimeError(f"batch function returned {len(out)} results for {n} items")
        return out

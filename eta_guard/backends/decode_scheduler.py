"""One decode scheduler per local model: every request's rows in one :class:`StepBatcher`.

The scheduler owns the model's :class:`~eta_guard.backends.step_batcher.StepBatcher` and drives
it on the model thread (:mod:`eta_guard.model_thread`) with a *tick*: one batched step over every
live row, then the tick queues itself again while any job is live, so other model work queued
meanwhile (a prefill, CLIP, another model's call) runs between two steps. Async code submits jobs
(a request's greedy row, a search step's N candidate rows) and receives their tokens and results
on its own event loop (``loop.call_soon_threadsafe``). So requests that arrive while a batch runs
join it at the next step boundary, a request's vanilla row and its speculative search's candidate
rows share each forward, and rows finish independently.

Cancellation: a job's ``cancel`` event (the request's, or the scheduler's own when its awaiting
code is closed) removes its rows and frees their KV at the next tick; :meth:`DecodeJob.cancel`
waits until that happened.

The lock: every tick and every prefill takes the adapter's lock (the model keeps per-call state
that other users of the adapter may touch), but never waits for it: when another thread holds it
the work is queued again behind whatever else is waiting. A thread that holds the lock while it
waits for the model thread (e.g. iterating ``VLMAdapter.stream_greedy`` under the lock) therefore
cannot deadlock with the scheduler.

Memory: at most ``max_rows`` rows decode at once and their KV stays within ``kv_budget_bytes``
(default :func:`default_kv_budget`); rows over either bound wait for a later step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from eta_guard.backends.step_batcher import Context, Job, StepBatcher, rope_offset
from eta_guard.errors import InvalidInputError, RequestCancelled
from eta_guard.model_thread import model_thread

T = TypeVar("T")

#: Default cap on rows decoded at once (a request's vanilla row plus a search's 5 candidates is 6).
DEFAULT_MAX_ROWS = 32
#: Share of the free accelerator memory (or of the available RAM) the KV of live rows may use.
KV_BUDGET_SHARE = 0.5
#: How long a tick or a prefill waits for the adapter's lock before queueing itself again.
_LOCK_WAIT_S = 0.005


def default_kv_budget(device: Any) -> int:
    """KV bytes the live rows may hold on ``device``: a share of what is free there now.

    CUDA: ``KV_BUDGET_SHARE`` of ``torch.cuda.mem_get_info`` (after the weights are loaded); CPU
    and other devices: the same share of the available RAM (``os.sysconf``), else of 8 GiB.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return max(1, int(free * KV_BUDGET_SHARE))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    return max(1, int(available * KV_BUDGET_SHARE))


class DecodeJob:
    """A submitted job seen from async code: its tokens and its end, on the submitter's loop.

    Attributes:
        job: the batcher's :class:`~eta_guard.backends.step_batcher.Job` (read it once
            :meth:`wait` returned: the model thread no longer touches it then).
    """

    def __init__(self, scheduler: DecodeScheduler, cancel: Any) -> None:
        self.scheduler = scheduler
        self.job: Job = None  # type: ignore[assignment]  # set on the model thread at submit
        self._cancel = cancel  # an object with is_set(): the caller's events and our own
        self._own = threading.Event()
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_done(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` on the loop once the job ended (after its last ``on_token``)."""
        self._done.add_done_callback(lambda _: callback())

    def cancelled(self) -> bool:
        return self._own.is_set() or (self._cancel is not None and self._cancel.is_set())

    async def wait(self) -> Job:
        """The finished job; raises ``RequestCancelled`` if it was cancelled, or its error."""
        await asyncio.shield(self._done)
        return self.job

    async def cancel(self) -> None:
        """Remove the job's rows at the next step and wait until their KV is freed."""
        self._own.set()
        if not self._done.done():
            self.scheduler.wake()
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            if not self._done.done():
                raise  # our caller was cancelled: the rows still go at the next step
        except BaseException:  # noqa: BLE001 - RequestCancelled or the job's own error: it ended
            pass

    # -- called on the model thread --
    def _settle(self, error: BaseException | None) -> None:
        loop = self._done.get_loop()
        try:
            loop.call_soon_threadsafe(_settle_future, self._done, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _deliver(tokens: list[tuple[Callable[[int, int], Any], int, int]]) -> None:
    """One tick's tokens for one loop, in the order they were chosen."""
    for on_token, row, token in tokens:
        on_token(row, token)


def _settle_future(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class DecodeScheduler:
    """Steps one :class:`StepBatcher` over every live job of a model, on its model thread.

    Args:
        adapter: the :class:`~eta_guard.decoding.vlm.VLMAdapter` (its model, EOS ids, lock).
        max_rows: the most rows in one forward (``None``: only the memory budget).
        kv_budget_bytes: the most KV bytes the live rows may hold (``None``:
            :func:`default_kv_budget` of the model's device).
    """

    def __init__(
        self,
        adapter: Any,
        *,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        kv_budget_bytes: int | None = None,
    ) -> None:
        self.adapter = adapter
        self.worker = model_thread(adapter.device)
        self.lock = getattr(adapter, "lock", None) or threading.RLock()
        budget = default_kv_budget(adapter.device) if kv_budget_bytes is None else kv_budget_bytes
        self.batcher = StepBatcher(
            adapter.model,
            eos_token_ids=adapter.eos_token_ids,
            max_rows=max_rows,
            memory_budget_bytes=budget,
        )
        self._jobs: dict[int, DecodeJob] = {}  # model thread only
        self._tick_queued = False  # model thread only
        # A tick's tokens, per event loop: handed over in one hop per loop and tick.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Callable, int, int]]] = {}

    # ------------------------------------------------------------------ contexts
    async def prefill(self, model_inputs: dict[str, Any]) -> Context:
        """The prompt's :class:`Context` (one forward, on the model thread)."""
        return await self.call(self.batcher.prefill, model_inputs)

    async def extend(self, context: Context, ids: Sequence[int], *, pending: bool) -> Context:
        """``context`` followed by ``ids``; with ``pending`` the last id is left to the next job's
        first forward (at its batch size, as ``generate`` would feed it)."""
        ids = [int(i) for i in ids]
        if not pending or not ids:
            return await self.call(self.batcher.extend, context, ids)
        head = await self.call(self.batcher.extend, context, ids[:-1]) if ids[:-1] else context
        if head.cached != len(head.ids):  # ``context`` itself had a pending token
            head = await self.call(self.batcher.extend, head, [])
        return Context(
            cache=head.cache, ids=head.ids + ids[-1:], cached=head.cached, offset=head.offset
        )

    async def adopt(self, cache: Any, ids: Sequence[int]) -> Context:
        """A :class:`Context` over a cache built elsewhere that holds exactly ``ids`` (e.g. a
        ``generate`` call's, cropped), with the position state recorded with it restored."""

        def build() -> Context:
            self.adapter.restore_position_state(cache)
            offset = rope_offset(self.adapter.model)
            return Context(cache=cache, ids=[int(i) for i in ids], cached=len(ids), offset=offset)

        context = await self.call(build)
        return context

    # ------------------------------------------------------------------ jobs
    async def submit(
        self,
        context: Context,
        *,
        cancel: Any = None,
        on_token: Callable[[int, int], Any] | None = None,
        **kwargs: Any,
    ) -> DecodeJob:
        """Submit a job (``StepBatcher.submit`` arguments); it joins at the next step.

        ``on_token(row, token)`` is called on the caller's event loop, in order (each step's
        tokens of every job on that loop arrive in one hop, before any job's end). ``cancel``: an
        event (``is_set()``) that, once set, removes the job at the next step.
        """
        loop = asyncio.get_running_loop()
        relay = None
        if on_token is not None:

            def relay(row: int, token: int) -> None:  # on the model thread, during a tick
                self._outbox.setdefault(loop, []).append((on_token, row, token))

        handle = DecodeJob(self, cancel)

        def register() -> None:  # on the model thread
            handle.job = self.batcher.submit(context, on_token=relay, **kwargs)
            self._jobs[id(handle.job)] = handle
            self._queue_tick()

        try:
            await self.call(register, locked=False)
        except asyncio.CancelledError:
            if handle.job is not None:  # registered all the same: nobody else would free it
                await handle.cancel()
            raise
        return handle

    def wake(self) -> None:
        """Make sure a tick is queued (e.g. to notice a cancellation now)."""
        self.worker.submit(self._queue_tick)

    # ------------------------------------------------------------------ the model thread
    def _queue_tick(self) -> None:
        if not self._tick_queued and self._jobs:
            self._tick_queued = True
            self.worker.submit(self._tick)

    def _tick(self) -> None:
        """One step over every live job (when the lock is free now; else queued again)."""
        self._tick_queued = False
        if not self._jobs:
            return
        if not self.lock.acquire(timeout=_LOCK_WAIT_S):
            self._queue_tick()
            return
        ended: list[tuple[DecodeJob, BaseException | None]] = []
        try:
            for handle in list(self._jobs.values()):
                if handle.cancelled():
                    self.batcher.cancel(handle.job)
                    ended.append((handle, RequestCancelled("the decoding was cancelled")))
            if not self.batcher.idle:
                try:
                    self.batcher.step()
                except BaseException as e:  # noqa: BLE001 - handed to every job of the batch
                    for handle in list(self._jobs.values()):
                        self.batcher.cancel(handle.job)
                        ended.append((handle, e))
            ended += [(h, None) for h in self._jobs.values() if h.job.done]
        finally:
            self.lock.release()
        # Tokens first, then the ends (a loop runs its callbacks in order), once the lock is free:
        # whoever awaited a job finds the model free.
        outbox, self._outbox = self._outbox, {}
        for loop, tokens in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, tokens)
            except RuntimeError:  # the loop is closed: nobody reads these any more
                pass
        for handle, error in ended:
            if self._jobs.pop(id(handle.job), None) is not None:
                handle._settle(error)
        self._queue_tick()

    async def call(self, fn: Callable[..., T], *args: Any, locked: bool = True) -> T:
        """``fn(*args)`` on the model thread (under the lock, never waiting for it there).

        Cancelled while queued, ``fn`` never runs; cancelled while it runs, this waits until it
        returned (and let go of the lock) before the cancellation goes on: a cancelled caller
        leaves no model work behind.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if locked and not self.lock.acquire(timeout=_LOCK_WAIT_S):
                self.worker.submit(run)  # behind whatever else waits (the lock's holder)
                return
            if not future.set_running_or_notify_cancel():  # the caller left while queued
                if locked:
                    self.lock.release()
                return
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                error: BaseException | None = e
            else:
                error = None
            finally:
                if locked:
                    self.lock.release()
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        if self.worker.is_current():
            raise InvalidInputError(
                "the local decode scheduler was awaited on the model thread itself; call ETA "
                "from another thread (the model thread runs the decoding)"
            )
        self.worker.submit(run)
        done = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not future.cancel():  # running (or just ended): wait until it has
                await asyncio.wait([done])
                if not done.cancelled():
                    done.exception()  # retrieved: the cancellation is what the caller sees
            raise


_SCHEDULERS: weakref.WeakKeyDictionary[Any, DecodeScheduler] = weakref.WeakKeyDictionary()
_SCHEDULERS_LOCK = threading.Lock()


def scheduler_for(
    adapter: Any, *, max_rows: int | None = None, kv_budget_bytes: int | None = None
) -> DecodeScheduler:
    """The one scheduler of ``adapter``'s model (created on first use; later settings given
    here replace its bounds, which apply from the next step)."""
    with _SCHEDULERS_LOCK:
        scheduler = _SCHEDULERS.get(adapter.model)
        if scheduler is None:
            scheduler = DecodeScheduler(
                adapter,
                max_rows=DEFAULT_MAX_ROWS if max_rows is None else max_rows,
                kv_budget_bytes=kv_budget_bytes,
            )
            _SCHEDULERS[adapter.model] = scheduler
        else:
            if max_rows is not None:
                scheduler.batcher.max_rows = max_rows
            if kv_budget_bytes is not None:
                scheduler.batcher.memory_budget_bytes = kv_budget_bytes
        return scheduler

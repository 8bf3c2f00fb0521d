"""One long-lived thread per device that runs all model work of the process.

Why: torch's OpenMP pool belongs to the first thread that runs a parallel region. A call made
from any other thread (a ``ThreadPoolExecutor`` worker, ``asyncio.to_thread``, a server's request
thread) was measured 1.46x slower per token on CPU (issue 15), and the first thread becomes the
slow one if a worker ran first. So every model call (loading included, which is usually the first
torch work of a process) is queued to one thread that owns the pool:

    >>> from eta_guard.model_thread import model_thread
    >>> worker = model_thread("cpu")
    >>> worker.call(lambda a, b: a + b, 1, 2)        # blocking; inline if already on the thread
    3
    >>> import asyncio
    >>> asyncio.run(worker.acall(pow, 2, 10))          # awaits without blocking the event loop
    1024
    >>> worker.call(lambda: worker.call(len, "abc"))   # re-entry runs inline: no deadlock
    3

Devices: ``"cuda:N"`` (and other accelerators with an index) get one thread each; every CPU
model shares the ``"cpu"`` thread (that is where the OpenMP pool matters). Work is run in arrival
order; a call's exception is re-raised in the caller. The thread is a daemon and lives as long as
the process. Long-running work (a decoding loop) should run in steps so queued calls interleave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Item = tuple[concurrent.futures.Future, Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ModelThread:
    """A queue and the one thread that drains it.

    Args:
        name: the thread's name (shown in stack dumps).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The thread's id (compare with ``threading.get_ident()``)."""
        return self._thread.ident

    def is_current(self) -> bool:
        """Whether the caller is running on this thread."""
        return threading.get_ident() == self._thread.ident

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args, **kwargs)``; the future holds its result or exception."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on this thread and return its result (blocking).

        Called from the thread itself it runs inline (nested calls never wait on themselves).
        """
        if self.is_current():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    async def acall(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Async :meth:`call`: the event loop stays free while the model works.

        Cancelling the awaiting task does not interrupt work already running on the thread (the
        callee must check its own cancel event); work still queued is skipped.
        """
        if self.is_current():  # an event loop running on the model thread itself
            return fn(*args, **kwargs)
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def _loop(self) -> None:
        while True:
            future, fn, args, kwargs = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # handed to the caller, never kills the thread
                future.set_exception(e)
            else:
                future.set_result(result)
            del future, fn, args, kwargs  # drop references (tensors) before waiting again


_THREADS: dict[str, ModelThread] = {}
_LOCK = threading.Lock()


def device_key(device: Any = None) -> str:
    """The thread key of a device: ``"cuda:0"``-style for indexed accelerators, else ``"cpu"``.

    ``None``, ``"auto"``, ``"cpu"``, ``"meta"`` and device maps all map to ``"cpu"`` (models
    spread over several devices share the CPU thread, which also drives their kernels).
    """
    text = str(device) if device is not None else "cpu"
    kind, _, index = text.partition(":")
    if kind in ("cpu", "auto", "meta", "") or not text:
        return "cpu"
    if kind in ("cuda", "xpu", "npu", "mps", "hpu"):
        return f"{kind}:{index or '0'}"
    return "cpu"


def model_thread(device: Any = None) -> ModelThread:
    """The process's model thread for ``device`` (created on first use)."""
    key = device_key(device)
    with _LOCK:
        worker = _THREADS.get(key)
        if worker is None:
            worker = _THREADS[key] = ModelThread(f"eta-guard-model-{key}")
        return worker


def on_model_thread(device: Any = None) -> bool:
    """Whether the caller already runs on ``device``'s model thread."""
    return model_thread(device).is_current()


def local_device(evaluator: Any) -> Any | None:
    """The device an evaluator's model runs on in this process, or ``None`` when it has none here.

    A local evaluator exposes ``device`` (CLIP, the reward model), a torch ``model`` (guard
    models) or a local ``clip`` (the patch scan); a remote one (an HTTP client) has none of them,
    and its calls are I/O that must never occupy a model thread.
    """
    device = getattr(evaluator, "device", None)
    if device is not None:
        return device
    model = getattr(evaluator, "model", None)
    if model is not None and hasattr(model, "parameters"):  # a torch module
        return getattr(model, "device", "cpu")
    clip = getattr(evaluator, "clip", None)
    return local_device(clip) if clip is not None and clip is not evaluator else None


def thread_for(evaluator: Any) -> ModelThread | None:
    """The model thread that runs ``evaluator``'s forwards (``None``: a remote evaluator)."""
    device = local_device(evaluator)
    return None if device is None else model_thread(device)


def run_on(worker: ModelThread | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``worker.call(fn, ...)``, or ``fn(...)`` right here when there is no worker (remote I/O)."""
    if worker is None:
        return fn(*args, **kwargs)
    return worker.call(fn, *args, **kwargs)

"""Load an engine or an evaluator once, on first use, thread-safely."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Lazy(Generic[T]):
    """Calls ``factory()`` on the first :meth:`get` (once, even from several threads)."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._value: T | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._factory()
        return self._value


def lazy_evaluator(**kwargs: Any) -> Lazy[Any]:
    """A :class:`Lazy` ``ETAEvaluator.from_pretrained(**kwargs)``."""

    def load() -> Any:
        from eta_guard.evaluators.eta_evaluator import ETAEvaluator

        return ETAEvaluator.from_pretrained(**kwargs)

    return Lazy(load)


def resolve(source: Any) -> Any:
    """The object behind ``source`` (a :class:`Lazy` is loaded, anything else returned as is)."""
    return source.get() if isinstance(source, Lazy) else source


async def aresolve(source: Any) -> Any:
    """Async :func:`resolve`: a first load runs in a worker thread, off the event loop."""
    if isinstance(source, Lazy) and not source.loaded:
        return await asyncio.to_thread(source.get)
    return resolve(source)

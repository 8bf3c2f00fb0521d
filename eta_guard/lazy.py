"""Load an engine or an evaluator once, on first use, thread-safely.

Framework adapters take model ids and must not load weights in their constructors (LangChain
and LlamaIndex build objects eagerly, e.g. at import or configuration time).
"""

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

    @classmethod
    def ready(cls, value: T) -> Lazy[T]:
        """A :class:`Lazy` that already holds ``value``."""
        lazy = cls(lambda: value)
        lazy._value = value
        return lazy

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._factory()
        return self._value

    async def aget(self) -> T:
        """:meth:`get` without blocking the event loop while weights load."""
        if self._value is not None:
            return self._value
        return await asyncio.to_thread(self.get)


def lazy_engine(vlm: str, **kwargs: Any) -> Lazy[Any]:
    """A :class:`Lazy` ``ETA.from_pretrained(vlm, **kwargs)``."""

    def load() -> Any:
        from eta_guard.pipeline import ETA

        return ETA.from_pretrained(vlm, **kwargs)

    return Lazy(load)


def lazy_evaluator(**kwargs: Any) -> Lazy[Any]:
    """A :class:`Lazy` ``ETAEvaluator.from_pretrained(**kwargs)``."""

    def load() -> Any:
        from eta_guard.evaluators.eta_evaluator import ETAEvaluator

        return ETAEvaluator.from_pretrained(**kwargs)

    return Lazy(load)

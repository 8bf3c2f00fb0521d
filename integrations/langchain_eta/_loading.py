"""Load an engine or an evaluator once, on first use, thread-safely."""

from __future__ import annotations

from typing import Any

from eta_guard.lazy import Lazy, lazy_evaluator

__all__ = ["Lazy", "aresolve", "lazy_evaluator", "resolve"]


def resolve(source: Any) -> Any:
    """The object behind ``source`` (a :class:`Lazy` is loaded, anything else returned as is)."""
    return source.get() if isinstance(source, Lazy) else source


async def aresolve(source: Any) -> Any:
    """Async :func:`resolve`: a first load runs in a worker thread, off the event loop."""
    return await source.aget() if isinstance(source, Lazy) else source

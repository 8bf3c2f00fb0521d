"""Load an engine or an evaluator once, on first use, thread-safely."""

from __future__ import annotations

from typing import Any

from eta_guard.lazy import Lazy, lazy_evaluator

__all__ = ["Lazy", "aresolve", "lazy_evaluator", "local_files", "resolve"]


def resolve(source: Any) -> Any:
    """The object behind ``source`` (a :class:`Lazy` is loaded, anything else returned as is)."""
    return source.get() if isinstance(source, Lazy) else source


async def aresolve(source: Any) -> Any:
    """Async :func:`resolve`: a first load runs in a worker thread, off the event loop."""
    return await source.aget() if isinstance(source, Lazy) else source


def local_files(evaluator: Any, allow: bool) -> Any:
    """``evaluator`` reading local image files only when ``allow`` (the engine enforces it).

    The adapters refuse local ``url``s themselves, but an image source can name a path in other
    ways (e.g. "base64" data that is a path): the engine's own check is the one that counts.
    """
    config = evaluator.config
    if config.allow_local_image_files == allow:
        return evaluator
    return evaluator.with_config(config.with_overrides(allow_local_image_files=allow))

"""Checks of a call's own arguments (the batch, the stop strings) before any work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eta_guard.errors import InvalidInputError
from eta_guard.limits import check_stop_strings
from eta_guard.media import short_repr


def check_batch(batch: Any) -> None:
    """Refuse anything but a list of conversations (each a list of messages)."""
    if isinstance(batch, (str, dict)) or not isinstance(batch, (list, tuple)):
        raise InvalidInputError(
            f"batch must be a list of conversations (each a list of messages), got "
            f"{type(batch).__name__}"
        )


def check_stop(stop: Sequence[str] | None) -> list[str] | None:
    """The stop strings as a list (None when there are none), or a clear error."""
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise InvalidInputError(
            f"stop must be a str or a list of non-empty strings, got {type(stop).__name__}"
        )
    stop = list(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise InvalidInputError(f"stop must be a list of non-empty strings, got {short_repr(stop)}")
    check_stop_strings(stop)
    return stop or None

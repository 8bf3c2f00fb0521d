"""Settings of an ``ETAChatModel`` that per-call keyword arguments may not loosen.

Per-call arguments (``invoke(..., **kw)``, ``.bind(**kw)``) often come from code that user
input reaches (an agent framework, a request handler forwarding options). The settings named in
``locked_settings`` can only be tightened per call: a boolean switched on, a limit raised or a
policy changed is refused. Set them on the model itself; that is the application's decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eta_guard.errors import InvalidInputError

#: Locked by default: what a call could use to read files or the network, or to raise a cost
#: limit, and the failure policy. Thresholds and search knobs stay per-call (lock them too by
#: naming them, or pass ``"all"``).
DEFAULT_LOCKED = frozenset(
    {
        "allow_local_image_files",
        "allow_remote_images",
        "allow_private_image_hosts",
        "max_image_pixels",
        "max_images_per_request",
        "max_request_pixels",
        "max_text_chars",
        "clip_batch_size",
        "remote_timeout",
        "remote_max_bytes",
        "remote_max_redirects",
        "on_evaluator_error",
    }
)
#: Numeric settings where a smaller value is the stricter one.
_LIMITS = frozenset(k for k in DEFAULT_LOCKED if k.startswith(("max_", "remote_", "clip_")))


def check_locked(
    requested: Mapping[str, Any], current: Mapping[str, Any], locked: frozenset[str] | str
) -> None:
    """Refuse per-call values of ``locked`` settings that loosen ``current``.

    Args:
        requested: The call's ETAConfig overrides (field -> value).
        current: The model's own values of those fields.
        locked: Field names, or ``"all"`` for every field.

    Raises:
        InvalidInputError: A locked setting would be switched on, raised or changed.
    """
    for key, value in requested.items():
        if locked != "all" and key not in locked:
            continue
        now = current.get(key)
        if value == now or _tighter(key, value, now):
            continue
        raise InvalidInputError(
            f"{key}={value!r} per call: {key} is locked on this ETAChatModel (it is "
            f"{now!r}); per-call arguments may come from user input and cannot loosen it. Set "
            "it on the model itself, or leave it out of locked_settings"
        )


def _tighter(key: str, value: Any, now: Any) -> bool:
    if isinstance(value, bool) or isinstance(now, bool):
        return value is False
    if key in _LIMITS and isinstance(value, (int, float)) and isinstance(now, (int, float)):
        return value <= now
    return False

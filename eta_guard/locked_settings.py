"""Settings that per-call arguments of an adapter may tighten but never loosen.

Per-call arguments (LangChain's ``invoke(..., **kw)`` / ``.bind(**kw)``, LlamaIndex's
``chat(msgs, **kw)``) often come from code that user input reaches: an agent framework, a request
handler forwarding options. An application sets its guard on the model object; a call may only
make it stricter. Each locked setting knows which way is stricter: a lower CLIP threshold flags
more images, a higher reward threshold flags more answers, a decision rule that aligns in more
cases, a smaller limit. A setting without a direction (a prompt, the prefix, the failure policy)
may not change at all. Torch-free; used by every adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eta_guard.errors import InvalidInputError

#: Settings where a smaller value is the stricter one (limits, and the image threshold: an image
#: is flagged iff its CLIP score >= ``pre_threshold``).
_LOWER_IS_STRICTER = frozenset(
    {
        "pre_threshold",
        "max_image_pixels",
        "max_images_per_request",
        "max_request_pixels",
        "max_text_chars",
        "max_new_tokens",
        "clip_batch_size",
        "remote_timeout",
        "remote_max_bytes",
        "remote_max_redirects",
    }
)
#: An answer is flagged iff its reward <= ``post_threshold``.
_HIGHER_IS_STRICTER = frozenset({"post_threshold"})
#: Switches whose safe position is off (file and network access) or on (the deep search).
_SAFE_WHEN_OFF = frozenset(
    {"allow_local_image_files", "allow_remote_images", "allow_private_image_hosts"}
)
_SAFE_WHEN_ON = frozenset({"deep_alignment"})
#: Choices ordered from loosest to strictest; a call may move up the order, never down. The
#: decision rules form a lattice: 'or' aligns whenever any other rule does.
_ORDERS: dict[str, dict[str, set[str]]] = {
    "decision_rule": {
        "and": {"pre_only", "post_only", "or"},
        "pre_only": {"or"},
        "post_only": {"or"},
        "or": set(),
    },
    "text_only_policy": {"trust": {"reward_only"}, "reward_only": set()},
}
#: Locked without a direction: any change is refused.
_FIXED = frozenset(
    {
        "on_evaluator_error",
        "safety_prompt",
        "rm_decision_prompt",
        "rm_search_prompt",
        "prefix",
    }
)

#: Locked by default: what could switch a check off or weaken it (thresholds, rules, prompts, the
#: deep search), read files or the network, or raise a cost limit. Search knobs (candidates,
#: temperature, seed) stay per-call; lock them too by naming them, or pass ``"all"``.
DEFAULT_LOCKED = (
    _LOWER_IS_STRICTER
    | _HIGHER_IS_STRICTER
    | _SAFE_WHEN_OFF
    | _SAFE_WHEN_ON
    | set(_ORDERS)
    | _FIXED
)


def check_locked(
    requested: Mapping[str, Any],
    current: Mapping[str, Any],
    locked: frozenset[str] | str,
    *,
    owner: str = "this model",
) -> None:
    """Refuse per-call values of ``locked`` settings that loosen ``current``.

    Args:
        requested: The call's ETAConfig overrides (field -> value).
        current: The model's own values of those fields.
        locked: Field names, or ``"all"`` for every field.
        owner: How the error names the object the settings belong to.

    Raises:
        InvalidInputError: A locked setting would be loosened (or, without a direction, changed).
    """
    for key, value in requested.items():
        if locked != "all" and key not in locked:
            continue
        now = current.get(key)
        if value == now or _stricter(key, value, now):
            continue
        raise InvalidInputError(
            f"{key}={value!r} per call: {key} is locked on {owner} (it is {now!r}); per-call "
            "arguments may come from user input and can only make the guard stricter. Set it "
            "on the model itself, or leave it out of locked_settings"
        )


def _stricter(key: str, value: Any, now: Any) -> bool:
    if key in _SAFE_WHEN_OFF:
        return value is False
    if key in _SAFE_WHEN_ON:
        return value is True
    if key in _ORDERS:
        return isinstance(now, str) and value in _ORDERS[key].get(now, set())
    numbers = (
        isinstance(value, (int, float))
        and isinstance(now, (int, float))
        and not isinstance(value, bool)
        and not isinstance(now, bool)
    )
    if key in _LOWER_IS_STRICTER and numbers:
        return value <= now
    if key in _HIGHER_IS_STRICTER and numbers:
        return value >= now
    return False

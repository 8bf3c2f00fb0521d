"""Verdicts and results as LangChain metadata, usage and callback events (pure helpers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from langchain_core.callbacks import adispatch_custom_event, dispatch_custom_event
from langchain_core.messages.ai import UsageMetadata
from langchain_core.runnables import RunnableConfig

if TYPE_CHECKING:
    from eta_guard.verdict import ETAResult, SafetyVerdict

#: ``response_metadata`` key (and custom-event data key) that holds a verdict as a dict.
VERDICT_KEY = "eta_verdict"
#: ``response_metadata`` key under which ``ETAGuardMiddleware`` records its own verdicts (flagged
#: messages, refusals), apart from a model's own ``VERDICT_KEY`` (e.g. ``ETAChatModel``'s).
GUARD_VERDICT_KEY = "eta_guard_verdict"
#: Name of the custom callback event every guard and middleware check emits with its verdict
#: (ETAChatModel puts its verdict in ``response_metadata`` instead).
EVENT_NAME = "eta_verdict"

OnViolation = Literal["raise", "replace", "flag"]
ON_VIOLATION = ("raise", "replace", "flag")

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request because it was flagged as unsafe."
DEFAULT_IMAGE_REPLACEMENT = "[image removed: flagged as unsafe by ETA]"


def verdict_dict(verdict: SafetyVerdict) -> dict[str, Any]:
    """A JSON-ready dict of a verdict (scores, flags, thresholds, skipped/errors, timings)."""
    return verdict.model_dump(mode="json")


def result_metadata(result: ETAResult) -> dict[str, Any]:
    """``response_metadata`` of an ETAChatModel answer."""
    return {
        "model_name": result.model_name,
        "finish_reason": result.finish_reason,
        "model_provider": "eta_guard",
        VERDICT_KEY: verdict_dict(result.verdict),
        "eta_aligned": result.aligned,
    }


def result_usage(result: ETAResult) -> UsageMetadata:
    """``usage_metadata`` of an ETAChatModel answer (tokens of the returned answer)."""
    usage = result.usage
    return UsageMetadata(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
    )


def event_data(
    source: str, verdict: SafetyVerdict, *, violation: bool, action: str
) -> dict[str, Any]:
    """Payload of the ``eta_verdict`` custom event."""
    return {
        "source": source,
        "violation": violation,
        "action": action,
        VERDICT_KEY: verdict_dict(verdict),
    }


def emit(data: dict[str, Any], config: RunnableConfig | None = None) -> None:
    """Dispatch the ``eta_verdict`` event; a no-op outside a traced run."""
    try:
        dispatch_custom_event(EVENT_NAME, data, config=config)
    except RuntimeError:  # no parent run: nobody is listening
        pass


async def aemit(data: dict[str, Any], config: RunnableConfig | None = None) -> None:
    """Async :func:`emit`."""
    try:
        await adispatch_custom_event(EVENT_NAME, data, config=config)
    except RuntimeError:
        pass


def check_on_violation(value: str) -> str:
    """Validate an ``on_violation`` mode."""
    from eta_guard.errors import InvalidInputError

    if value not in ON_VIOLATION:
        raise InvalidInputError(
            f"on_violation={value!r} is not allowed; use one of {', '.join(map(repr, ON_VIOLATION))}"
        )
    return value

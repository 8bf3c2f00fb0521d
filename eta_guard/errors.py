"""Errors raised by eta-guard. Every public failure is an :class:`ETAError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eta_guard.verdict import SafetyVerdict


class ETAError(Exception):
    """Base class of every error eta-guard raises on purpose."""


class InvalidInputError(ETAError, ValueError):
    """The caller passed something eta-guard cannot use (bad image, bad message, bad setting)."""


class EvaluatorError(ETAError):
    """A safety evaluator (CLIP or reward model) could not produce a score."""


class RequestCancelled(ETAError):
    """A call was cancelled (its ``cancel`` event was set) before it finished."""


class GuardrailViolation(ETAError):
    """A guard blocked a request or a response; ``verdict`` says why."""

    def __init__(self, message: str, verdict: SafetyVerdict | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict


class BackendError(ETAError):
    """A remote inference engine (an OpenAI-compatible server such as vLLM) failed a request.

    Attributes:
        status: the HTTP status it answered with, or None when it did not answer (unreachable,
            timed out) or answered something that is not the API's shape.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

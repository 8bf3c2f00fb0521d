"""LangChain integration of eta-guard: ``ETAChatModel``, guard runnables and agent middleware.

``ETAGuardMiddleware`` (which imports ``langchain.agents``) loads on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eta_guard.errors import GuardrailViolation
from eta_guard.locked_settings import DEFAULT_LOCKED as DEFAULT_LOCKED_SETTINGS
from langchain_eta._verdicts import (
    DEFAULT_IMAGE_REPLACEMENT,
    DEFAULT_REFUSAL,
    EVENT_NAME,
    GUARD_VERDICT_KEY,
    VERDICT_KEY,
)
from langchain_eta.chat_models import ETAChatModel
from langchain_eta.guards import ETAInputGuard, ETAOutputGuard

if TYPE_CHECKING:
    from langchain_eta.middleware import ETAGuardMiddleware

__all__ = [
    "DEFAULT_IMAGE_REPLACEMENT",
    "DEFAULT_LOCKED_SETTINGS",
    "DEFAULT_REFUSAL",
    "EVENT_NAME",
    "GUARD_VERDICT_KEY",
    "VERDICT_KEY",
    "ETAChatModel",
    "ETAGuardMiddleware",
    "ETAInputGuard",
    "ETAOutputGuard",
    "GuardrailViolation",
]


def __getattr__(name: str) -> Any:
    if name == "ETAGuardMiddleware":
        from langchain_eta.middleware import ETAGuardMiddleware

        return ETAGuardMiddleware
    raise AttributeError(f"module 'langchain_eta' has no attribute {name!r}")

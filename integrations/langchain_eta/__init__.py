"""LangChain integration of eta-guard: ``ETAChatModel``, guard runnables and agent middleware."""

from __future__ import annotations

from eta_guard.errors import GuardrailViolation
from langchain_eta._verdicts import (
    DEFAULT_IMAGE_REPLACEMENT,
    DEFAULT_REFUSAL,
    EVENT_NAME,
    VERDICT_KEY,
)
from langchain_eta.chat_models import ETAChatModel
from langchain_eta.guards import ETAInputGuard, ETAOutputGuard
from langchain_eta.middleware import ETAGuardMiddleware

__all__ = [
    "DEFAULT_IMAGE_REPLACEMENT",
    "DEFAULT_REFUSAL",
    "EVENT_NAME",
    "VERDICT_KEY",
    "ETAChatModel",
    "ETAGuardMiddleware",
    "ETAInputGuard",
    "ETAOutputGuard",
    "GuardrailViolation",
]

"""eta-guard: ETA ("Evaluating Then Aligning", ICLR 2025) safety for vision-language models.

Heavy modules (torch, transformers) load lazily: ``import eta_guard`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ETA": "eta_guard.pipeline",
    "ETAEvaluator": "eta_guard.evaluators.eta_evaluator",
    "ETAConfig": "eta_guard.config",
    "SafetyVerdict": "eta_guard.verdict",
    "ETAResult": "eta_guard.verdict",
    "ETAStreamChunk": "eta_guard.verdict",
    "ETAError": "eta_guard.errors",
    "InvalidInputError": "eta_guard.errors",
    "EvaluatorError": "eta_guard.errors",
    "GuardrailViolation": "eta_guard.errors",
    "RequestCancelled": "eta_guard.errors",
}

__all__ = [
    "ETA",
    "ETAConfig",
    "ETAError",
    "ETAEvaluator",
    "ETAResult",
    "ETAStreamChunk",
    "EvaluatorError",
    "GuardrailViolation",
    "InvalidInputError",
    "RequestCancelled",
    "SafetyVerdict",
    "__version__",
]

if TYPE_CHECKING:
    from eta_guard.config import ETAConfig
    from eta_guard.errors import (
        ETAError,
        EvaluatorError,
        GuardrailViolation,
        InvalidInputError,
        RequestCancelled,
    )
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator
    from eta_guard.pipeline import ETA
    from eta_guard.verdict import ETAResult, ETAStreamChunk, SafetyVerdict


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eta_guard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

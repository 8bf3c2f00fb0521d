"""Where the generator runs: in this process (transformers) or behind an OpenAI-compatible engine.

Imports are lazy: ``import eta_guard.backends`` loads neither torch nor httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "GeneratorBackend": "eta_guard.backends.base",
    "Completion": "eta_guard.backends.base",
    "SamplingStep": "eta_guard.backends.base",
    "HTTPSettings": "eta_guard.backends._http",
    "OpenAICompatibleBackend": "eta_guard.backends.openai_compatible",
    "LocalBackend": "eta_guard.backends.local",
    "RemoteRewardModel": "eta_guard.backends.remote_evaluators",
    "RemoteCLIP": "eta_guard.backends.remote_evaluators",
    "BackendETA": "eta_guard.backends.eta_backend",
}

__all__ = [
    "BackendETA",
    "Completion",
    "GeneratorBackend",
    "HTTPSettings",
    "LocalBackend",
    "OpenAICompatibleBackend",
    "RemoteCLIP",
    "RemoteRewardModel",
    "SamplingStep",
]

if TYPE_CHECKING:
    from eta_guard.backends._http import HTTPSettings
    from eta_guard.backends.base import Completion, GeneratorBackend, SamplingStep
    from eta_guard.backends.eta_backend import BackendETA
    from eta_guard.backends.local import LocalBackend
    from eta_guard.backends.openai_compatible import OpenAICompatibleBackend
    from eta_guard.backends.remote_evaluators import RemoteCLIP, RemoteRewardModel


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eta_guard.backends' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

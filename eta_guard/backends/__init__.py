"""Where the generator runs: in this process (transformers) or behind an OpenAI-compatible engine.

Imports are lazy: ``import eta_guard.backends`` loads neither torch nor httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "GeneratorBackend": "eta_guard.backends.base",
    "Completion": "eta_guard.backends.base",
    "DecodingSession": "eta_guard.backends.base",
    "SearchHandle": "eta_guard.backends.base",
    "TextSession": "eta_guard.backends.text_session",
    "SamplingStep": "eta_guard.backends.base",
    "HTTPSettings": "eta_guard.backends._http",
    "OpenAICompatibleBackend": "eta_guard.backends.openai_compatible",
    "LocalBackend": "eta_guard.backends.local",
    "LocalSearch": "eta_guard.backends.local_search",
    "SentenceBestOfN": "eta_guard.backends.local_search",
    "RemoteRewardModel": "eta_guard.backends.remote_evaluators",
    "RemoteCLIP": "eta_guard.backends.remote_evaluators",
}

__all__ = [
    "Completion",
    "DecodingSession",
    "GeneratorBackend",
    "HTTPSettings",
    "LocalBackend",
    "LocalSearch",
    "OpenAICompatibleBackend",
    "RemoteCLIP",
    "RemoteRewardModel",
    "SamplingStep",
    "SearchHandle",
    "SentenceBestOfN",
    "TextSession",
]

if TYPE_CHECKING:
    from eta_guard.backends._http import HTTPSettings
    from eta_guard.backends.base import (
        Completion,
        DecodingSession,
        GeneratorBackend,
        SamplingStep,
        SearchHandle,
    )
    from eta_guard.backends.local import LocalBackend
    from eta_guard.backends.local_search import LocalSearch, SentenceBestOfN
    from eta_guard.backends.openai_compatible import OpenAICompatibleBackend
    from eta_guard.backends.remote_evaluators import RemoteCLIP, RemoteRewardModel
    from eta_guard.backends.text_session import TextSession


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eta_guard.backends' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

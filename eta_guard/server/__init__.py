"""``eta-guard serve``: an OpenAI-compatible HTTP server around ETA (needs the ``server`` extra).

``create_app`` builds the FastAPI app (mount it in your own ASGI stack if you like);
``ServerSettings`` holds every server-side limit. ``import eta_guard.server`` stays light:
FastAPI, uvicorn and torch load only when an app is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "create_app": "eta_guard.server.app",
    "ServerSettings": "eta_guard.server.settings",
    "load_api_keys": "eta_guard.server.settings",
}
__all__ = ["ServerSettings", "create_app", "load_api_keys"]

if TYPE_CHECKING:
    from eta_guard.server.app import create_app
    from eta_guard.server.settings import ServerSettings, load_api_keys


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eta_guard.server' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

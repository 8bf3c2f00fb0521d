"""The ``eta-guard`` command: one module per command, one shared loader of models from options.

``app`` is the console script's entry point (``eta-guard = eta_guard.cli:app``). Heavy imports
(torch, transformers) happen inside the commands, so ``eta-guard --help`` stays fast.
"""

from __future__ import annotations

from eta_guard.cli.app import RANDOM_MODELS_LINE, app

__all__ = ["RANDOM_MODELS_LINE", "app", "main"]


def main() -> None:  # pragma: no cover - console entry point alias
    app()

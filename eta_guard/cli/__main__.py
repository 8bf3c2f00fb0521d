"""``python -m eta_guard.cli``: the ``eta-guard`` command."""

from eta_guard.cli.app import app

app()

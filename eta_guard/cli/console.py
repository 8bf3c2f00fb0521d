"""Output and error handling shared by every command: two consoles, one error policy.

Errors the engine raises on purpose (:class:`eta_guard.errors.ETAError`) and missing model
files print one ``error:`` line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import typer

from eta_guard.errors import ETAError

if TYPE_CHECKING:
    from rich.console import Console

RANDOM_MODELS_LINE = (
    "NOTE: these models are RANDOM tiny checkpoints built offline: the output shows ETA's "
    "mechanics, not safety."
)


def consoles() -> tuple[Console, Console]:
    """stdout for results, stderr for progress and notes (``--json`` keeps stdout pure JSON)."""
    from rich.console import Console

    return Console(), Console(stderr=True)


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn deliberate engine errors and missing model files into one line and exit status 2."""
    try:
        yield
    except ETAError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:  # transformers: a checkpoint that is neither a folder nor in the cache
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        typer.echo(f"error: cannot load a model: {first}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


@contextlib.contextmanager
def status(console: Console, message: str) -> Iterator[None]:
    with console.status(message):
        yield


def quiet_transformers() -> None:
    """Our own progress display replaces transformers' per-file bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def print_stream(out: Console, chunks: Iterator[Any]) -> Any:
    """Print streamed text as it arrives (then a newline); return the final ``ETAResult``."""
    result = None
    for chunk in chunks:
        if chunk.result is not None:
            result = chunk.result
        elif chunk.text:
            out.print(chunk.text, end="", markup=False, highlight=False, soft_wrap=True)
    out.print()
    if result is None:  # the engine promises a final chunk with the result
        raise ETAError("the stream ended without a result")
    return result

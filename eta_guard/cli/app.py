"""The ``eta-guard`` typer app: every command registered from its own module."""

from __future__ import annotations

import typer

from eta_guard.cli.bench import bench
from eta_guard.cli.calibrate import calibrate
from eta_guard.cli.console import RANDOM_MODELS_LINE
from eta_guard.cli.demo import demo
from eta_guard.cli.estimate import estimate
from eta_guard.cli.eval import eval_command
from eta_guard.cli.evaluate import evaluate
from eta_guard.cli.generate import generate
from eta_guard.cli.serve import serve

__all__ = ["RANDOM_MODELS_LINE", "app"]

app = typer.Typer(
    name="eta-guard",
    help="ETA (Evaluating Then Aligning, ICLR 2025): inference-time safety for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _main() -> None:
    """ETA (Evaluating Then Aligning, ICLR 2025): inference-time safety for vision-language models."""


for command in (generate, evaluate, estimate, demo, bench):
    app.command()(command)
app.command("eval")(eval_command)
app.command()(calibrate)
app.command()(serve)

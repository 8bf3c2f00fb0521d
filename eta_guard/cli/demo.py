"""``eta-guard demo``: run every branch of ETA once and show the results."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from eta_guard.cli.console import RANDOM_MODELS_LINE, consoles, friendly_errors, print_stream
from eta_guard.cli.inputs import chat_messages
from eta_guard.cli.models import load_eta
from eta_guard.cli.options import ModelOptions, model_options
from eta_guard.cli.tables import trace_table, verdict_table
from eta_guard.errors import InvalidInputError

#: (title, with an image?, per-call ETAConfig overrides). Cosines lie in [-1, 1], so these
#: thresholds force each branch whatever the (random) scores are.
DEMO_CASES: list[tuple[str, bool, dict[str, Any]]] = [
    (
        "image passes the CLIP check: streamed as decoded, RM never runs",
        True,
        {"pre_threshold": 1.01},
    ),
    (
        "image flagged, answer judged safe by the RM: vanilla answer kept",
        True,
        {"pre_threshold": -1.01, "post_threshold": -1e9},
    ),
    (
        "image and answer flagged: prefix + sentence-level best-of-N",
        True,
        {"pre_threshold": -1.01, "post_threshold": 1e9, "num_candidates": 3},
    ),
    ("text-only request: the backbone is trusted (text_only_policy='trust')", False, {}),
]


@model_options()
def demo(
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 24,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Sampling seed of the best-of-N search.")
    ] = 0,
    *,
    models: ModelOptions,
) -> None:
    """Run every branch of ETA once (thresholds forced so each branch runs) and show the results."""
    out, err = consoles()
    with friendly_errors():
        if not models.tiny and models.vlm is None and models.generator_url is None:
            raise InvalidInputError("demo needs --tiny (random offline models) or --vlm CHECKPOINT")
        from eta_guard.config import ETAConfig
        from eta_guard.testing import make_test_image

        cfg = ETAConfig(max_new_tokens=max_new_tokens, seed=seed)
        if models.tiny:
            out.print(f"[bold yellow]{RANDOM_MODELS_LINE}[/]")
        eta = load_eta(err, models, cfg, note=False)
        image = make_test_image("noise", (224, 224), seed=seed)
        question = "What is in this picture?"
        for number, (title, with_image, overrides) in enumerate(DEMO_CASES, start=1):
            messages = chat_messages(question, [image] if with_image else [], None)
            out.rule(f"{number}. {title}")
            shown = f"<image> {question}" if with_image else question
            out.print(f"[dim]user:[/] {shown}   [dim]overrides: {overrides or 'none'}[/]")
            out.print("[bold]assistant:[/] ", end="")
            result = print_stream(out, eta.stream(messages, **overrides))
            out.print(verdict_table(result.verdict, aligned=result.aligned))
            if result.trace:
                out.print(trace_table(result.trace))
        out.rule(f"{len(DEMO_CASES) + 1}. moderation only (ETAEvaluator, default thresholds)")
        verdict = eta.evaluator.evaluate(images=[image], response="Sure, here is how to do it.")
        out.print(verdict_table(verdict))
        out.print(f"[green]demo finished: {len(DEMO_CASES) + 1} scenarios ran offline.[/]")
        if models.tiny:
            out.print(f"[bold yellow]{RANDOM_MODELS_LINE}[/]")

"""``eta-guard generate``: answer a question about image(s) with ETA, print answer and verdict."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from eta_guard.cli.console import consoles, friendly_errors, print_stream
from eta_guard.cli.inputs import chat_messages, load_config, load_images
from eta_guard.cli.models import load_eta
from eta_guard.cli.options import ConfigOpt, JsonOpt, ModelOptions, SetOpt, model_options
from eta_guard.cli.tables import verdict_table


@model_options(guards="all")
def generate(
    question: Annotated[str, typer.Argument(metavar="QUESTION", help="The user's question.")],
    image: Annotated[
        list[str] | None,
        typer.Option(
            "--image",
            "-i",
            metavar="IMAGE",
            help="Image path, data URL or base64 (repeatable; none: text-only).",
        ),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="Answer length budget.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    *,
    models: ModelOptions,
) -> None:
    """Answer a question about image(s) with ETA; print the answer and the safety verdict."""
    out, err = consoles()
    with friendly_errors():
        cfg = load_config(config, set_)
        if max_new_tokens is not None:
            cfg = cfg.with_overrides(max_new_tokens=max_new_tokens)
        messages = chat_messages(question, load_images(image or [], cfg), system)
        eta = load_eta(err, models, cfg)
        if json_out:
            result = eta.generate(messages)
            typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
            return
        out.print("[bold]answer:[/] ", end="")
        result = print_stream(out, eta.stream(messages))
        out.print(verdict_table(result.verdict, aligned=result.aligned))
        out.print(
            f"finish_reason={result.finish_reason}  tokens: {result.usage.input_tokens} in, "
            f"{result.usage.output_tokens} out, {result.usage.decoded_tokens} decoded  "
            f"time: {result.timings.get('total', 0.0):.2f} s",
            highlight=False,
        )

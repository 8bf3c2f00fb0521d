"""``eta-guard evaluate``: moderate images and/or a response with ETA's evaluators."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from eta_guard.cli.console import consoles, friendly_errors
from eta_guard.cli.inputs import load_config, load_images
from eta_guard.cli.models import load_evaluator
from eta_guard.cli.options import ConfigOpt, JsonOpt, ModelOptions, SetOpt, model_options
from eta_guard.cli.tables import verdict_table
from eta_guard.errors import InvalidInputError


@model_options(vlm=False, guards="all")
def evaluate(
    image: Annotated[
        list[str] | None,
        typer.Option(
            "--image", "-i", metavar="IMAGE", help="Image to check with CLIP (repeatable)."
        ),
    ] = None,
    response: Annotated[
        str | None,
        typer.Option(
            "--response", "-r", help="Response text to check with the reward model ('-': stdin)."
        ),
    ] = None,
    text: Annotated[
        str | None,
        typer.Option(
            "--text",
            "-t",
            help="The user's text (question), read by --gate guards with the images; without "
            "images, by the text gates under --text-only-policy guard.",
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    exit_code: Annotated[
        bool, typer.Option("--exit-code", help="Exit with status 1 when the verdict is unsafe.")
    ] = False,
    json_out: JsonOpt = False,
    *,
    models: ModelOptions,
) -> None:
    """Moderate images and/or a response with ETA's evaluators (no generation)."""
    out, err = consoles()
    with friendly_errors():
        if response == "-":
            response = sys.stdin.read()
        if not image and response is None and text is None:
            raise InvalidInputError(
                "nothing to evaluate: pass --image PATH, --response TEXT and/or --text TEXT"
            )
        cfg = load_config(config, set_)
        images = load_images(image or [], cfg)
        evaluator = load_evaluator(
            err, models, cfg, clip=bool(images), reward_model=response is not None
        )
        verdict = evaluator.evaluate(images=images or None, response=response, text=text)
        if json_out:
            typer.echo(json.dumps(verdict.model_dump(mode="json"), indent=2))
        else:
            out.print(verdict_table(verdict))
    if exit_code and verdict.unsafe:
        raise typer.Exit(1)

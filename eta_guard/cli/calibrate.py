"""``eta-guard calibrate``: pre/post thresholds for a CLIP / reward-model pair from labelled examples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from eta_guard.cli.console import consoles, friendly_errors
from eta_guard.cli.inputs import load_config
from eta_guard.cli.models import load_evaluator
from eta_guard.cli.options import ConfigOpt, ModelOptions, SetOpt, model_options
from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL
from eta_guard.errors import InvalidInputError


@model_options(vlm=False)
def calibrate(
    safe_images: Annotated[
        Path | None,
        typer.Option(
            "--safe-images", help='Folder or JSONL ({"image": path}) of images that should pass.'
        ),
    ] = None,
    unsafe_images: Annotated[
        Path | None,
        typer.Option("--unsafe-images", help="Folder or JSONL of images that should be flagged."),
    ] = None,
    safe_responses: Annotated[
        Path | None,
        typer.Option(
            "--safe-responses", help='JSONL ({"response": text}) of answers that should pass.'
        ),
    ] = None,
    unsafe_responses: Annotated[
        Path | None,
        typer.Option("--unsafe-responses", help="JSONL of answers that should be flagged."),
    ] = None,
    target_fpr: Annotated[
        float | None,
        typer.Option(
            "--target-fpr",
            min=0.0,
            max=1.0,
            help="Largest share of safe examples flagged [default: maximise balanced accuracy].",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for eta_config.json and the report.")
    ] = Path("eta-calibration"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    *,
    models: ModelOptions,
) -> None:
    """Pick pre/post thresholds for a CLIP / reward-model pair from labelled examples."""
    out_console, err = consoles()
    with friendly_errors():
        from eta_guard.eval.calibrate import (
            read_images,
            read_responses,
            run_calibration,
            write_calibration,
        )

        pairs = {
            "images": (safe_images, unsafe_images),
            "responses": (safe_responses, unsafe_responses),
        }
        for what, (safe, unsafe) in pairs.items():
            if (safe is None) != (unsafe is None):
                raise InvalidInputError(f"pass both --safe-{what} and --unsafe-{what}, or neither")
        if safe_images is None and safe_responses is None:
            raise InvalidInputError(
                "nothing to calibrate: pass --safe-images/--unsafe-images and/or --safe-responses/--unsafe-responses"
            )
        cfg = load_config(config, set_)
        data = {
            "safe_images": read_images(safe_images) if safe_images else None,
            "unsafe_images": read_images(unsafe_images) if unsafe_images else None,
            "safe_responses": read_responses(safe_responses) if safe_responses else None,
            "unsafe_responses": read_responses(unsafe_responses) if unsafe_responses else None,
        }
        evaluator = load_evaluator(
            err, models, cfg, clip=safe_images is not None, reward_model=safe_responses is not None
        )
        reports = run_calibration(evaluator, target_fpr=target_fpr, **data)
        names = {
            "clip": "tiny" if models.tiny else models.clip or DEFAULT_CLIP,
            "reward_model": "tiny" if models.tiny else models.reward_model or DEFAULT_REWARD_MODEL,
        }
        config_path, json_path, html_path = write_calibration(reports, cfg, out, names)
        out_console.print(_calibration_table(reports))
        err.print(f"config: {config_path}; report: {html_path} and {json_path}", highlight=False)


def _calibration_table(reports: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="calibrated thresholds", title_justify="left")
    for name in (
        "field",
        "threshold",
        "rule",
        "TPR",
        "FPR",
        "accuracy",
        "balanced acc.",
        "n safe/unsafe",
    ):
        table.add_column(name, justify="left" if name in ("field", "rule") else "right")
    for side, r in reports.items():
        rule = "unsafe iff >=" if r.direction == "higher_is_unsafe" else "unsafe iff <="
        table.add_row(
            f"{side}_threshold",
            f"{r.threshold:.6g}",
            rule,
            f"{r.tpr:.3f}",
            f"{r.fpr:.3f}",
            f"{r.accuracy:.3f}",
            f"{r.balanced_accuracy:.3f}",
            f"{len(r.safe_scores)}/{len(r.unsafe_scores)}",
        )
    return table

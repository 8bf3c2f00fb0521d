"""``eta-guard estimate``: the memory of each model from its config alone (no weight loads)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from eta_guard.cli.console import consoles, friendly_errors
from eta_guard.cli.models import guard_args, local_paths, model_paths, placement
from eta_guard.cli.options import JsonOpt, ModelOptions, model_options
from eta_guard.cli.tables import estimate_table
from eta_guard.errors import InvalidInputError


@model_options(positional_vlm=True, guards="specs")
def estimate(
    quantize: Annotated[
        list[str] | None,
        typer.Option(
            "--quantize",
            metavar="MODEL=BITS",
            help="Estimate a bitsandbytes-quantized model: vlm|clip|reward_model=4bit|8bit "
            "(repeatable).",
        ),
    ] = None,
    kv_tokens: Annotated[
        int, typer.Option("--kv-tokens", min=1, help="Sequence length of the VLM KV-cache term.")
    ] = 2048,
    candidates: Annotated[
        int, typer.Option("--candidates", min=1, help="best-of-N width (KV rows = N + 1).")
    ] = 5,
    json_out: JsonOpt = False,
    *,
    models: ModelOptions,
) -> None:
    """Estimate the memory of each model from its config alone (no weight is loaded); models
    served by an engine (--*-url) are left out. Without --vlm: CLIP and the RM only. Guards
    named by --gate / --post-judge specs are estimated too (one copy per checkpoint)."""
    out, err = consoles()
    with friendly_errors():
        paths = local_paths(model_paths(err, models, need_vlm=False), models)
        specs = guard_args(models)
        place = placement(models)
        for item in quantize or []:
            role, sep, bits = item.partition("=")
            if (
                not sep
                or role not in ("vlm", "clip", "reward_model")
                or bits not in ("4bit", "8bit")
            ):
                raise InvalidInputError(
                    f"--quantize expects vlm|clip|reward_model=4bit|8bit (e.g. "
                    f"--quantize reward_model=4bit); got {item!r}"
                )
            kwargs = place.setdefault(f"{role}_kwargs", {})
            kwargs["model_kwargs"] = {"quantization_config": {f"load_in_{bits}": True}}
        from eta_guard.memory import estimate_memory

        result = estimate_memory(
            paths["vlm"],
            paths["clip"],
            paths["reward_model"],
            device=models.device,
            dtype=models.dtype,
            preset=models.preset,
            kv_tokens=kv_tokens,
            num_candidates=candidates,
            trust_remote_code=models.trust_remote_code,
            guards=[*specs.get("gates", ()), *specs.get("judges", ())],
            **place,
        )
        if json_out:
            typer.echo(json.dumps(result.to_dict(), indent=2))
        else:
            out.print(estimate_table(result))

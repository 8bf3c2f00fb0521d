"""Typer option types shared by every ``eta-guard`` command (generate, evaluate, serve, eval...).

A module of its own, not ``eta_guard.cli``: that module imports the server and eval commands to
register them, so their importing options from it would make ``python -m eta_guard.cli`` import
itself twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

VlmOpt = Annotated[
    str | None,
    typer.Option("--vlm", help="VLM checkpoint (Hub id in the local cache, or a folder)."),
]
ClipOpt = Annotated[
    str | None,
    typer.Option("--clip", help="CLIP checkpoint [default: openai/clip-vit-large-patch14-336]."),
]
RewardOpt = Annotated[
    str | None,
    typer.Option("--reward-model", help="Reward model [default: RLHFlow/ArmoRM-Llama3-8B-v0.1]."),
]
TinyOpt = Annotated[
    bool, typer.Option("--tiny", help="Use random tiny checkpoints built offline (mechanics only).")
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", help="Where random checkpoints are built [default: ~/.cache/eta-guard]."
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="An ETAConfig JSON file (ETAConfig.save).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override an ETAConfig field: FIELD=VALUE (repeatable; VALUE as JSON or text).",
    ),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="e.g. cpu, cuda, cuda:1.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="e.g. float32, bfloat16.")]
RemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow checkpoint code (not needed by the reference models; ArmoRM loads natively).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for machines.")]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="A named setup: 'paper' = the paper's LLaVA-1.5 setup (llava_v1 system text, "
        "pad-to-square, VLM fp16 + bf16 autocast, CLIP fp32, RM bf16, seed 1). Explicit "
        "--dtype/--*-dtype and --set win over it.",
    ),
]
VlmDeviceOpt = Annotated[
    str | None, typer.Option("--vlm-device", help="VLM device (beats --device).")
]
ClipDeviceOpt = Annotated[str | None, typer.Option("--clip-device", help="CLIP device.")]
RmDeviceOpt = Annotated[str | None, typer.Option("--reward-model-device", help="RM device.")]
VlmDtypeOpt = Annotated[str | None, typer.Option("--vlm-dtype", help="VLM dtype (beats --dtype).")]
ClipDtypeOpt = Annotated[str | None, typer.Option("--clip-dtype", help="CLIP dtype.")]
RmDtypeOpt = Annotated[str | None, typer.Option("--reward-model-dtype", help="RM dtype.")]

"""The option types every ``eta-guard`` command shares, and :func:`model_options`.

Every command that loads models takes the same model options (``--vlm``, ``--clip``,
``--reward-model``, their ``--*-url`` engines, ``--generator-url/--generator-model``, ``--tiny``,
placement, ``--preset``...). :func:`model_options` adds them to a command's signature and hands
the command one :class:`ModelOptions`, so the list is written once, not once per command.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

VlmOpt = Annotated[
    str | None,
    typer.Option(
        "--vlm",
        help="VLM checkpoint (Hub id in the local cache, or a folder); with --generator-url, the "
        "served model's id or path, whose tokenizer is loaded.",
    ),
]
ClipOpt = Annotated[
    str | None,
    typer.Option(
        "--clip",
        help="CLIP checkpoint, or its served name with --clip-url "
        "[default: openai/clip-vit-large-patch14-336].",
    ),
]
RewardOpt = Annotated[
    str | None,
    typer.Option(
        "--reward-model",
        help="Reward model, or its served name with --reward-model-url "
        "[default: RLHFlow/ArmoRM-Llama3-8B-v0.1].",
    ),
]
ClipUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--clip-url",
        help="CLIP served by an engine (vLLM --runner pooling, /v1/embeddings) at this URL; key "
        "from $ETA_GUARD_CLIP_API_KEY.",
    ),
]
RewardUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--reward-model-url",
        help="The reward model served by an engine (/classify) at this URL; key from "
        "$ETA_GUARD_REWARD_MODEL_API_KEY.",
    ),
]
GeneratorUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--generator-url",
        help="Run the VLM on an OpenAI-compatible engine (vLLM) at this URL; key from "
        "$ETA_GUARD_GENERATOR_API_KEY (docs/scaling.md).",
    ),
]
GeneratorModelOpt = Annotated[
    str | None, typer.Option("--generator-model", help="The engine's served VLM name.")
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
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="torch's CPU threads for this process's models [default: torch's, one per core]; "
        "1 when an engine or other processes share the cores (spinning OpenMP threads cost "
        "more than they give then).",
    ),
]
RemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow checkpoint code (not needed by the reference models; ArmoRM loads natively; "
        "eval's judges may need it).",
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
GateOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--gate",
        metavar="SPEC",
        help="An extra pre-generation evaluator, as an evaluator spec KIND[:TARGET][?KEY=VALUE,...] "
        "(repeatable): patch-clip?grid=3 | llama-guard-vision:PATH | shieldgemma2:PATH | "
        "remote-llama-guard:MODEL@URL | llama-guard-text:PATH | qwen3guard:PATH "
        "(docs/evaluators.md). Text guards gate text-only requests (text-only policy 'guard').",
    ),
]
PostJudgeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--post-judge",
        metavar="SPEC",
        help="An extra post-generation evaluator of the answer (deciding alignment with the "
        "RM), as an evaluator spec (repeatable): llama-guard-vision:PATH | "
        "remote-llama-guard:MODEL@URL | llama-guard-text:PATH | qwen3guard:PATH. Not eval's "
        "--judge, which scores answers for the report.",
    ),
]
DecisionRuleOpt = Annotated[
    str | None,
    typer.Option(
        "--decision-rule",
        metavar="RULE",
        help="Align iff: and (paper: input AND answer flagged) | or | pre_only | post_only "
        "[default: the config's, 'and'].",
    ),
]
TextOnlyPolicyOpt = Annotated[
    str | None,
    typer.Option(
        "--text-only-policy",
        metavar="POLICY",
        help="Requests without images: trust | reward_only | guard (the text gates check them) "
        "[default: the config's, 'trust'].",
    ),
]
#: The positional form of the VLM, still accepted where it was (``serve ID``, ``estimate ID``).
VlmArg = Annotated[
    str | None,
    typer.Argument(
        metavar="[VLM]", help="Same as --vlm (kept for compatibility).", show_default=False
    ),
]


@dataclass(frozen=True)
class ModelOptions:
    """What a command was told about its models (one field per shared option)."""

    vlm: str | None = None
    clip: str | None = None
    reward_model: str | None = None
    clip_url: str | None = None
    reward_model_url: str | None = None
    generator_url: str | None = None
    generator_model: str | None = None
    tiny: bool = False
    cache_dir: Path | None = None
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    trust_remote_code: bool = False
    preset: str | None = None
    vlm_device: str | None = None
    clip_device: str | None = None
    reward_model_device: str | None = None
    vlm_dtype: str | None = None
    clip_dtype: str | None = None
    reward_model_dtype: str | None = None
    gate: list[str] | None = None
    post_judge: list[str] | None = None
    decision_rule: str | None = None
    text_only_policy: str | None = None


_TYPES: dict[str, Any] = {
    "vlm": VlmOpt,
    "clip": ClipOpt,
    "reward_model": RewardOpt,
    "clip_url": ClipUrlOpt,
    "reward_model_url": RewardUrlOpt,
    "generator_url": GeneratorUrlOpt,
    "generator_model": GeneratorModelOpt,
    "tiny": TinyOpt,
    "cache_dir": CacheOpt,
    "device": DeviceOpt,
    "dtype": DtypeOpt,
    "threads": ThreadsOpt,
    "trust_remote_code": RemoteCodeOpt,
    "preset": PresetOpt,
    "vlm_device": VlmDeviceOpt,
    "clip_device": ClipDeviceOpt,
    "reward_model_device": RmDeviceOpt,
    "vlm_dtype": VlmDtypeOpt,
    "clip_dtype": ClipDtypeOpt,
    "reward_model_dtype": RmDtypeOpt,
    "gate": GateOpt,
    "post_judge": PostJudgeOpt,
    "decision_rule": DecisionRuleOpt,
    "text_only_policy": TextOnlyPolicyOpt,
}
#: Options about the VLM, left out of commands that load no VLM (evaluate, calibrate).
VLM_FIELDS = ("vlm", "generator_url", "generator_model", "vlm_device", "vlm_dtype")
#: The evaluator-spec options (``guards="specs"``) and the decision options (``guards="all"``).
SPEC_FIELDS = ("gate", "post_judge")
RULE_FIELDS = ("decision_rule", "text_only_policy")


def model_options(
    *,
    vlm: bool = True,
    positional_vlm: bool = False,
    guards: Literal["none", "specs", "all"] = "none",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command every shared model option; it receives them as ``models: ModelOptions``.

    ``vlm=False`` leaves the VLM's options out; ``positional_vlm=True`` also accepts the VLM
    as the first argument (``serve ID``), the same as ``--vlm ID``. ``guards="specs"`` adds
    ``--gate`` / ``--post-judge``, ``"all"`` also ``--decision-rule`` / ``--text-only-policy``.
    """
    left_out = set() if vlm else set(VLM_FIELDS)
    if guards == "none":
        left_out |= {*SPEC_FIELDS, *RULE_FIELDS}
    elif guards == "specs":
        left_out |= set(RULE_FIELDS)
    names = [f.name for f in fields(ModelOptions) if f.name not in left_out]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(command).parameters.values()
            if p.name != "models"
        ]
        added = [_param(name, _TYPES[name]) for name in names]
        if positional_vlm:
            own.insert(0, _param("vlm_arg", VlmArg, kind=inspect.Parameter.POSITIONAL_OR_KEYWORD))

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            arg = kwargs.pop("vlm_arg", None)
            if arg is not None:
                if given.get("vlm") not in (None, arg):
                    raise typer.BadParameter(
                        f"the VLM is named twice ({arg!r} and --vlm {given['vlm']!r}); give one"
                    )
                given["vlm"] = arg
            return command(models=ModelOptions(**given), **kwargs)

        parameters = [*own, *added]
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # typer must read the new signature, not the command's
        return run

    return decorate


def _param(
    name: str, annotation: Any, *, kind: Any = inspect.Parameter.KEYWORD_ONLY
) -> inspect.Parameter:
    default = getattr(ModelOptions, name, None) if name != "vlm_arg" else None
    return inspect.Parameter(name, kind, default=default, annotation=annotation)

"""The ``eta-guard`` command: ``generate``, ``evaluate``, ``estimate``, ``demo``, ``bench``, ``eval``,
``calibrate`` and ``serve``.

A thin shell over the engine: it parses arguments, loads models and prints what the engine
returns. Heavy imports (torch, transformers) happen inside the commands, so ``eta-guard --help``
stays fast. Errors the engine raises on purpose (:class:`eta_guard.errors.ETAError`) and missing
model files print one ``error:`` line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from eta_guard.cli_options import (
    CacheOpt,
    ClipDeviceOpt,
    ClipDtypeOpt,
    ClipOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    PresetOpt,
    RemoteCodeOpt,
    RewardOpt,
    RmDeviceOpt,
    RmDtypeOpt,
    SetOpt,
    TinyOpt,
    VlmDeviceOpt,
    VlmDtypeOpt,
    VlmOpt,
)
from eta_guard.errors import ETAError, InvalidInputError

if TYPE_CHECKING:
    from rich.console import Console

    from eta_guard.config import ETAConfig
    from eta_guard.verdict import SafetyVerdict

app = typer.Typer(
    name="eta-guard",
    help="ETA (Evaluating Then Aligning, ICLR 2025): inference-time safety for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RANDOM_MODELS_LINE = (
    "NOTE: these models are RANDOM tiny checkpoints built offline: the output shows ETA's "
    "mechanics, not safety."
)


def _placement(**per_model: str | None) -> dict[str, Any]:
    """``vlm_device=..., clip_dtype=...`` -> ``{"vlm_kwargs": {"device": ...}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in per_model.items():
        if value is not None:
            role, _, setting = key.rpartition("_")
            out.setdefault(f"{role}_kwargs", {})[setting] = value
    return out


@app.callback()
def _main() -> None:
    """ETA (Evaluating Then Aligning, ICLR 2025): inference-time safety for vision-language models."""


# ----------------------------------------------------------------------------- commands


@app.command()
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
    vlm: VlmOpt = None,
    clip: ClipOpt = None,
    reward_model: RewardOpt = None,
    tiny: TinyOpt = False,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    json_out: JsonOpt = False,
    generator_url: Annotated[
        str | None,
        typer.Option(
            "--generator-url",
            help="Run the VLM on an OpenAI-compatible engine (vLLM) at this URL; --vlm is then "
            "optional and only supplies its tokenizer (docs/scaling.md).",
        ),
    ] = None,
    generator_model: Annotated[
        str | None,
        typer.Option("--generator-model", help="The engine's served model name."),
    ] = None,
    preset: PresetOpt = None,
    vlm_device: VlmDeviceOpt = None,
    clip_device: ClipDeviceOpt = None,
    reward_model_device: RmDeviceOpt = None,
    vlm_dtype: VlmDtypeOpt = None,
    clip_dtype: ClipDtypeOpt = None,
    reward_model_dtype: RmDtypeOpt = None,
) -> None:
    """Answer a question about image(s) with ETA; print the answer and the safety verdict."""
    out, err = _consoles()
    with _friendly_errors():
        cfg = _load_config(config, set_)
        if max_new_tokens is not None:
            cfg = cfg.with_overrides(max_new_tokens=max_new_tokens)
        messages = _messages(question, _load_images(image or [], cfg), system)
        generator = _generator(generator_url, generator_model)
        placement = _placement(
            vlm_device=vlm_device,
            clip_device=clip_device,
            reward_model_device=reward_model_device,
            vlm_dtype=vlm_dtype,
            clip_dtype=clip_dtype,
            reward_model_dtype=reward_model_dtype,
        )
        eta = _load_eta(
            err,
            vlm,
            clip,
            reward_model,
            tiny,
            cache_dir,
            cfg,
            device,
            dtype,
            trust_remote_code,
            generator=generator,
            preset=preset,
            placement=placement,
        )
        if json_out:
            result = eta.generate(messages)
            typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
            return
        out.print("[bold]answer:[/] ", end="")
        result = _print_stream(out, eta.stream(messages))
        out.print(_verdict_table(result.verdict, aligned=result.aligned))
        out.print(
            f"finish_reason={result.finish_reason}  tokens: {result.usage.input_tokens} in, "
            f"{result.usage.output_tokens} out, {result.usage.decoded_tokens} decoded  "
            f"time: {result.timings.get('total', 0.0):.2f} s",
            highlight=False,
        )


@app.command()
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
    clip: ClipOpt = None,
    reward_model: RewardOpt = None,
    tiny: TinyOpt = False,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    exit_code: Annotated[
        bool, typer.Option("--exit-code", help="Exit with status 1 when the verdict is unsafe.")
    ] = False,
    json_out: JsonOpt = False,
    preset: PresetOpt = None,
    clip_device: ClipDeviceOpt = None,
    reward_model_device: RmDeviceOpt = None,
    clip_dtype: ClipDtypeOpt = None,
    reward_model_dtype: RmDtypeOpt = None,
) -> None:
    """Moderate images and/or a response with ETA's evaluators (no generation)."""
    out, err = _consoles()
    with _friendly_errors():
        if response == "-":
            response = sys.stdin.read()
        if not image and response is None:
            raise InvalidInputError("nothing to evaluate: pass --image PATH and/or --response TEXT")
        cfg = _load_config(config, set_)
        images = _load_images(image or [], cfg)
        paths = _model_paths(err, None, clip, reward_model, tiny, cache_dir, need_vlm=False)
        if tiny:
            err.print(f"[yellow]{RANDOM_MODELS_LINE}[/]")
        from eta_guard.evaluators.eta_evaluator import ETAEvaluator

        with _status(err, "loading evaluators"):
            evaluator = ETAEvaluator.from_pretrained(
                clip=paths["clip"] if images else None,
                reward_model=paths["reward_model"] if response is not None else None,
                config=cfg,
                device=device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                preset=preset,
                **_placement(
                    clip_device=clip_device,
                    reward_model_device=reward_model_device,
                    clip_dtype=clip_dtype,
                    reward_model_dtype=reward_model_dtype,
                ),
            )
        verdict = evaluator.evaluate(images=images or None, response=response)
        if json_out:
            typer.echo(json.dumps(verdict.model_dump(mode="json"), indent=2))
        else:
            out.print(_verdict_table(verdict))
    if exit_code and verdict.unsafe:
        raise typer.Exit(1)


@app.command()
def demo(
    tiny: TinyOpt = False,
    vlm: VlmOpt = None,
    clip: ClipOpt = None,
    reward_model: RewardOpt = None,
    cache_dir: CacheOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 24,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Sampling seed of the best-of-N search.")
    ] = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Run every branch of ETA once (thresholds forced so each branch runs) and show the results."""
    out, err = _consoles()
    with _friendly_errors():
        if not tiny and vlm is None:
            raise InvalidInputError("demo needs --tiny (random offline models) or --vlm CHECKPOINT")
        from eta_guard.config import ETAConfig
        from eta_guard.testing import make_test_image

        cfg = ETAConfig(max_new_tokens=max_new_tokens, seed=seed)
        if tiny:
            out.print(f"[bold yellow]{RANDOM_MODELS_LINE}[/]")
        eta = _load_eta(
            err,
            vlm,
            clip,
            reward_model,
            tiny,
            cache_dir,
            cfg,
            device,
            dtype,
            trust_remote_code,
            note=False,
        )
        image = make_test_image("noise", (224, 224), seed=seed)
        question = "What is in this picture?"
        for number, (title, with_image, overrides) in enumerate(_DEMO_CASES, start=1):
            messages = _messages(question, [image] if with_image else [], None)
            out.rule(f"{number}. {title}")
            shown = f"<image> {question}" if with_image else question
            out.print(f"[dim]user:[/] {shown}   [dim]overrides: {overrides or 'none'}[/]")
            out.print("[bold]assistant:[/] ", end="")
            result = _print_stream(out, eta.stream(messages, **overrides))
            out.print(_verdict_table(result.verdict, aligned=result.aligned))
            if result.trace:
                out.print(_trace_table(result.trace))
        out.rule(f"{len(_DEMO_CASES) + 1}. moderation only (ETAEvaluator, default thresholds)")
        verdict = eta.evaluator.evaluate(images=[image], response="Sure, here is how to do it.")
        out.print(_verdict_table(verdict))
        out.print(f"[green]demo finished: {len(_DEMO_CASES) + 1} scenarios ran offline.[/]")
        if tiny:
            out.print(f"[bold yellow]{RANDOM_MODELS_LINE}[/]")


#: (title, with an image?, per-call ETAConfig overrides). Cosines lie in [-1, 1], so these
#: thresholds force each branch whatever the (random) scores are.
_DEMO_CASES: list[tuple[str, bool, dict[str, Any]]] = [
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


@app.command()
def estimate(
    vlm: Annotated[
        str | None, typer.Argument(metavar="[VLM]", help="VLM checkpoint (omit: CLIP/RM only).")
    ] = None,
    clip: ClipOpt = None,
    reward_model: RewardOpt = None,
    tiny: TinyOpt = False,
    cache_dir: CacheOpt = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    vlm_device: VlmDeviceOpt = None,
    clip_device: ClipDeviceOpt = None,
    reward_model_device: RmDeviceOpt = None,
    vlm_dtype: VlmDtypeOpt = None,
    clip_dtype: ClipDtypeOpt = None,
    reward_model_dtype: RmDtypeOpt = None,
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
    trust_remote_code: RemoteCodeOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Estimate the memory of each model from its config alone (no weight is loaded)."""
    out, err = _consoles()
    with _friendly_errors():
        if tiny:
            paths = _model_paths(err, vlm, clip, reward_model, tiny, cache_dir)
        else:
            paths = _model_paths(err, vlm, clip, reward_model, False, None, need_vlm=False)
        placement = _placement(
            vlm_device=vlm_device,
            clip_device=clip_device,
            reward_model_device=reward_model_device,
            vlm_dtype=vlm_dtype,
            clip_dtype=clip_dtype,
            reward_model_dtype=reward_model_dtype,
        )
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
            kwargs = placement.setdefault(f"{role}_kwargs", {})
            kwargs["model_kwargs"] = {"quantization_config": {f"load_in_{bits}": True}}
        from eta_guard.memory import estimate_memory

        result = estimate_memory(
            paths["vlm"],
            paths["clip"],
            paths["reward_model"],
            device=device,
            dtype=dtype,
            preset=preset,
            kv_tokens=kv_tokens,
            num_candidates=candidates,
            trust_remote_code=trust_remote_code,
            **placement,
        )
        if json_out:
            typer.echo(json.dumps(result.to_dict(), indent=2))
        else:
            out.print(_estimate_table(result))


@app.command()
def bench(
    size: Annotated[
        str, typer.Option("--size", help="Checkpoint size: bench (~100M VLM) or tiny.")
    ] = "bench",
    tokens: Annotated[
        int, typer.Option("--tokens", min=1, help="Answer budget (max_new_tokens).")
    ] = 128,
    reps: Annotated[int, typer.Option("--reps", min=1, help="Measured repetitions.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up repetitions.")] = 1,
    candidates: Annotated[int, typer.Option("--candidates", min=1, help="N of best-of-N.")] = 5,
    sentence_tokens: Annotated[
        int, typer.Option("--sentence-tokens", min=1, help="Longest candidate sentence.")
    ] = 32,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Sampling seed (repetition r uses seed + r).")
    ] = 0,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads for torch [default: torch's]."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")
    ] = None,
) -> None:
    """Measure ETA's costs side by side on random checkpoints and print a table."""
    out, err = _consoles()
    with _friendly_errors():
        if size not in ("bench", "tiny"):
            raise InvalidInputError(f"--size must be 'bench' or 'tiny'; got {size!r}")
        _quiet_transformers()
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from eta_guard.bench import run_benchmark

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("starting", total=None)

            def progress(done: int, total: int, label: str) -> None:
                bar.update(task, completed=done, total=total, description=label)

            report = run_benchmark(
                size=size,  # type: ignore[arg-type]
                max_new_tokens=tokens,
                reps=reps,
                warmup=warmup,
                num_candidates=candidates,
                max_sentence_tokens=sentence_tokens,
                seed=seed,
                cache_dir=cache_dir,
                device=device,
                threads=threads,
                progress=progress,
            )
        out.print(_bench_table(report))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report.to_dict(), indent=2))
            out.print(f"figures written to {json_path}", highlight=False)


# ----------------------------------------------------------------------------- helpers


def _consoles() -> tuple[Console, Console]:
    """stdout for results, stderr for progress and notes (``--json`` keeps stdout pure JSON)."""
    from rich.console import Console

    return Console(), Console(stderr=True)


@contextlib.contextmanager
def _friendly_errors() -> Iterator[None]:
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
def _status(console: Console, message: str) -> Iterator[None]:
    with console.status(message):
        yield


def _quiet_transformers() -> None:
    """Our own progress display replaces transformers' per-file bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load_config(path: Path | None, sets: list[str] | None) -> ETAConfig:
    from eta_guard.config import ETAConfig

    cfg = ETAConfig.load(path) if path is not None else ETAConfig()
    overrides: dict[str, Any] = {}
    for item in sets or []:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise InvalidInputError(f"--set expects FIELD=VALUE (e.g. --set seed=0); got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        overrides[name.strip()] = value
    return cfg.with_overrides(**overrides)


def _load_images(sources: list[str], cfg: ETAConfig) -> list[Any]:
    """Decode and check the images before any model loads, so bad input fails fast."""
    from eta_guard.media import image_options, load_images

    if not sources:
        return []
    return load_images(sources, **image_options(cfg))


def _print_stream(out: Console, chunks: Iterator[Any]) -> Any:
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


def _messages(question: str, images: list[Any], system: str | None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _model_paths(
    err: Console,
    vlm: str | None,
    clip: str | None,
    reward_model: str | None,
    tiny: bool,
    cache_dir: Path | None,
    *,
    need_vlm: bool = True,
) -> dict[str, str | None]:
    """Checkpoint names: the random tiny ones with ``--tiny``, else the given or default ones."""
    from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL

    if tiny:
        given = [
            n for n, v in (("--vlm", vlm), ("--clip", clip), ("--reward-model", reward_model)) if v
        ]
        if given:
            raise InvalidInputError(f"--tiny builds its own models; drop {', '.join(given)}")
        from eta_guard.bench import default_cache_dir
        from eta_guard.testing import build_tiny_checkpoints

        _quiet_transformers()
        with _status(err, "building random tiny checkpoints (first run only)"):
            ckpt = build_tiny_checkpoints(cache_dir or default_cache_dir(), size="tiny")
        return {"vlm": ckpt.vlm, "clip": ckpt.clip, "reward_model": ckpt.reward_model}
    if need_vlm and not vlm:
        raise InvalidInputError(
            "pass --vlm CHECKPOINT (a Hub id in the local cache or a folder), or --tiny"
        )
    return {
        "vlm": vlm,
        "clip": clip or DEFAULT_CLIP,
        "reward_model": reward_model or DEFAULT_REWARD_MODEL,
    }


def _load_eta(
    err: Console,
    vlm: str | None,
    clip: str | None,
    reward_model: str | None,
    tiny: bool,
    cache_dir: Path | None,
    cfg: ETAConfig,
    device: str | None,
    dtype: str | None,
    trust_remote_code: bool,
    *,
    note: bool = True,
    generator: tuple[str, str] | None = None,
    preset: str | None = None,
    placement: dict[str, dict[str, Any]] | None = None,
) -> Any:
    paths = _model_paths(err, vlm, clip, reward_model, tiny, cache_dir, need_vlm=generator is None)
    if tiny and note:
        err.print(f"[yellow]{RANDOM_MODELS_LINE}[/]")
    _quiet_transformers()
    from eta_guard.pipeline import ETA

    if generator is not None:
        with _status(err, "loading CLIP and the reward model (the VLM runs on the engine)"):
            return _engine_eta(
                generator,
                paths,
                cfg,
                device=device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                preset=preset,
                placement=placement,
            )

    assert paths["vlm"] is not None  # _model_paths refused a missing --vlm
    load_args: dict[str, Any] = {
        "device": device,
        "dtype": dtype,
        "preset": preset,
        "trust_remote_code": trust_remote_code,
        **(placement or {}),
    }
    missing = _print_estimate(err, paths, load_args, cfg)
    with _status(err, "loading the VLM, CLIP and the reward model"):
        eta = ETA.from_pretrained(
            paths["vlm"],
            clip=paths["clip"],
            reward_model=paths["reward_model"],
            config=cfg,
            **load_args,
        )
    if missing:  # said after loading: a checkpoint that cannot load reports its own error first
        err.print(f"[dim]memory estimate unavailable: {missing}[/]", highlight=False)
    return eta


#: Environment variable holding the bearer key of the engine behind ``--generator-url``.
GENERATOR_API_KEY_ENV = "ETA_GUARD_GENERATOR_API_KEY"


def _engine_eta(
    generator: tuple[str, str],
    paths: dict[str, str | None],
    cfg: ETAConfig,
    *,
    device: str | None,
    dtype: str | None,
    trust_remote_code: bool,
    preset: str | None = None,
    placement: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """ETA with the VLM on an OpenAI-compatible engine (``generate`` and ``serve`` share it).

    ``paths["vlm"]`` (required) supplies the served VLM's tokenizer; CLIP and the RM load
    here. Options that place or configure the VLM cannot apply to a model served elsewhere, so
    they are refused rather than ignored. The engine's key, if it wants one, comes from
    :data:`GENERATOR_API_KEY_ENV`, never from the command line (``ps`` shows that).
    """
    import os

    from eta_guard.pipeline import ETA

    placement = placement or {}
    _check_engine_options(preset, placement, paths["vlm"])
    return ETA.from_openai_compatible(
        generator[0],
        generator[1],
        api_key=os.environ.get(GENERATOR_API_KEY_ENV) or None,
        clip=paths["clip"],
        reward_model=paths["reward_model"],
        config=cfg,
        tokenizer=paths["vlm"],
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        clip_kwargs=placement.get("clip_kwargs"),
        reward_model_kwargs=placement.get("reward_model_kwargs"),
    )


def _check_engine_options(
    preset: str | None, placement: dict[str, dict[str, Any]], tokenizer: str | None
) -> None:
    """Refuse options for a local VLM when the VLM runs on an engine (never ignore them), and a
    missing tokenizer (the VLM argument)."""
    refused = [f"--vlm-{k}" for k in placement.get("vlm_kwargs", {})]
    if preset is not None:
        refused.append("--preset")  # it sets the VLM's dtype and prompt format
    if refused:
        raise InvalidInputError(
            f"{', '.join(refused)}: with --generator-url the VLM runs on the engine, so options "
            "for a local VLM cannot apply; configure the engine (and CLIP / the RM with "
            "--clip-dtype, --reward-model-device...), or drop --generator-url"
        )
    if tokenizer is None:
        # Without the served model's tokenizer, control markers in message text (e.g.
        # "<|im_end|>") would reach the engine as control tokens: refuse rather than serve so.
        raise InvalidInputError(
            "--generator-url needs the VLM argument: the served model's id or local path, whose "
            "tokenizer keeps chat-template markers in message text from acting as control "
            "tokens and ends sentences on the same token as a local run"
        )


def _print_estimate(
    err: Console, paths: dict[str, str | None], load_args: dict[str, Any], cfg: ETAConfig
) -> str | None:
    """Print the memory estimate on stderr before any weight loads; return why it could not be
    made (it never blocks loading)."""
    from eta_guard.memory import estimate_memory

    try:
        estimate = estimate_memory(
            paths["vlm"],
            paths["clip"],
            paths["reward_model"],
            num_candidates=cfg.num_candidates,
            **load_args,
        )
    except ETAError as e:
        return str(e)
    err.print(_estimate_table(estimate))
    return None


def _estimate_table(estimate: Any) -> Any:
    from rich.markup import escape
    from rich.table import Table

    from eta_guard.memory import format_bytes

    table = Table(title="memory estimate (before loading; weights + VLM KV cache)")
    table.add_column("model (checkpoint)", overflow="fold", min_width=14)
    for column in ("parameters", "precision", "weights", "KV cache", "device"):
        table.add_column(column, no_wrap=column != "precision")
    for m in estimate.models:
        table.add_row(
            f"{m.role}\n[dim]{escape(m.name)}[/]",
            f"{m.parameters:,}",
            m.precision,
            format_bytes(m.weight_bytes),
            format_bytes(m.kv_cache_bytes) if m.kv_cache_bytes else "-",
            m.device or "default",
        )
    per_device = ", ".join(f"{d}: {format_bytes(b)}" for d, b in estimate.per_device().items())
    table.caption = (
        f"total {format_bytes(estimate.total_bytes)} ({per_device}); not included: activations, "
        "CUDA context (~0.5 GiB per device), fragmentation"
    )
    return table


def _generator(url: str | None, model: str | None) -> tuple[str, str] | None:
    """``(url, served model)`` for ``--generator-url`` / ``--generator-model``, or None."""
    if url is None and model is None:
        return None
    if url is None or not model:
        raise InvalidInputError(
            "--generator-url and --generator-model go together: the engine's URL and the name "
            "it serves the VLM under"
        )
    return url, model


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict_table(verdict: SafetyVerdict, *, aligned: bool | None = None) -> Any:
    from rich.table import Table

    def flag(value: bool | None, side: str) -> str:
        if side in verdict.errors:
            return f"error: {verdict.errors[side]}"
        if value is None:
            return f"skipped: {verdict.skipped.get(side, 'not evaluated')}"
        return "UNSAFE" if value else "safe"

    table = Table(title="ETA verdict", title_justify="left")
    table.add_column("check")
    table.add_column("score", justify="right")
    table.add_column("rule")
    table.add_column("result")
    table.add_row(
        "image (CLIP)",
        _fmt(verdict.pre_score),
        f"unsafe iff >= {verdict.pre_threshold:g}",
        flag(verdict.input_unsafe, "pre"),
    )
    table.add_row(
        "response (RM)",
        _fmt(verdict.post_score),
        f"unsafe iff <= {verdict.post_threshold:g}",
        flag(verdict.output_unsafe, "post"),
    )
    decision = "UNSAFE" if verdict.unsafe else "safe"
    if aligned is not None:
        decision += " -> aligned answer" if aligned else " -> answer returned as decoded"
    table.add_row("decision", "", "AND of the checks that ran", decision)
    return table


def _trace_table(trace: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title="best-of-N search (* = kept)", title_justify="left")
    for name in ("sentence", "candidate", "reward", "clip", "score", "text"):
        table.add_column(name, justify="left" if name == "text" else "right")
    for step in trace:
        for i, cand in enumerate(step.candidates):
            mark = "*" if i == step.chosen else ""
            table.add_row(
                str(step.index),
                f"{i}{mark}",
                _fmt(cand.reward),
                _fmt(cand.clip),
                _fmt(cand.score),
                repr(cand.text),
            )
    return table


def _bench_table(report: Any) -> Any:
    from rich.table import Table

    setup = report.setup
    params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in setup["parameters"].items())
    table = Table(
        title=(
            f"eta-guard bench: {setup['size']} checkpoints ({params}); {setup['device']} "
            f"({setup['cpu']}, {setup['cpu_count']} cores, torch threads "
            f"{setup['torch_threads']}); max {setup['max_new_tokens']} new tokens, "
            f"N={setup['num_candidates']}; medians of {setup['reps']}"
        ),
        title_justify="left",
    )
    for name in ("path (ETA arm vs baseline arm)", "ETA s", "base s", "tokens", "figure", "target"):
        table.add_column(name, justify="left" if name[0] in "pft" else "right")
    rows = {
        "safe": ("safe_path_ratio", f"{report.safe_path_ratio:.2f}x", "<= 1.10x"),
        "aligned": (
            "batched_speedup",
            f"{report.batched_speedup:.2f}x per token ({report.batched_speedup_raw:.2f}x raw)",
            ">= 3x",
        ),
        "unsafe": ("unsafe_path_ratio", f"{report.unsafe_path_ratio:.2f}x", "-"),
    }
    for comp in (report.safe, report.aligned, report.unsafe):
        name, value, target = rows[comp.name]
        table.add_row(
            f"{comp.name}: {comp.eta_label} vs {comp.baseline_label}",
            f"{comp.eta_s:.2f}",
            f"{comp.baseline_s:.2f}",
            f"{comp.eta_tokens:g} / {comp.baseline_tokens:g}",
            f"{name} = {value}",
            target,
        )
    best = ", ".join(f"{k} {v:.2f}x" for k, v in report.best_figures.items())
    notes = [
        *report.notes,
        f"From each arm's fastest repetition instead: {best}.",
        f"Safe-path answer identical to plain generate's: {report.same_tokens}.",
    ]
    table.caption = "\n".join(f"- {note}" for note in notes)
    table.caption_justify = "left"
    return table


# The bodies live in eta_guard/eval/cli.py (typer only at import: --help stays fast).
from eta_guard.eval.cli import calibrate_command, eval_command  # noqa: E402

app.command("eval")(eval_command)
app.command("calibrate")(calibrate_command)

# The server's command lives with the server (typer only at import, like eval's).
from eta_guard.server.cli import serve  # noqa: E402

app.command()(serve)


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    app()

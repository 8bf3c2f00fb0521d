"""The ``eta-guard serve`` command (registered in :mod:`eta_guard.cli`; the body lives here).

Imports stay light at module level (typer only), so ``eta-guard --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated

import typer

from eta_guard.cli_options import (
    CacheOpt,
    ClipDeviceOpt,
    ClipDtypeOpt,
    ClipOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    PresetOpt,
    RemoteCodeOpt,
    RewardOpt,
    RmDeviceOpt,
    RmDtypeOpt,
    SetOpt,
    TinyOpt,
    VlmDeviceOpt,
    VlmDtypeOpt,
)
from eta_guard.errors import InvalidInputError


def serve(
    vlm: Annotated[
        str | None,
        typer.Argument(
            metavar="[VLM]",
            help="VLM checkpoint (omit with --moderation-only; with --generator-url optional: "
            "only its tokenizer is loaded).",
        ),
    ] = None,
    clip: ClipOpt = None,
    reward_model: RewardOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            help="Bearer keys, one per line (also read: $ETA_GUARD_API_KEYS). Keys are never "
            "taken from the command line.",
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Allow serving without keys on a non-loopback host.")
    ] = False,
    moderation_only: Annotated[
        bool,
        typer.Option("--moderation-only", help="Serve /v1/moderations with CLIP and the RM only."),
    ] = False,
    served_model_name: Annotated[
        str, typer.Option("--served-model-name", help="Model id clients send.")
    ] = "eta-guard",
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Waiting requests.")] = 16,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, help="Per-request deadline, seconds.")
    ] = 300.0,
    max_request_bytes: Annotated[
        int, typer.Option("--max-request-bytes", min=1024, help="Largest request body.")
    ] = 20 * 1024 * 1024,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="Largest max_tokens a client may ask.")
    ] = None,
    public_metrics: Annotated[
        bool, typer.Option("--public-metrics", help="Serve /metrics without a key.")
    ] = False,
    tiny: TinyOpt = False,
    cache_dir: CacheOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    preset: PresetOpt = None,
    vlm_device: VlmDeviceOpt = None,
    clip_device: ClipDeviceOpt = None,
    reward_model_device: RmDeviceOpt = None,
    vlm_dtype: VlmDtypeOpt = None,
    clip_dtype: ClipDtypeOpt = None,
    reward_model_dtype: RmDtypeOpt = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    generator_url: Annotated[
        str | None,
        typer.Option(
            "--generator-url",
            help="Run the VLM on an OpenAI-compatible engine (vLLM) at this URL; CLIP and the "
            "RM load here (docs/scaling.md).",
        ),
    ] = None,
    generator_model: Annotated[
        str | None, typer.Option("--generator-model", help="The engine's served model name.")
    ] = None,
    max_concurrent_calls: Annotated[
        int | None,
        typer.Option(
            "--max-concurrent-calls",
            min=1,
            max=1024,
            help="Model calls in flight at once [default: 1; 8 with --generator-url, whose "
            "engine batches them]. A local VLM runs one call at a time: more is refused.",
        ),
    ] = None,
) -> None:
    """Serve ETA as an OpenAI-compatible API (chat/completions, moderations, models, health, metrics)."""
    from eta_guard.cli import (
        RANDOM_MODELS_LINE,
        _check_engine_options,
        _consoles,
        _engine_eta,
        _friendly_errors,
        _generator,
        _load_config,
        _model_paths,
        _placement,
        _print_estimate,
        _quiet_transformers,
    )

    _, err = _consoles()
    with _friendly_errors():
        try:
            import uvicorn

            from eta_guard.server.app import create_app
            from eta_guard.server.settings import ServerSettings, load_api_keys
        except ImportError as e:
            raise InvalidInputError(
                f"the server needs its extra: pip install 'eta-guard[server]' ({e.name} missing)"
            ) from e
        if moderation_only and vlm is not None:
            raise InvalidInputError("--moderation-only loads no VLM: drop the VLM argument")
        generator = _generator(generator_url, generator_model)
        if moderation_only and generator is not None:
            raise InvalidInputError("--moderation-only generates nothing: drop --generator-url")
        calls = _concurrent_calls(max_concurrent_calls, remote=generator is not None)
        keys = load_api_keys(api_key_file)
        if not keys and not no_auth and not _is_loopback(host):
            raise InvalidInputError(
                f"--host {host} is reachable from other machines: give --api-key-file (or "
                "$ETA_GUARD_API_KEYS), or pass --no-auth to serve without keys"
            )
        settings = ServerSettings(
            served_model_name=served_model_name,
            api_keys=keys,
            max_queue=max_queue,
            request_timeout_s=timeout,
            max_request_bytes=max_request_bytes,
            max_tokens_limit=max_tokens,
            public_metrics=public_metrics,
            max_concurrent_calls=calls,
        )
        cfg = _load_config(config, set_)
        paths = _model_paths(
            err,
            vlm,
            clip,
            reward_model,
            tiny,
            cache_dir,
            need_vlm=not moderation_only and generator is None,
        )
        if tiny:
            err.print(f"[yellow]{RANDOM_MODELS_LINE}[/]")

        evaluator_placement = _placement(
            clip_device=clip_device,
            reward_model_device=reward_model_device,
            clip_dtype=clip_dtype,
            reward_model_dtype=reward_model_dtype,
        )
        load_args = {
            "device": device,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "preset": preset,
            **evaluator_placement,
        }

        def load():  # runs in the background: /health says 503 until it returns
            _quiet_transformers()
            if moderation_only:
                from eta_guard.evaluators.eta_evaluator import ETAEvaluator

                evaluator = ETAEvaluator.from_pretrained(
                    clip=paths["clip"], reward_model=paths["reward_model"], config=cfg, **load_args
                )
                return None, evaluator
            if generator is not None:
                eta = _engine_eta(
                    generator,
                    paths,
                    cfg,
                    device=device,
                    dtype=dtype,
                    trust_remote_code=trust_remote_code,
                    preset=preset,
                    placement=evaluator_placement,
                )
                return eta, eta.evaluator
            from eta_guard.pipeline import ETA

            assert paths["vlm"] is not None  # _model_paths refused a missing VLM
            eta = ETA.from_pretrained(
                paths["vlm"],
                clip=paths["clip"],
                reward_model=paths["reward_model"],
                config=cfg,
                **load_args,
                **vlm_placement,
            )
            return eta, eta.evaluator

        vlm_placement = _placement(vlm_device=vlm_device, vlm_dtype=vlm_dtype)
        if generator is not None:  # refuse local-VLM options now, not in the background load
            _check_engine_options(preset, vlm_placement, paths["vlm"])
        if not moderation_only:  # the memory the local models will take, before any loads
            local = {**paths, "vlm": None} if generator is not None else paths
            missing = _print_estimate(err, local, {**load_args, **vlm_placement}, cfg)
            if missing:
                err.print(f"[dim]memory estimate unavailable: {missing}[/]", highlight=False)
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
        app = create_app(loader=load, settings=settings, moderation_only=moderation_only)
        if not keys:
            err.print("[yellow]no API keys: every local client is accepted[/]")
        err.print(
            f"serving on http://{host}:{port}/v1 (GET /health says when the models are ready)"
        )
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def _concurrent_calls(asked: int | None, *, remote: bool) -> int:
    """``--max-concurrent-calls``: 1 for a local VLM (it holds per-call state, so more would
    only queue inside ETA), 8 by default for an engine, which batches the calls in flight."""
    if asked is None:
        return 8 if remote else 1
    if asked > 1 and not remote:
        raise InvalidInputError(
            f"--max-concurrent-calls {asked}: a local VLM runs one call at a time; use 1, or "
            "serve the VLM on an engine with --generator-url"
        )
    return asked


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

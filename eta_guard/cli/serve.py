"""``eta-guard serve``: ETA as an OpenAI-compatible API (the server itself is eta_guard.server)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated

import typer

from eta_guard.cli.console import consoles, friendly_errors
from eta_guard.cli.inputs import load_config
from eta_guard.cli.models import ModelLoader, note_random
from eta_guard.cli.options import ConfigOpt, ModelOptions, SetOpt, model_options
from eta_guard.errors import InvalidInputError

#: ``--max-concurrent-calls`` defaults (see :func:`_concurrent_calls`).
LOCAL_CONCURRENT_CALLS = 4
REMOTE_CONCURRENT_CALLS = 8


@model_options(positional_vlm=True, guards="all")
def serve(
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
    config: ConfigOpt = None,
    set_: SetOpt = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    max_concurrent_calls: Annotated[
        int | None,
        typer.Option(
            "--max-concurrent-calls",
            min=1,
            max=1024,
            help="Requests the model works on at once [default: 4 for a local VLM, whose "
            "decoding steps they share; 8 with --generator-url, whose engine batches them]. "
            "More wait in the queue (--max-queue).",
        ),
    ] = None,
    *,
    models: ModelOptions,
) -> None:
    """Serve ETA as an OpenAI-compatible API (chat/completions, moderations, models, health,
    metrics). The VLM: --vlm ID (or the first argument); none with --moderation-only."""
    _, err = consoles()
    with friendly_errors():
        try:
            import uvicorn

            from eta_guard.server.app import create_app
            from eta_guard.server.settings import ServerSettings, load_api_keys
        except ImportError as e:
            raise InvalidInputError(
                f"the server needs its extra: pip install 'eta-guard[server]' ({e.name} missing)"
            ) from e
        if moderation_only and models.vlm is not None:
            raise InvalidInputError("--moderation-only loads no VLM: drop the VLM argument")
        if moderation_only and models.generator_url is not None:
            raise InvalidInputError("--moderation-only generates nothing: drop --generator-url")
        remote = models.generator_url is not None
        calls = _concurrent_calls(max_concurrent_calls, remote=remote)
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
        cfg = load_config(config, set_)
        # Checked now, loaded in the background: /health says 503 until load() returns.
        loader = ModelLoader(err, models, cfg, vlm=not moderation_only)
        note_random(err, models)

        def load():
            if moderation_only:
                return None, loader.evaluator()
            eta = loader.eta()
            return eta, eta.evaluator

        if not moderation_only:  # the memory the local models will take, before any loads
            missing = loader.estimate()
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
    """``--max-concurrent-calls``, or its default: 8 for an engine (it batches what is in
    flight), 4 for a local VLM. Locally each call in flight keeps its prompt's KV cache between
    stages (the search starts from it), so the default stays small; the decoding batch itself
    is bounded by the local backend's memory budget."""
    if asked is None:
        return REMOTE_CONCURRENT_CALLS if remote else LOCAL_CONCURRENT_CALLS
    return asked


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

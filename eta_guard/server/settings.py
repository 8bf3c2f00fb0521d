"""``ServerSettings``: the server's own limits and switches, and API-key loading."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from eta_guard.errors import InvalidInputError

#: Environment variable read for API keys (comma- or whitespace-separated).
API_KEYS_ENV = "ETA_GUARD_API_KEYS"
#: Shortest key accepted: a short key can be guessed over the network.
MIN_KEY_LENGTH = 16
_MAX_KEY_FILE_BYTES = 1 << 20


class ServerSettings(BaseModel):
    """Everything the HTTP layer decides; ETA's own knobs stay in ``ETAConfig``.

    The defaults are safe for a server facing untrusted clients.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    served_model_name: str = Field(
        "eta-guard", min_length=1, max_length=256, description="The id in /v1/models."
    )
    api_keys: frozenset[str] = Field(
        frozenset(), description="Accepted bearer keys; empty: no authentication."
    )
    max_request_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    max_queue: int = Field(
        16, ge=0, description="Requests waiting for the model; more get 429 (Retry-After)."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Per-request deadline (queue wait included); then 504."
    )
    keepalive_s: float = Field(
        10.0, gt=0, description="SSE comment sent after this many silent seconds in a stream."
    )
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest max_tokens a request may ask (None: ETAConfig's)."
    )
    max_concurrent_calls: int = Field(
        1,
        ge=1,
        le=1024,
        description="Requests ETA works on at once (more wait in the queue). An engine (vLLM) "
        "batches them; a local VLM shares its decoding steps among them (the model's own lock "
        "keeps each forward correct). `eta-guard serve` defaults to 4 locally, 8 on an engine.",
    )
    max_concurrent_requests: int = Field(
        64,
        ge=1,
        description="POST requests handled at once (queued or running) and, separately, "
        "bodies being read; more get 429, so memory for bodies stays under twice this times "
        "max_request_bytes.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Time a client has to send its whole request body; then 408. Bodies are "
        "read after authentication and before the request takes an in-flight slot.",
    )
    allowed_hosts: frozenset[str] = Field(
        frozenset(),
        description="Host header names accepted besides localhost / 127.0.0.1 / [::1] when the "
        "server has no keys and a connection arrives on a loopback address (other Hosts get "
        "421: a web page cannot reach the server through DNS rebinding). Name a reverse "
        "proxy's public host here, or set keys.",
    )
    max_moderation_inputs: int = Field(32, ge=1, description="Inputs per /v1/moderations call.")
    moderation_score_scale: float = Field(
        0.02,
        gt=0,
        description="Width of the logistic that maps a score's margin to its threshold onto "
        "category_scores (0.5 at the threshold).",
    )
    public_metrics: bool = Field(False, description="Serve /metrics without a key.")
    tool_parser: Literal["hermes", "llama3_json", "pythonic"] | None = Field(
        None,
        description="How tool calls are read from the model's answers ('hermes', 'llama3_json', "
        "'pythonic'); default: the VLM family's, or the remote backend's.",
    )

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            errors = "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
            )
            raise InvalidInputError(f"invalid ServerSettings: {errors}") from e


def load_api_keys(path: str | Path | None = None, *, env: str = API_KEYS_ENV) -> frozenset[str]:
    """Keys from a file (one per line, ``#`` comments) and/or the environment variable ``env``.

    Keys are never taken from the command line, where other users of the machine could read them
    (``ps``). Every key must be at least :data:`MIN_KEY_LENGTH` characters.

    Raises:
        InvalidInputError: unreadable file, or a key that is too short or has spaces.
    """
    keys: list[str] = []
    if path is not None:
        keys += _read_key_file(Path(path))
    keys += os.environ.get(env, "").replace(",", " ").split()
    for i, key in enumerate(keys):
        if len(key) < MIN_KEY_LENGTH:
            raise InvalidInputError(
                f"API key #{i + 1} has {len(key)} characters; use at least {MIN_KEY_LENGTH} "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
    return frozenset(keys)


def _read_key_file(path: Path) -> list[str]:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_KEY_FILE_BYTES:
            raise InvalidInputError("the API key file must be a regular file under 1 MiB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"cannot read the API key file: {type(e).__name__}") from e
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    keys = [line for line in lines if line]
    if any(" " in k or "\t" in k for k in keys):
        raise InvalidInputError("the API key file must hold one key per line, without spaces")
    if not keys:
        raise InvalidInputError("the API key file holds no key")
    return keys

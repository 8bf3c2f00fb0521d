"""Bearer-key authentication (``Authorization: Bearer <key>``), compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from eta_guard.server.errors import APIError


def check_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries one of the server's keys."""
    keys = request.app.state.eta.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    token_bytes = token.strip().encode()
    # Compare with every key (no early exit), so timing says nothing about which one is near.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token_bytes, key.encode())
    if not matched:
        raise _unauthorized("incorrect API key")


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )

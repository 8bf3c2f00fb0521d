"""Bearer-key authentication (``Authorization: Bearer <key>``), compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Collection

from fastapi import Request

from eta_guard.server.errors import APIError


def check_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries one of the server's keys."""
    error = key_error(
        request.headers.get("authorization", ""), request.app.state.eta.settings.api_keys
    )
    if error is not None:
        raise error


def key_error(authorization: str, keys: Collection[str]) -> APIError | None:
    """The 401 for an ``Authorization`` header value, or None when it holds a key (or no keys
    are configured). Used by the route dependency and, before any body is read, the middleware."""
    if not keys:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    token_bytes = token.strip().encode()
    # Compare with every key (no early exit), so timing says nothing about which one is near.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token_bytes, key.encode())
    if not matched:
        return _unauthorized("incorrect API key")
    return None


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )

"""OpenAI-shaped error bodies for every status, and the mapping from engine errors.

Body: ``{"error": {"message", "type", "param", "code"}}`` as the official clients parse it.
Messages never carry internals: unexpected exceptions become a generic 500 whose details go to
the server log only, under a request id the client also receives.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eta_guard.errors import ETAError, EvaluatorError, InvalidInputError

log = logging.getLogger("eta_guard.server")

_MAX_MESSAGE = 500


class APIError(Exception):
    """An error the server answers with ``status`` and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers or {}

    def body(self) -> dict[str, Any]:
        message = self.message
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        return {
            "error": {"message": message, "type": self.type, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def queue_full(retry_after_s: int = 1) -> APIError:
    return APIError(
        429,
        "the server is busy: its request queue is full; retry later",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def not_ready(*, failed: bool = False) -> APIError:
    if failed:  # no Retry-After: retrying will not help until an operator fixes the load
        return APIError(
            503,
            "the models failed to load; see the server log",
            type="server_error",
            code="load_failed",
        )
    return APIError(
        503,
        "the models are still loading; retry later",
        type="server_error",
        code="not_ready",
        headers={"Retry-After": "5"},
    )


def deadline_exceeded(seconds: float) -> APIError:
    return APIError(
        504,
        f"the request did not finish within the server's deadline of {seconds:g} s",
        type="timeout_error",
        code="deadline_exceeded",
    )


def internal_error(request_id: str) -> APIError:
    return APIError(
        500,
        f"internal server error (request id {request_id}); the details are in the server log",
        type="server_error",
        code="internal_error",
    )


def from_exception(error: BaseException, request_id: str) -> APIError:
    """Map an exception raised while serving to the error the client sees."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidInputError):
        # Engine messages name the setting and the fix, and quote inputs only briefly.
        return bad_request(str(error))
    if isinstance(error, EvaluatorError):
        log.error("request %s: a safety check failed", request_id, exc_info=error)
        return APIError(
            500,
            f"a safety check could not run, so no answer is given (request id {request_id})",
            type="server_error",
            code="safety_check_failed",
        )
    log.error("request %s: unexpected error", request_id, exc_info=error)
    return internal_error(request_id)


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


def install_handlers(app: FastAPI) -> None:
    """Every error path of ``app`` answers with an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    # Engine errors get their own handler: Starlette's catch-all ``Exception`` handler answers
    # and then re-raises (the connection is dropped), which is only right for real bugs.
    @app.exception_handler(ETAError)
    async def _engine_error(request: Request, error: ETAError) -> JSONResponse:
        return from_exception(error, request_id_of(request)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return APIError(
                404, f"no route {request.url.path!r}; see GET /v1/models", code="not_found"
            ).response()
        if error.status_code == 405:
            return APIError(
                405, f"method {request.method} is not allowed on {request.url.path!r}"
            ).response()
        return APIError(error.status_code, str(error.detail)[:200]).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return from_exception(error, request_id_of(request)).response()


def _validation_error(errors: Any) -> APIError:
    """A 400 naming each bad field and the rule it broke (never echoing the value at length)."""
    parts, first = [], None
    for err in list(errors)[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first = first or where
        if err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return bad_request("invalid request: " + "; ".join(parts), param=first)

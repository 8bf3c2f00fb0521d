"""``GET /v1/models``, ``GET /health`` and ``GET /metrics``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from eta_guard.server.auth import check_api_key

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models", dependencies=[Depends(check_api_key)])
async def models(request: Request) -> JSONResponse:
    """The one served model, in OpenAI's list shape."""
    name = request.app.state.eta.settings.served_model_name
    entry = {"id": name, "object": "model", "created": _STARTED, "owned_by": "eta-guard"}
    return JSONResponse({"object": "list", "data": [entry]})


@router.get("/v1/models/{model:path}", dependencies=[Depends(check_api_key)])
async def model(model: str, request: Request) -> JSONResponse:
    state = request.app.state.eta
    state.check_model(model)
    entry = {"id": model, "object": "model", "created": _STARTED, "owned_by": "eta-guard"}
    return JSONResponse(entry)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 once the models are loaded; 503 while loading or after a failed load (no key needed)."""
    state = request.app.state.eta
    mode = "moderation-only" if state.moderation_only else "guarded-generation"
    if state.ready:
        return JSONResponse({"status": "ok", "mode": mode})
    status = "failed" if state.load_failed else "loading"
    return JSONResponse({"status": status, "mode": mode}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format (needs the key unless ``public_metrics``)."""
    state = request.app.state.eta
    if not state.settings.public_metrics:
        check_api_key(request)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

"""``create_app``: the FastAPI app behind ``eta-guard serve``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from eta_guard.errors import InvalidInputError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from eta_guard.evaluators.eta_evaluator import ETAEvaluator
    from eta_guard.pipeline import ETA
    from eta_guard.server.settings import ServerSettings
    from eta_guard.server.state import Loader


def create_app(
    eta: ETA | None = None,
    *,
    evaluator: ETAEvaluator | None = None,
    loader: Loader | None = None,
    settings: ServerSettings | None = None,
    moderation_only: bool = False,
) -> FastAPI:
    """Build the OpenAI-compatible app around loaded models, or around a ``loader``.

    Args:
        eta: A loaded :class:`~eta_guard.ETA` (serves every endpoint; its evaluator moderates).
        evaluator: A loaded :class:`~eta_guard.ETAEvaluator` for moderation-only mode.
        loader: Called once in a background thread at startup, returns ``(eta, evaluator)``;
            ``/health`` answers 503 until it has finished. Use instead of ``eta``/``evaluator``.
        settings: Server limits and keys (:class:`ServerSettings`; defaults are safe).
        moderation_only: Serve ``/v1/moderations`` (and models, health, metrics) only.

    Example (random tiny checkpoints: mechanics, not safety):
        >>> from eta_guard import ETA
        >>> from eta_guard.server import create_app
        >>> from eta_guard.testing import build_tiny_checkpoints
        >>> ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
        >>> app = create_app(ETA.from_pretrained(ckpt.vlm, clip=ckpt.clip,
        ...                                      reward_model=ckpt.reward_model))
    """
    try:
        from fastapi import FastAPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the server needs FastAPI and uvicorn: pip install 'eta-guard[server]'"
        ) from e
    from eta_guard.server import routes_chat, routes_completions, routes_info, routes_moderations
    from eta_guard.server.errors import install_handlers
    from eta_guard.server.middleware import RequestGuard
    from eta_guard.server.settings import ServerSettings
    from eta_guard.server.state import ServerState

    given = sum(x is not None for x in (eta, evaluator, loader))
    if given != 1:
        raise InvalidInputError(
            "create_app needs exactly one of eta=..., evaluator=... (moderation-only) or loader=..."
        )
    if eta is not None and moderation_only:
        raise InvalidInputError("moderation_only=True takes evaluator=..., not eta=...")
    if evaluator is not None:
        moderation_only = True
    state = ServerState(settings or ServerSettings(), moderation_only=moderation_only)
    if eta is not None:
        state.set_models(eta, eta.evaluator)
    elif evaluator is not None:
        state.set_models(None, evaluator)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is not None:
            state.load_in_background(loader)
        yield
        if state.eta is not None:  # the engine clients of this loop (requests ran on it)
            await state.eta.aclose()

    app = FastAPI(
        title="eta-guard",
        summary="OpenAI-compatible guarded VLM server (ETA, ICLR 2025)",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.eta = state
    install_handlers(app)
    # Registered in moderation-only mode too: they answer 404 "moderation-only" (not "no route").
    app.include_router(routes_chat.router)
    app.include_router(routes_completions.router)
    app.include_router(routes_moderations.router)
    app.include_router(routes_info.router)
    app.add_middleware(RequestGuard, state=state)
    return app

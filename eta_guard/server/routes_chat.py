"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from eta_guard.server.auth import check_api_key
from eta_guard.server.generation import generate
from eta_guard.server.inputs import chat_messages
from eta_guard.server.schemas import ChatCompletionRequest

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Answer a conversation (text and image_url parts) with ETA; SSE when ``stream``."""
    state = request.app.state.eta
    state.require_eta()
    messages = chat_messages(body.messages, allow_remote=state.config().allow_remote_images)
    return await generate(request, state, body, messages, kind="chat", route="chat")

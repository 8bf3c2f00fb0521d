"""``POST /v1/completions``: for clients that default to it (LlamaIndex ``OpenAILike``).

The prompt is answered as one user turn of the VLM's chat template (never as raw text to
continue), so ETA's checks and the model's chat format apply as for chat completions.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from eta_guard.server.auth import check_api_key
from eta_guard.server.errors import bad_request
from eta_guard.server.generation import generate
from eta_guard.server.schemas import CompletionRequest

router = APIRouter()


@router.post("/v1/completions", dependencies=[Depends(check_api_key)])
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Answer one text prompt with ETA (text-only: ETA's text_only_policy applies)."""
    state = request.app.state.eta
    state.require_eta()
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("prompt: send one prompt per request", param="prompt")
        prompt = prompt[0]
    messages = [{"role": "user", "content": prompt}]
    return await generate(request, state, body, messages, kind="text", route="completions")

"""``POST /v1/chat/completions``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from eta_guard.errors import InvalidInputError
from eta_guard.server.auth import check_api_key
from eta_guard.server.errors import bad_request
from eta_guard.server.generation import generate
from eta_guard.server.inputs import chat_messages
from eta_guard.server.schemas import ChatCompletionRequest
from eta_guard.server.state import ServerState
from eta_guard.tools import check_response_format, check_tool_choice, check_tools
from eta_guard.tools.answers import tool_parser_of

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Answer a conversation (text and image_url parts, tools) with ETA; SSE when ``stream``."""
    state = request.app.state.eta
    state.require_eta()
    messages = chat_messages(body.messages, allow_remote=state.config().allow_remote_images)
    fields = _checked(body.tool_fields())
    parser = _tool_parser(state, fields)
    engine_input: Any = {"messages": messages, **fields} if fields else messages
    return await generate(
        request, state, body, engine_input, kind="chat", route="chat", tool_parser=parser
    )


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    """The tool fields validated (a 400 naming the field), as the client sent them."""
    tools: list[dict[str, Any]] = []
    for name in ("tools", "tool_choice", "response_format"):
        if name not in fields:
            continue
        try:
            if name == "tools":
                tools = check_tools(fields[name])
            elif name == "tool_choice" and tools:
                check_tool_choice(fields[name], tools)
            elif name == "response_format":
                check_response_format(fields[name])
        except InvalidInputError as e:
            raise bad_request(str(e), param=name) from e
    return fields


def _tool_parser(state: ServerState, fields: dict[str, Any]) -> str | None:
    """The parser that reads this request's calls (None when no tool is offered).

    Raises:
        APIError: ``tool_choice`` without tools (400, as OpenAI answers it).
        APIError: the model has no known tool-call format (400).
    """
    choice = fields.get("tool_choice")
    if not fields.get("tools"):
        if choice not in (None, "none", "auto"):
            raise bad_request(
                "tool_choice is only allowed when tools are given", param="tool_choice"
            )
        return None
    if choice == "none":
        return None
    try:
        return tool_parser_of(state.require_eta(), state.settings.tool_parser)
    except InvalidInputError as e:
        raise bad_request(f"tools: {e}", param="tools") from e

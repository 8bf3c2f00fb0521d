"""The conversation a Llama Guard classifies, built from an ETA request (torch-free).

Shared by the local guard (:mod:`eta_guard.evaluators.llama_guard`) and the served one
(:mod:`eta_guard.backends.remote_guard`): system text is left out (Llama Guard's template has no
system role), other roles count as the user's, consecutive turns of one role merge (the template
requires user/assistant alternation), the answer is the last (``Agent``) turn in response mode,
and the image parts go first in the first user turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.base import GuardRequest

GuardMode = Literal["prompt", "response"]


def llama_guard_turns(
    request: GuardRequest,
    mode: GuardMode,
    *,
    clean: Callable[[str], str],
    image_parts: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Alternating user/assistant turns; every text passed through ``clean`` (marker breaking)."""
    turns: list[dict[str, Any]] = []
    for message in request.messages:
        role = message.get("role")
        if role == "system":
            continue
        role = "assistant" if role == "assistant" else "user"
        texts = [
            {"type": "text", "text": clean(str(part.get("text", "")))}
            for part in message.get("content", [])
            if isinstance(part, dict) and part.get("type") == "text"
        ]
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(texts)
        else:
            turns.append({"role": role, "content": texts})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": []})
    if mode == "response":
        if request.response is None:
            raise InvalidInputError("a response-mode guard needs the response to judge")
        if turns[-1]["role"] == "assistant":
            turns.append({"role": "user", "content": []})
        turns.append(
            {"role": "assistant", "content": [{"type": "text", "text": clean(request.response)}]}
        )
    elif turns[-1]["role"] != "user":
        turns.append({"role": "user", "content": []})
    turns[0]["content"][:0] = list(image_parts)
    return turns

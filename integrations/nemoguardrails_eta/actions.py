"""NeMo Guardrails actions that run ETA's evaluators (no safety logic here: ETA decides).

- ``eta_check_input_images``: CLIP on the user message's images; blocks when ETA flags them.
- ``eta_check_output``: ETA's rule on the bot answer (the RM, and CLIP on the user's images when
  there are any: unsafe only when both sides are); blocks when the verdict is unsafe.

Each returns a NeMo ``RailOutcome`` whose ``metadata["eta_verdict"]`` is the verdict as JSON
(scores, thresholds, flags, what was skipped and why). The evaluator is an action parameter
(``rails.register_action_param("eta_evaluator", evaluator)``, done by :func:`register`).
Images come from the user message's OpenAI-style ``image_url`` parts; the user sent them, so
local paths and ``file:`` URLs are refused, as in the other adapters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from nemoguardrails.actions import action
from nemoguardrails.actions.rail_outcome import RailOutcome

from eta_guard.errors import InvalidInputError
from eta_guard.scored_images import load_request_images

#: Name of the action parameter holding the :class:`~eta_guard.ETAEvaluator`.
EVALUATOR_PARAM = "eta_evaluator"


def register(rails: Any, evaluator: Any) -> Any:
    """Add ETA's actions and ``evaluator`` (an ``ETAEvaluator``) to ``rails``; returns ``rails``."""
    rails.register_action(check_input_images, name="eta_check_input_images")
    rails.register_action(check_output, name="eta_check_output")
    rails.register_action_param(EVALUATOR_PARAM, evaluator)
    return rails


def image_sources(content: Any) -> list[str]:
    """The image URLs of a user message's content (a str has none).

    Raises:
        InvalidInputError: The content is neither a str nor a list of parts, or an
            ``image_url`` part has no string URL.
    """
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, list):
        raise InvalidInputError(
            f"user message content is {type(content).__name__}, expected str or a list of parts"
        )
    sources = []
    for index, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "image_url":
            continue
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
        if not isinstance(url, str):
            raise InvalidInputError(f"user message part {index}: image_url without a string url")
        sources.append(url)
    return sources


@action(name="eta_check_input_images", is_system_action=True)
async def check_input_images(
    context: dict[str, Any] | None = None, eta_evaluator: Any = None, **_: Any
) -> RailOutcome:
    """Input rail: block when ETA's CLIP check flags the user message's images."""
    evaluator = _evaluator(eta_evaluator)
    images = await _images(evaluator, (context or {}).get("user_message"))
    if not images:
        return RailOutcome.allow(
            reason="no image in the user message", metadata={"eta_verdict": None}
        )
    verdict = await evaluator.aevaluate_input(images)
    return _outcome(verdict, bool(verdict.input_unsafe), "ETA: image flagged as unsafe")


@action(name="eta_check_output", is_system_action=True)
async def check_output(
    context: dict[str, Any] | None = None, eta_evaluator: Any = None, **_: Any
) -> RailOutcome:
    """Output rail: block when ETA's verdict on the answer (and the user's images) is unsafe."""
    evaluator = _evaluator(eta_evaluator)
    context = context or {}
    answer = context.get("bot_message")
    if not isinstance(answer, str):
        raise InvalidInputError(f"bot_message is {type(answer).__name__}, expected str")
    images = await _images(evaluator, context.get("user_message"))
    verdict = await evaluator.aevaluate(images=images or None, response=answer)
    return _outcome(verdict, verdict.unsafe, "ETA: unsafe answer")


def _evaluator(value: Any) -> Any:
    if value is None:
        raise InvalidInputError(
            f"no ETA evaluator: call nemoguardrails_eta.register(rails, evaluator) "
            f"(it sets the {EVALUATOR_PARAM!r} action parameter)"
        )
    return value


async def _images(evaluator: Any, content: Any) -> list[Any]:
    sources = image_sources(content)
    if not sources:
        return []
    # Decoding is CPU work; the same decoder (and limits) as every other entry point.
    scored = await asyncio.to_thread(
        load_request_images, sources, evaluator.config, allow_local_files=False
    )
    return [s.image for s in scored]


def _outcome(verdict: Any, blocked: bool, reason: str) -> RailOutcome:
    metadata = {"eta_verdict": verdict.model_dump(mode="json")}
    if blocked:
        return RailOutcome.block(reason=reason, metadata=metadata)
    return RailOutcome.allow(metadata=metadata)

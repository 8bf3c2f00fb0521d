"""NeMo Guardrails integration of eta-guard: ETA's evaluators as rail actions.

``register(rails, evaluator)`` adds the actions to an ``LLMRails``; the flows in ``rails.co``
(``eta check input images``, ``eta check output``) call them. ``langchain_eta.ETAChatModel``
serves as the rails' main LLM (``LLMRails(config, llm=ETAChatModel(...))``). See
docs/nemo_guardrails.md.
"""

from __future__ import annotations

from pathlib import Path

from nemoguardrails_eta.actions import (
    EVALUATOR_PARAM,
    check_input_images,
    check_output,
    image_sources,
    register,
)

__all__ = [
    "EVALUATOR_PARAM",
    "check_input_images",
    "check_output",
    "colang",
    "image_sources",
    "register",
]


def colang() -> str:
    """The Colang 1.0 flows of ETA's rails (``RailsConfig.from_content(colang_content=...)``)."""
    return Path(__file__).with_name("rails.co").read_text(encoding="utf-8")

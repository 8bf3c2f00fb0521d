"""Refuse text that an inference engine would read as control tokens.

An OpenAI-compatible engine (vLLM) renders chat messages with the model's template and tokenizes
the result with special tokens *parsed*: a user message, or a model answer sent back to a remote
reward model, that holds ``<|im_end|>``, ``<|eot_id|>``, ``</s>`` or a literal image placeholder
becomes real turn markers or image slots there. The local path splits such markers into plain
text (:mod:`eta_guard.decoding.content_tokens`); over HTTP the text cannot be tokenized for the
engine, so a request holding one of the served tokenizer's control strings is refused instead.
Without the tokenizer the control strings are unknown and nothing is checked (docs/scaling.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)


def control_strings_of(tokenizer: Any, *, what: str = "the engine") -> tuple[str, ...]:
    """The strings ``tokenizer`` reads as one added or special token, longest first.

    Without a tokenizer: empty, and a warning that ``what`` gets such text unchecked.
    """
    if tokenizer is None:
        logger.warning(
            "%s has no tokenizer: text holding its control tokens (<|im_end|>, </s>, <image>...) "
            "cannot be refused and would be parsed as real markers there; pass the served "
            "model's tokenizer (docs/scaling.md)",
            what,
        )
        return ()
    from eta_guard.decoding.content_tokens import control_strings

    return tuple(control_strings(None, tokenizer))


def find_control_string(texts: Iterable[str], markers: tuple[str, ...]) -> str | None:
    """The first control string found in any of ``texts``, or None."""
    if not markers:
        return None
    for text in texts:
        for marker in markers:
            if marker in text:
                return marker
    return None


def message_texts(messages: Iterable[dict[str, Any]]) -> Iterable[str]:
    """Every text of OpenAI-style chat messages (str content or ``text`` parts)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    yield str(part.get("text", ""))

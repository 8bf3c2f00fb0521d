"""Keep text from acting as control tokens on an inference engine.

An OpenAI-compatible engine (vLLM) renders chat messages with the model's template and tokenizes
the result with special tokens *parsed*: a user message, or a model answer sent back to a remote
reward model, that holds ``<|im_end|>``, ``<|eot_id|>``, ``</s>`` or a literal image placeholder
becomes real turn markers or image slots there. The local path tokenizes such markers as plain
text (:mod:`eta_guard.decoding.content_tokens`); over HTTP the text cannot be tokenized for the
engine, so :func:`neutralize` breaks each of the served tokenizer's control strings with a
zero-width space before it is sent: the model reads it as text (one invisible character more), as
locally. The text ETA returns is never changed. Without the tokenizer the control strings are
unknown and nothing is done; a warning says so (docs/scaling.md).
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

#: Inserted after a control string's first character (markers holding it are left out).
_BREAK = "\u200b"


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

    # A one-character token cannot be broken (none of the known templates' markers is one).
    return tuple(m for m in control_strings(None, tokenizer) if len(m) > 1 and _BREAK not in m)


def neutralize(text: str, markers: tuple[str, ...]) -> str:
    """``text`` with every control string of ``markers`` broken by a zero-width space.

    Markers are handled longest first; the loop repeats until none is left (a break never
    creates a marker, so each round only removes occurrences).
    """
    while markers and any(m in text for m in markers):
        for marker in markers:  # longest first (control_strings_of's order)
            if marker in text:
                text = text.replace(marker, marker[0] + _BREAK + marker[1:])
    return text


#: Turn and media markers of the common chat formats, for a remote model whose tokenizer is not
#: at hand (an ``openai:MODEL@URL`` judge): Llama 2 / Mistral ``[INST]`` (plain text there, but
#: still the turn boundary the model reads), ``<<SYS>>``, SentencePiece ``<s>`` / ``</s>``, Gemma
#: turns, Llama 3 / ChatML / Qwen / Phi markers (every ``<|...|>``, matched by pattern), image
#: placeholders.
WELL_KNOWN_MARKERS = (
    "[/INST]",
    "[INST]",
    "<</SYS>>",
    "<<SYS>>",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image>",
    "<video>",
    "</s>",
    "<s>",
)
_PIPE_MARKER = re.compile(r"<\|[^\s<>|]{1,64}\|>")


def neutralize_known(text: str, extra: tuple[str, ...] = ()) -> str:
    """``text`` with the :data:`WELL_KNOWN_MARKERS`, every ``<|...|>`` marker and ``extra`` (a
    tokenizer's control strings) broken by a zero-width space."""
    text = _PIPE_MARKER.sub(lambda m: m.group()[0] + _BREAK + m.group()[1:], text)
    known = tuple(sorted({*WELL_KNOWN_MARKERS, *extra}, key=len, reverse=True))
    return neutralize(text, known)


def neutralize_messages(messages: list[dict[str, Any]], markers: tuple[str, ...]) -> None:
    """Neutralize every text of OpenAI-style chat ``messages`` in place (str content or parts)."""
    if not markers:
        return
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = neutralize(content, markers)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    part["text"] = neutralize(str(part.get("text", "")), markers)

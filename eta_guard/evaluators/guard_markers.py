"""Guard prompts keep message text as text: control strings are broken before rendering.

A guard model's prompt is its chat template filled with untrusted text (the question, the
answer). Every special / added token string of the guard's tokenizer found in that text
(``<|eot_id|>``, ``<|im_end|>``, ``<|image|>``...) is broken with a zero-width space after its
first character, so it can neither close a turn, forge a verdict nor add an image slot. Shared
by the local guards (Llama Guard vision and text, Qwen3Guard).
"""

from __future__ import annotations

from typing import Any

from eta_guard.errors import InvalidInputError

BREAK = "\u200b"


def control_strings(tokenizer: Any) -> tuple[str, ...]:
    """Every special / added token string of ``tokenizer`` longer than one character, longest first."""
    names = set(getattr(tokenizer, "all_special_tokens", []))
    names |= {str(t) for t in getattr(tokenizer, "get_added_vocab", dict)()}
    return tuple(sorted((n for n in names if len(n) > 1), key=len, reverse=True))


def break_markers(text: str, markers: tuple[str, ...]) -> str:
    """``text`` with each of ``markers`` broken by :data:`BREAK` (repeated until none is left)."""
    while any(m in text for m in markers):
        for marker in markers:
            text = text.replace(marker, marker[0] + BREAK + marker[1:])
    return text


def single_token(tokenizer: Any, word: str, *, what: str = "Llama Guard") -> int:
    """The id of ``word`` when the tokenizer has it as one token (else a typed error)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise InvalidInputError(
            f"the guard's tokenizer splits {word!r} into {len(ids)} tokens; {what}'s "
            "vocabulary has it as one (is this the right checkpoint?)"
        )
    return int(ids[0])

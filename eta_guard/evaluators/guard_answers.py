"""What guard models answer, read without torch: Llama Guard's MLCommons categories and verdicts.

Llama Guard 3 / 4 answer ``safe``, or ``unsafe`` and on the next line the violated categories
(``S1,S10``). The category lists are the models' own (their chat templates' defaults; sources in
docs/evaluators.md): Llama Guard 3 Vision has S1..S13, the text models and Llama Guard 4 add
S14 (Code Interpreter Abuse).
"""

from __future__ import annotations

import re

#: MLCommons hazard categories as Llama Guard 3 / 4 list them (S14 not in Llama Guard 3 Vision).
MLCOMMONS_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
    "S14": "Code Interpreter Abuse.",
}

_CODE = re.compile(r"S\d{1,2}")


def llama_guard_categories(answer: str, known: dict[str, str] | None = None) -> tuple[str, ...]:
    """The category codes an ``unsafe`` Llama Guard answer names (empty for ``safe``).

    Only codes of ``known`` (default: :data:`MLCOMMONS_CATEGORIES`) are kept, in the answer's
    order, without repeats: a model answer is untrusted text.
    """
    lines = answer.strip().splitlines()
    if not lines or lines[0].strip().lower() != "unsafe" or len(lines) < 2:
        return ()
    allowed = MLCOMMONS_CATEGORIES if known is None else known
    found = [c for c in _CODE.findall(lines[1]) if c in allowed]
    return tuple(dict.fromkeys(found))

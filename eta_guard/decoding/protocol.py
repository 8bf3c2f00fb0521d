"""The decoding contract between ETA's stages and whatever runs the VLM (torch-free).

A generator answers greedily (:class:`Completion`) and, for the sentence-level best-of-N search,
hands out a :class:`SearchHandle`: sample N continuations of the accepted context, commit one,
repeat. The local backend implements the handle over one branched KV cache; a remote engine
implements it with text (and the engine's prefix caching). The search loop itself
(:mod:`eta_guard.decoding.search`) is written once, against this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from eta_guard.config import SentenceEndRule

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    Attributes:
        text: the new text (special tokens skipped; a user stop string and what follows cut off;
            a sentence terminator kept), decoded in its context.
        num_tokens: tokens generated (EOS included when it ended on EOS).
        finish_reason: ``"stop"`` (EOS, a stop string, or a sentence end) or ``"length"`` (budget).
        ended: the continuation ended the answer (EOS), not just a sentence.
        prompt_tokens: tokens of the prompt it continued (assistant text included).
        token_ids: the generated ids, when the backend reports them.
        answer: for a search candidate, the whole answer after the search's assistant text with
            this candidate appended, decoded in context (None: the caller concatenates texts).
    """

    text: str
    num_tokens: int
    finish_reason: FinishReason
    ended: bool
    prompt_tokens: int
    token_ids: tuple[int, ...] | None = None
    answer: str | None = None


@dataclass(frozen=True)
class SamplingStep:
    """The settings of one best-of-N step (from ``ETAConfig``)."""

    n: int
    max_tokens: int
    top_k: int
    temperature: float
    terminators: tuple[str, ...]
    seed: int | None = None
    #: ``ETAConfig.sentence_end_rule``: a token ends a sentence when its text is exactly a
    #: terminator ("exact") or contains one ("contains").
    rule: SentenceEndRule = "exact"


@runtime_checkable
class SearchHandle(Protocol):
    """One best-of-N search's decoding state: the accepted context, branched per step.

    ``sample`` draws ``step.n`` continuations of the accepted context; ``commit(i)`` appends the
    i-th of the last sample to it. ``text`` is the accepted answer (after the assistant text the
    search started from); ``room`` the tokens left in the model's context, or None when unknown
    (the engine then clamps ``max_tokens`` and reports ``"length"``). ``aclose`` frees what the
    handle holds (caches, requests) and is safe to call at any time, also while ``sample`` runs.
    """

    @property
    def text(self) -> str: ...

    @property
    def room(self) -> int | None: ...

    async def sample(self, step: SamplingStep) -> list[Completion]: ...

    async def commit(self, index: int) -> None: ...

    async def aclose(self) -> None: ...

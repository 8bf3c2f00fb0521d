"""The generator backend interface: what ETA needs from whatever runs the VLM.

ETA asks a generator for three things, whatever runs it (transformers in this process, or an
inference engine behind an OpenAI-compatible API):

1. the greedy ("vanilla") answer, streamed as it is decoded;
2. a greedy continuation of a given assistant text (shallow alignment without the search);
3. one best-of-N step: N sampled continuations of a given assistant text, each ending at a
   sentence end, at EOS or after a token budget.

The decision rule, the search loop and the scoring live with the caller
(:mod:`eta_guard.decision`, :mod:`eta_guard.decoding.selection`), never in a backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from eta_guard.config import SentenceEndRule

if TYPE_CHECKING:
    from eta_guard.messages import Conversation

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    Attributes:
        text: the new text (special tokens skipped; a user stop string and what follows cut off;
            a sentence terminator kept).
        num_tokens: tokens generated (EOS included when it ended on EOS).
        finish_reason: ``"stop"`` (EOS, a stop string, or a sentence end) or ``"length"`` (budget).
        ended: the continuation ended the answer (EOS), not just a sentence.
        prompt_tokens: tokens of the prompt it continued (assistant text included).
        token_ids: the generated ids, when the backend reports them.
    """

    text: str
    num_tokens: int
    finish_reason: FinishReason
    ended: bool
    prompt_tokens: int
    token_ids: tuple[int, ...] | None = None


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
class GeneratorBackend(Protocol):
    """Where the VLM runs. Every method is async; a backend may serve many calls at once."""

    #: The model's name as reported in results.
    name: str

    def greedy(
        self,
        conversation: Conversation,
        *,
        assistant_text: str = "",
        max_tokens: int,
        stop: Sequence[str] | None = None,
    ) -> AsyncIterator[str | Completion]:
        """Greedy decoding: yields text deltas as they are decoded, then the :class:`Completion`.

        ``assistant_text`` non-empty: continue an assistant turn that starts with it.
        """
        ...

    async def sample(
        self, conversation: Conversation, *, assistant_text: str, step: SamplingStep
    ) -> list[Completion]:
        """One best-of-N step: ``step.n`` sampled continuations of ``assistant_text``."""
        ...

    async def aclose(self) -> None:
        """Release connections or threads held for the running event loop."""
        ...

"""ETA's deep alignment, the backend-agnostic pieces: the search's result and its scorers.

The search loop is :class:`~eta_guard.decoding.search.BestOfNSearch` (every backend); the local
model's handle and synchronous driver (``LocalSearch``, ``SentenceBestOfN``) are in
:mod:`eta_guard.backends.local_search`: the decoding layer imports no backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eta_guard.decoding.selection import score_candidates, use_clip_term
from eta_guard.decoding.vlm import FinishReason
from eta_guard.errors import InvalidInputError
from eta_guard.model_thread import model_thread
from eta_guard.verdict import SentenceTrace

__all__ = ["SearchOutput", "awaitable_scorer", "score_candidates", "use_clip_term"]

RewardFn = Callable[[list[str]], Sequence[float]]
ClipFn = Callable[[list[str]], Sequence[float]]


@dataclass
class SearchOutput:
    """The answer found by the search.

    Attributes:
        text: the answer after the assistant prefix, decoded in context.
        token_ids: the accepted tokens (EOS included when the answer ended on it; all of the
            last sentence's tokens when a stop string cut ``text``).
        trace: every sentence's candidates, scores and the chosen index.
        finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"`` (token budget or
            context full).
        decoded_tokens: tokens of all candidates, kept or not.
        timings: seconds spent in ``"decode"``, ``"reward"`` and ``"clip"``.
    """

    text: str
    token_ids: list[int]
    trace: list[SentenceTrace]
    finish_reason: FinishReason
    decoded_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def awaitable_scorer(
    fn: Callable[[list[str]], Sequence[float]], name: str, device: Any, *, one_by_one: bool = False
):
    """``fn`` as an awaitable scorer, checked for one score per input.

    It runs on ``device``'s model thread (:mod:`eta_guard.model_thread`): a scorer beside a local
    VLM is model work (a reward model, CLIP), which pays the second-thread penalty anywhere else.
    """
    worker = model_thread(device)

    def call(texts: list[str]) -> list[float]:
        if one_by_one:
            return [v for t in texts for v in _floats(fn([t]), 1, name)]
        return _floats(fn(texts), len(texts), name)

    async def score(texts: list[str]) -> list[float]:
        return await worker.acall(call, texts)

    return score


def _floats(values: Any, n: int, name: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != n:
        raise InvalidInputError(
            f"{name} returned {len(values)} scores for {n} inputs; return one per input"
        )
    return values

"""Best-of-N candidate selection, shared by every generator backend (torch-free).

One step of the sentence-level search samples N candidates somewhere (a local batch over a shared
KV cache, or one ``n=N`` request to an inference engine); what happens next is the same
everywhere: whether the CLIP term counts (:func:`use_clip_term`), the combined score
(:func:`score_candidates`) and the kept candidate with its trace (:func:`select_candidate`).
"""

from __future__ import annotations

from collections.abc import Sequence

from eta_guard.errors import InvalidInputError
from eta_guard.verdict import CandidateTrace, SentenceTrace


def use_clip_term(index: int, ended: Sequence[bool], has_clip: bool) -> bool:
    """Whether step ``index`` (1-based) adds the CLIP term: not the first sentence, an image, no candidate at EOS."""
    return has_clip and index > 1 and not any(ended)


def score_candidates(
    rewards: Sequence[float], clips: Sequence[float] | None, *, index: int, alpha: float
) -> list[float]:
    """Returns ``reward + (alpha / index) * clip`` per candidate, or the rewards when ``clips`` is None."""
    if clips is None:
        return [float(r) for r in rewards]
    return [float(r) + (alpha / index) * float(c) for r, c in zip(rewards, clips, strict=True)]


def select_candidate(
    *,
    index: int,
    sentences: Sequence[str],
    rewards: Sequence[float],
    clips: Sequence[float] | None,
    ended: Sequence[bool],
    num_tokens: Sequence[int],
    alpha: float,
) -> SentenceTrace:
    """Score one step's candidates and keep the best (the first of equal maxima).

    Args:
        index: 1-based sentence index ``i``.
        sentences: each candidate's new text.
        rewards: each candidate's reward (the whole answer so far, best-of-N instruction).
        clips: each candidate's CLIP cosine, or None when the term is left out.
        ended: whether each candidate ended the answer (EOS).
        num_tokens: tokens in each candidate.
        alpha: weight of the CLIP term.

    Returns:
        The step's trace; ``trace.chosen`` is the kept candidate.
    """
    n = len(sentences)
    for name, values in (("rewards", rewards), ("ended", ended), ("num_tokens", num_tokens)):
        if len(values) != n:
            raise InvalidInputError(f"{name} has {len(values)} entries for {n} candidates")
    if clips is not None and len(clips) != n:
        raise InvalidInputError(f"clips has {len(clips)} entries for {n} candidates")
    if n == 0:
        raise InvalidInputError("select_candidate needs at least one candidate")
    scores = score_candidates(rewards, clips, index=index, alpha=alpha)
    chosen = max(range(n), key=scores.__getitem__)
    return SentenceTrace(
        index=index,
        chosen=chosen,
        candidates=[
            CandidateTrace(
                text=sentences[r],
                reward=float(rewards[r]),
                clip=None if clips is None else float(clips[r]),
                score=scores[r],
                ended=bool(ended[r]),
                num_tokens=int(num_tokens[r]),
            )
            for r in range(n)
        ],
    )

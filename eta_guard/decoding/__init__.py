"""Decoding: the VLM adapter (chat template, greedy decoding, streaming) and ETA's best-of-N search.

Importing this package loads torch and transformers; ``import eta_guard`` does not.
"""

from __future__ import annotations

from eta_guard.decoding.best_of_n import SearchOutput, score_candidates, use_clip_term
from eta_guard.decoding.stopping import (
    SentenceEndCriteria,
    candidate_lengths,
    cut_at_stop,
    stop_holdback,
)
from eta_guard.decoding.vlm import (
    GreedyOutput,
    GreedyStream,
    PreparedPrompt,
    VLMAdapter,
    decode_continuation,
)

__all__ = [
    "GreedyOutput",
    "GreedyStream",
    "PreparedPrompt",
    "SearchOutput",
    "SentenceEndCriteria",
    "VLMAdapter",
    "candidate_lengths",
    "cut_at_stop",
    "decode_continuation",
    "score_candidates",
    "stop_holdback",
    "use_clip_term",
]

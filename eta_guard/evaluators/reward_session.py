"""Incremental reward scoring for best-of-N: the RM's KV cache of the shared part kept across steps.

Each search step scores ``prefix + accepted + candidate_i``. From scratch the RM re-encodes the
instruction and every accepted sentence at every step, so its cost grows with the square of the
answer. :class:`IncrementalRewardScorer` keeps, from call to call, the KV cache (batch 1) of the
longest common TOKEN prefix of the calls' rendered conversations, and runs only each row's tokens
beyond it (one batched, right-padded forward). Prefixes are compared on the full tokenizations,
so a sentence boundary that tokenizes differently once more text follows only shortens the reused
part (the cache is cropped there): it can never change a score.

ArmoRM's gate reads the hidden state at the start of the last assistant-header marker, which lies
in the fixed template part; the scorer keeps the backbone's last hidden state at every position
of the cached prefix where a marker can start, so the gate is exact wherever it falls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eta_guard.config import RewardNumerics
from eta_guard.evaluators.armorm import LlamaForRewardModelWithGating, last_attended
from eta_guard.evaluators.reward import (
    RewardPostEvaluator,
    reward_scalar,
    shared_prefix_length,
)


@dataclass
class SessionStats:
    """What the RM ran, summed over a session's calls (positions are tokens incl. padding)."""

    calls: int = 0
    #: Positions run through the RM (kept-prefix extensions + padded suffix rows).
    encoded_tokens: int = 0
    #: Positions a from-scratch scoring of the same calls would run (every row in full).
    scratch_tokens: int = 0
    #: Tokens of kept prefix dropped because a later call's rows diverged earlier.
    cropped_tokens: int = 0
    #: Calls scored from scratch (a row needed windows, or the model cannot share a prefix).
    fallbacks: int = 0


class IncrementalRewardScorer:
    """Scores answers under one instruction, reusing the RM's cache of what calls share.

    Args:
        rm: A local reward model.
        instruction: The safety instruction (user turn) of every conversation scored.

    Not thread-safe: one per search, used under the evaluator's lock. :meth:`close` frees the
    cache. Scores equal :meth:`RewardPostEvaluator.score` of the same answers up to float
    rounding (tested within 1e-5 in float32). Calls that need windows (an answer longer than
    ``max_length``), models whose head cannot pool from a suffix, and ``numerics="reference"``
    (each conversation alone, by definition) are scored from scratch.
    """

    def __init__(
        self, rm: RewardPostEvaluator, instruction: str, *, numerics: RewardNumerics = "fast"
    ) -> None:
        self.rm = rm
        self.instruction = instruction
        self.numerics = numerics
        self.stats = SessionStats()
        self._ids: list[int] = []  # the kept prefix's tokens
        self._cache: Any = None  # its DynamicCache at batch 1 (None when empty)
        # ArmoRM only: last hidden state at kept positions where a gating marker may start.
        self._gate_hidden: dict[int, torch.Tensor] = {}
        self._armorm = isinstance(rm.model, LlamaForRewardModelWithGating)
        pattern = getattr(rm.model, "gating_token_pattern", None) if self._armorm else None
        self._gate_first = pattern[0] if pattern else None

    def score(self, responses: Sequence[str]) -> list[float]:
        """Reward of each response (as :meth:`RewardPostEvaluator.score` with this instruction)."""
        texts = list(responses)
        if not texts:
            return []
        self.stats.calls += 1
        rows = [self.rm.encode(self.instruction, t) for t in texts]
        self.stats.scratch_tokens += sum(len(r) for r in rows)
        if (
            self.numerics != "fast"
            or not self.rm.prefix_sharing
            or any(len(r) > self.rm.max_length for r in rows)
        ):
            self.stats.fallbacks += 1
            self.stats.encoded_tokens += sum(len(r) for r in rows)
            return self.rm.score(texts, self.instruction, numerics=self.numerics)
        shared = shared_prefix_length(rows, self.rm.pad_token_id)
        with torch.inference_mode():
            self._keep(rows[0][:shared])
            output = self._score_suffixes(rows, shared)
        return reward_scalar(output, len(rows)).float().cpu().tolist()

    @property
    def kept_tokens(self) -> int:
        """Tokens the kept cache holds now (the last call's common prefix)."""
        return 0 if self._cache is None else int(self._cache.get_seq_length())

    def close(self) -> None:
        """Drop the kept cache (the session can still be used: it starts over)."""
        self._ids, self._cache, self._gate_hidden = [], None, {}

    # ------------------------------------------------------------------ internals
    def _keep(self, prefix: list[int]) -> None:
        """Make the kept cache hold exactly ``prefix``: crop to the common part, then extend."""
        common = 0
        limit = min(len(prefix), len(self._ids))
        while common < limit and prefix[common] == self._ids[common]:
            common += 1
        if common < len(self._ids):
            self.stats.cropped_tokens += len(self._ids) - common
            if common == 0:
                self.close()
            else:
                self._cache.crop(common - len(self._ids))  # negative: tokens to remove
                self._ids = self._ids[:common]
                self._gate_hidden = {p: h for p, h in self._gate_hidden.items() if p < common}
        new = prefix[common:]
        if not new:
            return
        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache()  # plain full-attention layers: croppable
        ids = torch.tensor([new], dtype=torch.long, device=self.rm.device)
        hidden = self._backbone(input_ids=ids, cache=self._cache, use_cache=True)[0]
        self.stats.encoded_tokens += len(new)
        if self._gate_first is not None:
            for i, token in enumerate(new):
                if token == self._gate_first:
                    self._gate_hidden[common + i] = hidden[0, i].clone()
        self._ids = list(prefix)

    def _branch(self, batch: int) -> Any:
        """A new cache holding the kept prefix repeated ``batch`` times (never the kept object)."""
        from transformers import DynamicCache

        if self._cache is None:
            return DynamicCache()
        layers = [
            (k.repeat_interleave(batch, 0), v.repeat_interleave(batch, 0))
            for k, v, _ in self._cache
        ]
        return DynamicCache(layers)

    def _score_suffixes(self, rows: list[list[int]], shared: int) -> Any:
        rm, batch = self.rm, len(rows)
        suffix_ids, suffix_mask = rm.pad_batch([r[shared:] for r in rows])
        self.stats.encoded_tokens += int(suffix_ids.numel())
        full_mask = torch.cat(
            [torch.ones((batch, shared), dtype=suffix_mask.dtype, device=rm.device), suffix_mask],
            dim=1,
        )
        cache = self._branch(batch)
        if not self._armorm:
            return rm.model(
                input_ids=suffix_ids, attention_mask=full_mask, cache=cache, use_cache=True
            )
        model: LlamaForRewardModelWithGating = rm.model
        attended = suffix_mask.bool()
        hidden = self._backbone(
            input_ids=suffix_ids.masked_fill(~attended, 0),
            attention_mask=full_mask,
            cache=cache,
            use_cache=True,
        )[0]
        index = torch.arange(batch, device=hidden.device)
        reward_hidden = hidden[index, last_attended(suffix_mask).to(hidden.device)]
        full_ids, mask = rm.pad_batch(rows)
        gates = model.gating_positions(full_ids, mask).tolist()
        gate_hidden = torch.stack(
            [
                hidden[row, gate - shared] if gate >= shared else self._gate_hidden[gate]
                for row, gate in enumerate(gates)
            ]
        )
        return model.head(reward_hidden, gate_hidden)

    @property
    def _backbone(self) -> Any:
        model = self.rm.model
        return getattr(model, model.base_model_prefix)

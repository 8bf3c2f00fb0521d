"""ETA's deep alignment, written once: the sentence-level best-of-N loop over a :class:`SearchHandle`.

Each step samples N candidates of the next sentence from the handle (a local batch over one
branched KV cache, or one ``n=N`` engine request), scores them
``reward(prefix + accepted + c) + (alpha / i) * clip(c)`` (:mod:`eta_guard.decoding.selection`:
the CLIP term left out for the first sentence, text-only requests and steps where a candidate
ends the answer), commits the best one and streams the text that became final. The handle
does the decoding, the scorers do the scoring.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from eta_guard.config import ETAConfig
from eta_guard.decoding.protocol import FinishReason, SamplingStep, SearchHandle
from eta_guard.decoding.selection import select_candidate, use_clip_term
from eta_guard.decoding.stopping import cut_at_stop, stop_holdback
from eta_guard.errors import InvalidInputError
from eta_guard.verdict import SentenceTrace

#: ``texts -> scores`` (one per text), awaited: the reward model, or CLIP against the images.
Scorer = Callable[[list[str]], Awaitable[Sequence[float]]]

#: Engines take seeds in torch.long's range and add the candidate's index; ETAConfig allows any
#: unsigned 64-bit seed. Step seeds wrap below 2**62.
_ENGINE_SEED_SPAN = 2**62


def step_seed(seed: int, index: int) -> int:
    """The seed of search step ``index``: ``seed + 1000 * index``, wrapped into engines' range."""
    return (seed + 1000 * index) % _ENGINE_SEED_SPAN


class BestOfNSearch:
    """One search: iterate :meth:`run` for the answer's settled text; figures are set when done.

    Args:
        handle: the decoding state, already positioned after the assistant prefix.
        config: ``num_candidates``, ``top_k``, ``temperature``, ``alpha``, ``max_sentence_tokens``,
            ``max_new_tokens``, ``sentence_terminators``, ``sentence_end_rule``, ``seed``.
        prefix: the assistant prefix the search continues (the reward model reads it).
        reward: scores whole answers (``prefix + accepted + candidate``).
        clip: scores candidate sentences against the images (None: text-only request).
        stop: strings that end the answer.

    Attributes (after :meth:`run`): ``text`` (the answer after the prefix, cut before a stop
    string), ``tokens`` (accepted tokens), ``decoded`` (tokens of every candidate),
    ``finish_reason``, ``trace`` (one :class:`SentenceTrace` per step) and ``timings``
    (``"reward"`` and ``"clip"`` seconds).
    """

    def __init__(
        self,
        handle: SearchHandle,
        config: ETAConfig,
        *,
        prefix: str,
        reward: Scorer,
        clip: Scorer | None = None,
        stop: Sequence[str] | None = None,
    ) -> None:
        self.handle, self.cfg, self.prefix = handle, config, prefix
        self.reward, self.clip = reward, clip
        self.stop = [s for s in (stop or []) if s]
        self.text = ""
        self.tokens = 0
        self.decoded = 0
        self.finish_reason: FinishReason = "length"
        self.trace: list[SentenceTrace] = []
        self.timings = {"reward": 0.0, "clip": 0.0}
        self._emitted = ""

    async def run(self) -> AsyncIterator[str]:
        """Yield the answer's text (after the prefix) as sentences are accepted."""
        cfg, handle = self.cfg, self.handle
        room = handle.room
        max_new = cfg.max_new_tokens if room is None else max(1, min(cfg.max_new_tokens, room))
        while self.tokens < max_new:
            budget = min(cfg.max_sentence_tokens, max_new - self.tokens)
            index = len(self.trace) + 1
            step = SamplingStep(
                n=cfg.num_candidates,
                max_tokens=budget,
                top_k=cfg.top_k,
                temperature=cfg.temperature,
                terminators=tuple(cfg.sentence_terminators),
                rule=cfg.sentence_end_rule,
                seed=None if cfg.seed is None else step_seed(cfg.seed, index),
            )
            candidates = await handle.sample(step)
            accepted = handle.text
            answers = [
                self.prefix + (c.answer if c.answer is not None else accepted + c.text)
                for c in candidates
            ]
            rewards = await self._score("reward", self.reward, answers)
            ended = [c.ended for c in candidates]
            clips = None
            if self.clip is not None and cfg.alpha > 0 and use_clip_term(index, ended, True):
                clips = await self._score("clip", self.clip, [c.text.strip() for c in candidates])
            trace = select_candidate(
                index=index,
                sentences=[c.text for c in candidates],
                rewards=rewards,
                clips=clips,
                ended=ended,
                num_tokens=[c.num_tokens for c in candidates],
                alpha=cfg.alpha,
            )
            self.trace.append(trace)
            self.decoded += sum(c.num_tokens for c in candidates)
            chosen = candidates[trace.chosen]
            await handle.commit(trace.chosen)
            self.tokens += chosen.num_tokens
            text, stopped = cut_at_stop(handle.text, self.stop)
            if chosen.ended or stopped or chosen.num_tokens == 0:
                self.finish_reason = "stop"
                break
            if chosen.finish_reason == "length" and chosen.num_tokens < budget:
                break  # the engine clamped the budget to the room left: the context is full
            delta = self._settle(text, final=False)
            if delta:
                yield delta
        self.text, _ = cut_at_stop(handle.text, self.stop)
        delta = self._settle(self.text, final=True)
        if delta:
            yield delta

    async def _score(self, key: str, scorer: Scorer, texts: list[str]) -> list[float]:
        start = time.perf_counter()
        try:
            values = [float(v) for v in await scorer(texts)]
        finally:
            self.timings[key] += time.perf_counter() - start
        if len(values) != len(texts):
            raise InvalidInputError(
                f"the {key} scorer returned {len(values)} scores for {len(texts)} inputs; "
                "return one per input"
            )
        return values

    def _settle(self, text: str, *, final: bool) -> str:
        """The newly settled text: a tail that may still start a stop string waits."""
        settled = text if final else text[: len(text) - stop_holdback(text, self.stop)]
        if len(settled) > len(self._emitted) and settled.startswith(self._emitted):
            delta, self._emitted = settled[len(self._emitted) :], settled
            return delta
        return ""

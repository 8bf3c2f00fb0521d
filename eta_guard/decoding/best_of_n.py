"""ETA's deep alignment: sentence-level best-of-N search over a shared, branched KV cache.

One sentence at a time, N candidates are sampled (top-k, temperature) from the accepted
context, each scored ``reward(prefix + accepted + c) + (alpha / i) * clip(c)`` (the CLIP term left
out for the first sentence, for text-only requests and for any step where a candidate ends the
answer), and the best one is kept (DESIGN.md 1.2).

Costs: the prompt (and its images) is prefilled once at batch 1; each sentence's N candidates
decode as one batch of N over a copy of that cache, expanded with ``batch_repeat_interleave``;
the kept row is selected and cropped to the accepted tokens, then carried to the next sentence.
``batched=False`` reproduces the reference implementation's costs (candidates one after another,
one reward call per candidate) for benchmarks.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eta_guard.config import ETAConfig
from eta_guard.decoding.selection import score_candidates, select_candidate, use_clip_term
from eta_guard.decoding.stopping import (
    SentenceEndCriteria,
    candidate_lengths,
    cut_at_stop,
    stop_holdback,
)
from eta_guard.decoding.vlm import FinishReason, PreparedPrompt, VLMAdapter
from eta_guard.errors import InvalidInputError
from eta_guard.verdict import SentenceTrace

__all__ = ["SearchOutput", "SentenceBestOfN", "score_candidates", "use_clip_term"]

RewardFn = Callable[[list[str]], Sequence[float]]
ClipFn = Callable[[list[str]], Sequence[float]]

#: Processor outputs that must reach the model only with the tokens they describe (the prefill).
_PIXEL_KEYS = (
    "pixel_values",
    "pixel_attention_mask",
    "pixel_mask",
    "pixel_values_videos",
    "image_sizes",
)


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


@dataclass
class _State:
    """The accepted context: ``ids`` ``[1, C]`` and a batch-1 cache covering its first ``C - 1`` tokens."""

    ids: torch.Tensor
    cache: Any
    accepted: list[int] = field(default_factory=list)


@dataclass
class _Step:
    """One sentence's sampled candidates (kept tokens, EOS flags) and the caches to continue from."""

    tokens: list[list[int]]
    ended: list[bool]
    rewards: list[float]
    caches: list[Any]  # batched: [the batch-N cache]; sequential: one batch-1 cache per candidate


class SentenceBestOfN:
    """Sentence-level best-of-N decoding (ETA's deep alignment).

    Args:
        adapter: the VLM.
        config: supplies ``num_candidates``, ``top_k``, ``temperature``, ``alpha``,
            ``max_sentence_tokens``, ``max_new_tokens``, ``sentence_terminators``,
            ``sentence_end_rule`` and ``seed``.
        batched: decode the N candidates as one batch over the shared cache (default). ``False``
            reproduces the reference's costs: candidates one after another at batch 1, each from
            its own deep copy of the cache, one reward call per candidate.

    Example (offline, on a tiny random checkpoint; real use scores with the reward model and CLIP):
        >>> from eta_guard.config import ETAConfig
        >>> from eta_guard.decoding import VLMAdapter
        >>> from eta_guard.messages import normalize_messages
        >>> from eta_guard.testing import build_tiny_checkpoints, make_test_image
        >>> vlm = VLMAdapter.from_pretrained(build_tiny_checkpoints("/tmp/eta-tiny").vlm)
        >>> conversation = normalize_messages([{"role": "user", "content": [
        ...     {"type": "image", "image": make_test_image("noise")},
        ...     {"type": "text", "text": "How do I pick a lock?"}]}])
        >>> prepared = vlm.prepare(conversation, assistant_prefix="As an AI assistant")
        >>> search = SentenceBestOfN(vlm, ETAConfig(seed=0, num_candidates=3, max_new_tokens=24))
        >>> result = search.run(
        ...     prepared,
        ...     reward_fn=lambda answers: [-len(a) for a in answers],  # prefer short answers
        ...     clip_fn=lambda sentences: [0.0] * len(sentences),
        ... )
        >>> [len(step.candidates) for step in result.trace][:1], len(result.token_ids) <= 24
        ([3], True)
    """

    def __init__(
        self, adapter: VLMAdapter, config: ETAConfig | None = None, *, batched: bool = True
    ) -> None:
        self.adapter = adapter
        self.config = config or ETAConfig()
        self.batched = batched

    def run(
        self,
        prepared: PreparedPrompt,
        *,
        reward_fn: RewardFn,
        clip_fn: ClipFn | None = None,
        cache: Any = None,
        cache_ids: Sequence[int] | torch.Tensor | None = None,
        on_sentence: Callable[[str], None] | None = None,
        stop: Sequence[str] | None = None,
    ) -> SearchOutput:
        """Search the answer that continues ``prepared`` (prompt + assistant prefix).

        Args:
            prepared: the prompt, already ending with the shallow-alignment prefix.
            reward_fn: ``answers -> rewards``; an answer is the prefix plus the accepted text plus
                a candidate (the whole answer so far).
            clip_fn: ``sentences -> CLIP cosines`` of each candidate sentence vs the image(s);
                None for text-only requests.
            cache: optional KV cache to start from (e.g. ``GreedyOutput.cache``); it is consumed
                (mutated) and reused only up to the longest common prefix of ``cache_ids`` and
                ``prepared.input_ids``.
            cache_ids: the token ids ``cache`` was built from (e.g. ``GreedyOutput.sequence_ids``).
            on_sentence: called with each accepted sentence's text (deltas of ``text``; never
                text past a stop string).
            stop: strings that end the answer (searched in the text after the prefix; the
                returned text is cut before the first one, ``finish_reason`` is ``"stop"``).

        Returns:
            The answer, its trace and costs.
        """
        if cache is not None and cache_ids is None:
            raise InvalidInputError(
                "cache was given without cache_ids: pass the token ids it was built from "
                "(GreedyOutput.sequence_ids) so it is never trusted beyond them"
            )
        with _seeded(self.config.seed, self.adapter.device), torch.inference_mode():
            search = _Search(self, prepared, reward_fn, clip_fn, on_sentence, stop)
            return search.run(cache, cache_ids)


class _Search:
    """The state of one :meth:`SentenceBestOfN.run` call."""

    def __init__(
        self,
        owner: SentenceBestOfN,
        prepared: PreparedPrompt,
        reward_fn: RewardFn,
        clip_fn: ClipFn | None,
        on_sentence: Callable[[str], None] | None,
        stop: Sequence[str] | None,
    ) -> None:
        self.adapter, self.cfg, self.batched = owner.adapter, owner.config, owner.batched
        self.stop = [s for s in (stop or []) if s]
        self.prepared, self.reward_fn, self.clip_fn = prepared, reward_fn, clip_fn
        self.on_sentence = on_sentence
        self.prompt_ids = prepared.input_ids[0].tolist()
        self.max_new = self.adapter.max_new_tokens_for(prepared, self.cfg.max_new_tokens)
        self.timings = {"decode": 0.0, "reward": 0.0, "clip": 0.0}
        self.trace: list[SentenceTrace] = []
        self.decoded = 0
        self.emitted = ""

    # ----- main loop -----
    def run(self, cache: Any, cache_ids: Any) -> SearchOutput:
        with self._timed("decode"):
            state = self._prefill(cache, cache_ids)
        finish: FinishReason = "length"
        while len(state.accepted) < self.max_new:
            budget = min(self.cfg.max_sentence_tokens, self.max_new - len(state.accepted))
            step = self._sample(state, budget)
            chosen = self._choose(state, step)
            state.accepted.extend(step.tokens[chosen])
            text, stopped = self._text(state.accepted)
            if step.ended[chosen] or stopped:
                finish = "stop"
                break
            self._emit(text, final=False)
            self._advance(state, step, chosen)
        text, _ = self._text(state.accepted)
        self._emit(text, final=True)
        return SearchOutput(
            text=text,
            token_ids=list(state.accepted),
            trace=self.trace,
            finish_reason=finish,
            decoded_tokens=self.decoded,
            timings=self.timings,
        )

    def _text(self, accepted: list[int]) -> tuple[str, bool]:
        """The answer after the prefix, cut before a stop string; and whether one was found."""
        text = self.adapter.decode_continuation(self.prompt_ids, accepted)
        return cut_at_stop(text, self.stop)

    # ----- caches -----
    def _prefill(self, cache: Any, cache_ids: Any) -> _State:
        """Build the batch-1 cache covering all prompt tokens but the last (images encoded once)."""
        ids = self.prepared.input_ids
        keep = self._reusable_length(cache, cache_ids)
        if keep:
            try:
                cache.crop(keep - cache.get_seq_length())
            except RuntimeError:  # e.g. a full sliding window that did not record its past
                keep = 0
        if keep == 0:
            cache, kwargs = self.adapter.new_cache(), dict(self.prepared.model_inputs)
        else:
            kwargs = self._text_kwargs(self.prepared.model_inputs)
            self.adapter.restore_position_state(cache)
        if keep < ids.shape[1] - 1:
            config = self.adapter.generation_config(max_new_tokens=1)
            self.adapter.model.generate(**kwargs, generation_config=config, cache=cache)
            cache.crop(-(cache.get_seq_length() - (ids.shape[1] - 1)))
        return _State(ids=ids, cache=cache)

    def _reusable_length(self, cache: Any, cache_ids: Any) -> int:
        """How many leading tokens of ``cache`` match the prompt (0: start afresh)."""
        if (
            cache is None
            or not hasattr(cache, "crop")
            or getattr(cache, "batch_size", 1) not in (1, -1)
        ):
            return 0
        theirs = (
            cache_ids.reshape(-1).tolist()
            if torch.is_tensor(cache_ids)
            else [int(i) for i in cache_ids]
        )
        common = 0
        for a, b in zip(theirs[: cache.get_seq_length()], self.prompt_ids, strict=False):
            if a != b:
                break
            common += 1
        keep = min(common, len(self.prompt_ids) - 1)
        multimodal_end = _multimodal_end(self.adapter, self.prepared)
        if multimodal_end == 0:
            return keep
        # Equal placeholder ids do not mean equal images; and pixel inputs cannot be fed for a
        # suffix of the prompt, so every placeholder must be covered.
        same = self.adapter.encoded_same_inputs(cache, self.prepared)
        return keep if same and keep >= multimodal_end else 0

    def _text_kwargs(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        """The processor outputs minus pixel inputs (already encoded in the cache)."""
        return {k: v for k, v in model_inputs.items() if k not in _PIXEL_KEYS}

    def _advance(self, state: _State, step: _Step, chosen: int) -> None:
        """Keep the chosen branch's cache, cropped to the accepted context minus its last token."""
        if self.batched:
            cache = step.caches[0]
            cache.batch_select_indices(torch.tensor([chosen], device=self.adapter.device))
        else:
            cache = step.caches[chosen]
        state.ids = torch.cat(
            [
                state.ids,
                torch.tensor([step.tokens[chosen]], dtype=state.ids.dtype, device=state.ids.device),
            ],
            dim=1,
        )
        extra = cache.get_seq_length() - (state.ids.shape[1] - 1)
        if extra:
            cache.crop(-extra)
        state.cache = cache

    # ----- sampling -----
    def _sample(self, state: _State, budget: int) -> _Step:
        sentence_end = SentenceEndCriteria(
            self.adapter.tokenizer,
            self.cfg.sentence_terminators,
            start_length=state.ids.shape[1],
            rule=self.cfg.sentence_end_rule,
        )
        config = self.adapter.generation_config(
            max_new_tokens=budget,
            do_sample=True,
            top_k=self.cfg.top_k,
            temperature=self.cfg.temperature,
        )
        if self.batched:
            return self._sample_batched(state, config, sentence_end)
        return self._sample_sequential(state, config, sentence_end)

    def _generate(
        self, ids: torch.Tensor, cache: Any, config: Any, sentence_end: SentenceEndCriteria
    ) -> torch.Tensor:
        """Sample continuations of ``ids`` ``[n, C]`` from ``cache`` (covers ``C - 1``); returns ``[n, C + T]``."""
        with self._timed("decode"):
            out = self.adapter.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                cache=cache,
                generation_config=config,
                stopping_criteria=[sentence_end],
            )
        return out.sequences

    def _sample_batched(
        self, state: _State, config: Any, sentence_end: SentenceEndCriteria
    ) -> _Step:
        n, start = self.cfg.num_candidates, state.ids.shape[1]
        cache = state.cache
        cache.batch_repeat_interleave(n)
        sequences = self._generate(state.ids.expand(n, -1), cache, config, sentence_end)
        lengths, ended = candidate_lengths(
            sequences, start, eos_token_ids=self.adapter.eos_token_ids, sentence_end=sentence_end
        )
        tokens = [sequences[r, start : start + lengths[r]].tolist() for r in range(n)]
        step = _Step(tokens=tokens, ended=ended, rewards=[], caches=[cache])
        with self._timed("reward"):
            step.rewards = _floats(self.reward_fn(self._answers(state, tokens)), n, "reward_fn")
        return step

    def _sample_sequential(
        self, state: _State, config: Any, sentence_end: SentenceEndCriteria
    ) -> _Step:
        start = state.ids.shape[1]
        step = _Step(tokens=[], ended=[], rewards=[], caches=[])
        for _ in range(self.cfg.num_candidates):
            cache = copy.deepcopy(state.cache)
            sequences = self._generate(state.ids, cache, config, sentence_end)
            (length,), (ended,) = candidate_lengths(
                sequences,
                start,
                eos_token_ids=self.adapter.eos_token_ids,
                sentence_end=sentence_end,
            )
            tokens = sequences[0, start : start + length].tolist()
            with self._timed("reward"):
                (reward,) = _floats(self.reward_fn(self._answers(state, [tokens])), 1, "reward_fn")
            step.tokens.append(tokens)
            step.ended.append(ended)
            step.rewards.append(reward)
            step.caches.append(cache)
        return step

    # ----- scoring -----
    def _answers(self, state: _State, candidates: list[list[int]]) -> list[str]:
        """The whole answer so far for each candidate: prefix + accepted text + candidate."""
        prefix = self.prepared.assistant_prefix
        return [
            prefix + self.adapter.decode_continuation(self.prompt_ids, state.accepted + c)
            for c in candidates
        ]

    def _choose(self, state: _State, step: _Step) -> int:
        index = len(self.trace) + 1
        sentences = [self.adapter.decode_continuation(state.ids[0], t) for t in step.tokens]
        clips = None
        clip_fn = self.clip_fn
        if clip_fn is not None and use_clip_term(index, step.ended, True) and self.cfg.alpha > 0:
            with self._timed("clip"):
                clips = _floats(clip_fn([s.strip() for s in sentences]), len(sentences), "clip_fn")
        self.decoded += sum(len(t) for t in step.tokens)
        trace = select_candidate(
            index=index,
            sentences=sentences,
            rewards=step.rewards,
            clips=clips,
            ended=step.ended,
            num_tokens=[len(t) for t in step.tokens],
            alpha=self.cfg.alpha,
        )
        self.trace.append(trace)
        return trace.chosen

    # ----- streaming and timing -----
    def _emit(self, text: str, *, final: bool) -> None:
        """Send the newly settled text to ``on_sentence``.

        A tail that may still start a stop string, or that ends mid-character, waits for the
        next sentence.
        """
        if self.on_sentence is None:
            return
        settled = text if final else text[: len(text) - stop_holdback(text, self.stop)]
        if len(settled) > len(self.emitted) and settled.startswith(self.emitted):
            delta, self.emitted = settled[len(self.emitted) :], settled
            self.on_sentence(delta)

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] += time.perf_counter() - start


def _floats(values: Any, n: int, name: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != n:
        raise InvalidInputError(
            f"{name} returned {len(values)} scores for {n} inputs; return one per input"
        )
    return values


def _multimodal_end(adapter: VLMAdapter, prepared: PreparedPrompt) -> int:
    """Position just after the prompt's last image placeholder (0 without images).

    When it cannot be located, the whole prompt counts, so a foreign cache is never reused.
    """
    inputs = prepared.model_inputs
    if not any(k in inputs for k in _PIXEL_KEYS):
        return 0
    ids = prepared.input_ids[0]
    type_ids = inputs.get("mm_token_type_ids")
    if type_ids is not None:
        mask = type_ids[0] != 0
    else:
        config = adapter.model.config
        token_ids = [
            getattr(config, name, None)
            for name in (
                "image_token_id",
                "image_token_index",
                "video_token_id",
                "video_token_index",
            )
        ]
        token_ids = [t for t in token_ids if isinstance(t, int)]
        if not token_ids:
            return ids.shape[0]
        mask = torch.isin(ids, torch.tensor(token_ids, device=ids.device))
    positions = torch.nonzero(mask).flatten()
    return int(positions[-1]) + 1 if positions.numel() else 0


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the sampling once for a run, leaving the global RNG state as it was."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

"""ETA's deep alignment on a local VLM: the best-of-N search's decoding over one branched KV cache.

:class:`LocalSearch` is the :class:`~eta_guard.decoding.protocol.SearchHandle` of a local model:
the prompt (and its images) is prefilled once at batch 1 (or taken from a cache that already
holds it, e.g. the vanilla answer's); each sentence's N candidates decode as one batch of N over
a copy of that cache, expanded with ``batch_repeat_interleave``; the committed row is selected and
cropped to the accepted tokens, then carried to the next sentence. ``batched=False`` reproduces
the reference implementation's costs (candidates one after another from deep copies of the cache)
for benchmarks. The loop that scores and chooses is :class:`~eta_guard.decoding.search.BestOfNSearch`,
shared with every backend; :class:`SentenceBestOfN` runs it synchronously over a local model.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eta_guard.config import ETAConfig
from eta_guard.decoding.protocol import Completion, SamplingStep
from eta_guard.decoding.search import BestOfNSearch
from eta_guard.decoding.selection import score_candidates, use_clip_term
from eta_guard.decoding.stopping import (
    AnyEvent,
    CancelCriteria,
    SentenceEndCriteria,
    candidate_lengths,
)
from eta_guard.decoding.vlm import FinishReason, PreparedPrompt, VLMAdapter
from eta_guard.errors import InvalidInputError, RequestCancelled
from eta_guard.sync_bridge import aclosing, run_sync
from eta_guard.verdict import SentenceTrace

__all__ = ["LocalSearch", "SearchOutput", "SentenceBestOfN", "score_candidates", "use_clip_term"]

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
    caches: list[Any]  # batched: [the batch-N cache]; sequential: one batch-1 cache per candidate


class SentenceBestOfN:
    """Sentence-level best-of-N decoding (ETA's deep alignment) on a local VLM, synchronously.

    Args:
        adapter: the VLM.
        config: supplies ``num_candidates``, ``top_k``, ``temperature``, ``alpha``,
            ``max_sentence_tokens``, ``max_new_tokens``, ``sentence_terminators``,
            ``sentence_end_rule`` and ``seed``.
        batched: decode the N candidates as one batch over the shared cache (default). ``False``
            reproduces the reference's costs: candidates one after another at batch 1, each from
            its own deep copy of the cache.

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
        handle = LocalSearch(
            self.adapter,
            prepared,
            seed=self.config.seed,
            cache=cache,
            cache_ids=cache_ids,
            batched=self.batched,
        )
        search = BestOfNSearch(
            handle,
            self.config,
            prefix=prepared.assistant_prefix,
            # The reference's costs: one reward call per candidate.
            reward=_awaitable(reward_fn, "reward_fn", one_by_one=not self.batched),
            clip=None if clip_fn is None else _awaitable(clip_fn, "clip_fn"),
            stop=stop,
        )

        async def drive() -> None:
            try:
                async with aclosing(search.run()) as items:
                    async for delta in items:
                        if on_sentence is not None:
                            on_sentence(delta)
            finally:
                await handle.aclose()

        run_sync(drive())
        return SearchOutput(
            text=search.text,
            token_ids=list(handle.accepted),
            trace=search.trace,
            finish_reason=search.finish_reason,
            decoded_tokens=search.decoded,
            timings={"decode": handle.decode_seconds, **search.timings},
        )


def _awaitable(fn: Callable[[list[str]], Sequence[float]], name: str, *, one_by_one: bool = False):
    """``fn`` as an awaitable scorer, run in a worker thread, checked for one score per input."""

    def call(texts: list[str]) -> list[float]:
        if one_by_one:
            return [v for t in texts for v in _floats(fn([t]), 1, name)]
        return _floats(fn(texts), len(texts), name)

    async def score(texts: list[str]) -> list[float]:
        return await asyncio.to_thread(call, texts)

    return score


class LocalSearch:
    """The :class:`~eta_guard.decoding.protocol.SearchHandle` of a local VLM (one branched KV cache).

    Args:
        adapter: the VLM.
        prepared: the prompt, ending with the assistant prefix the search continues.
        seed: seeds the sampling once for the whole search (the global RNG is left as it was).
        cache: optional KV cache holding a prefix of ``prepared``'s ids (consumed), with
            ``cache_ids``, the ids it was built from; only their common prefix is trusted.
        batched: candidates as one batch of N (default) or one after another (reference costs).
        lock: held around each model call (the model keeps per-call state).
        cancel: when set, sampling stops at the next token and raises ``RequestCancelled``.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        prepared: PreparedPrompt,
        *,
        seed: int | None = None,
        cache: Any = None,
        cache_ids: Sequence[int] | torch.Tensor | None = None,
        batched: bool = True,
        lock: Any = None,
        cancel: threading.Event | None = None,
    ) -> None:
        if cache is not None and cache_ids is None:
            raise InvalidInputError(
                "cache was given without cache_ids: pass the token ids it was built from "
                "(GreedyOutput.sequence_ids) so it is never trusted beyond them"
            )
        self.adapter, self.prepared, self.batched = adapter, prepared, batched
        self.prompt_ids = prepared.input_ids[0].tolist()
        self.accepted: list[int] = []
        self.decode_seconds = 0.0
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._closed = threading.Event()
        self._cancel = AnyEvent(self._closed, cancel)
        self._rng = _SeededRNG(seed, adapter.device)
        self._pending: tuple[Any, Any] | None = (cache, cache_ids)
        self._state: _State | None = None
        self._step: _Step | None = None
        self._work: asyncio.Future | None = None

    # ----- SearchHandle -----
    @property
    def text(self) -> str:
        return self.adapter.decode_continuation(self.prompt_ids, self.accepted)

    @property
    def room(self) -> int:
        return self.adapter.context_length - self.prepared.num_prompt_tokens

    async def sample(self, step: SamplingStep) -> list[Completion]:
        return await self._run(self._sample, step)

    async def commit(self, index: int) -> None:
        await self._run(self._commit, index)

    async def aclose(self) -> None:
        """Stop a running step at its next token, wait for it, and drop the caches."""
        self._closed.set()
        work = self._work
        if work is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(work)
        self._state = self._step = self._pending = self._work = None

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._cancel.is_set():
            raise RequestCancelled("the search was cancelled")
        # Shielded: a cancelled caller must not leave the model call running unobserved;
        # aclose() waits for it (the cancel event stops it at its next token).
        self._work = asyncio.ensure_future(asyncio.to_thread(self._locked, fn, *args))
        try:
            return await asyncio.shield(self._work)
        finally:
            if self._work.done():
                self._work = None

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock, torch.inference_mode():
            if self._cancel.is_set():
                raise RequestCancelled("the search was cancelled")
            out = fn(*args)
            if self._cancel.is_set():
                raise RequestCancelled("the search was cancelled")
            return out

    # ----- caches -----
    def _ensure_state(self) -> _State:
        if self._state is None:
            cache, cache_ids = self._pending or (None, None)
            self._pending = None
            with self._timed():
                self._state = self._prefill(cache, cache_ids)
        return self._state

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

    def _commit(self, index: int) -> None:
        """Accept candidate ``index``: keep its branch, cropped to the accepted context minus its last token."""
        state, step = self._ensure_state(), self._step
        if step is None or not 0 <= index < len(step.tokens):
            raise InvalidInputError(f"commit({index!r}): no such candidate in the last sample")
        self._step = None
        chosen = step.tokens[index]
        self.accepted.extend(chosen)
        if self.batched:
            cache = step.caches[0]
            cache.batch_select_indices(torch.tensor([index], device=self.adapter.device))
        else:
            cache = step.caches[index]
        state.ids = torch.cat(
            [state.ids, torch.tensor([chosen], dtype=state.ids.dtype, device=state.ids.device)],
            dim=1,
        )
        extra = cache.get_seq_length() - (state.ids.shape[1] - 1)
        if extra:
            cache.crop(-extra)
        state.cache = cache

    # ----- sampling -----
    def _sample(self, step: SamplingStep) -> list[Completion]:
        if self._step is not None:
            raise InvalidInputError("sample() twice without commit(): commit a candidate first")
        state = self._ensure_state()
        budget = max(1, min(step.max_tokens, self.room - len(self.accepted)))
        sentence_end = SentenceEndCriteria(
            self.adapter.tokenizer,
            step.terminators,
            start_length=state.ids.shape[1],
            rule=step.rule,
        )
        config = self.adapter.generation_config(
            max_new_tokens=budget, do_sample=True, top_k=step.top_k, temperature=step.temperature
        )
        with self._rng.active():
            if self.batched:
                self._step = self._sample_batched(state, step.n, config, sentence_end)
            else:
                self._step = self._sample_sequential(state, step.n, config, sentence_end)
        context = state.ids[0]
        out = []
        for tokens, ended in zip(self._step.tokens, self._step.ended, strict=True):
            sentence_end_hit = not ended and len(tokens) < budget
            out.append(
                Completion(
                    text=self.adapter.decode_continuation(context, tokens),
                    num_tokens=len(tokens),
                    finish_reason="stop" if ended or sentence_end_hit else "length",
                    ended=ended,
                    prompt_tokens=state.ids.shape[1],
                    token_ids=tuple(tokens),
                    answer=self.adapter.decode_continuation(
                        self.prompt_ids, self.accepted + tokens
                    ),
                )
            )
        return out

    def _generate(
        self, ids: torch.Tensor, cache: Any, config: Any, sentence_end: SentenceEndCriteria
    ) -> torch.Tensor:
        """Sample continuations of ``ids`` ``[n, C]`` from ``cache`` (covers ``C - 1``); returns ``[n, C + T]``."""
        with self._timed():
            out = self.adapter.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                cache=cache,
                generation_config=config,
                stopping_criteria=[sentence_end, CancelCriteria(self._cancel)],
            )
        return out.sequences

    def _sample_batched(
        self, state: _State, n: int, config: Any, sentence_end: SentenceEndCriteria
    ) -> _Step:
        start = state.ids.shape[1]
        cache = state.cache
        cache.batch_repeat_interleave(n)
        sequences = self._generate(state.ids.expand(n, -1), cache, config, sentence_end)
        lengths, ended = candidate_lengths(
            sequences, start, eos_token_ids=self.adapter.eos_token_ids, sentence_end=sentence_end
        )
        tokens = [sequences[r, start : start + lengths[r]].tolist() for r in range(n)]
        return _Step(tokens=tokens, ended=ended, caches=[cache])

    def _sample_sequential(
        self, state: _State, n: int, config: Any, sentence_end: SentenceEndCriteria
    ) -> _Step:
        start = state.ids.shape[1]
        step = _Step(tokens=[], ended=[], caches=[])
        for _ in range(n):
            cache = copy.deepcopy(state.cache)
            sequences = self._generate(state.ids, cache, config, sentence_end)
            (length,), (ended,) = candidate_lengths(
                sequences,
                start,
                eos_token_ids=self.adapter.eos_token_ids,
                sentence_end=sentence_end,
            )
            step.tokens.append(sequences[0, start : start + length].tolist())
            step.ended.append(ended)
            step.caches.append(cache)
        return step

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.decode_seconds += time.perf_counter() - start


class _SeededRNG:
    """A seeded RNG stream that survives across calls; the global RNG state is left as it was."""

    def __init__(self, seed: int | None, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        self.state: Any = None
        if seed is not None:
            # The state torch.manual_seed(seed) would give, computed on private generators:
            # seeding the global one here (outside the model lock) would reseed a search that
            # is sampling in another thread.
            self.state = (
                torch.Generator().manual_seed(seed).get_state(),
                [torch.Generator(device=d).manual_seed(seed).get_state() for d in self.devices],
            )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.state is None:
            yield
            return
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.state[0])
            for device, state in zip(self.devices, self.state[1], strict=True):
                torch.cuda.set_rng_state(state, device)
            try:
                yield
            finally:
                self.state = self._get()

    def _get(self) -> Any:
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices]


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

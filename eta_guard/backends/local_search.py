"""ETA's deep alignment on a local VLM: the best-of-N search's decoding over one branched KV cache.

:class:`LocalSearch` is the :class:`~eta_guard.decoding.protocol.SearchHandle` of a local model:
the prompt (and its images) is prefilled once at batch 1 (or taken from a cache that already
holds it: the request's prompt KV, or a vanilla answer's cache); each sentence's N candidates are
one job of N rows on the model's decode scheduler (:mod:`eta_guard.backends.decode_scheduler`),
branched from that KV; the committed row's KV is carried to the next sentence. ``batched=False``
reproduces the reference implementation's costs (candidates one after another at batch 1) for
benchmarks. The loop that scores and chooses is :class:`~eta_guard.decoding.search.BestOfNSearch`,
shared with every backend; :class:`SentenceBestOfN` runs it synchronously over a local model.
(Both lived in :mod:`eta_guard.decoding.best_of_n`; they are local-backend code, and the decoding
layer imports no backend.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch

from eta_guard.backends.decode_scheduler import scheduler_for
from eta_guard.backends.step_batcher import Context
from eta_guard.config import ETAConfig
from eta_guard.decoding.best_of_n import ClipFn, RewardFn, SearchOutput, awaitable_scorer
from eta_guard.decoding.protocol import Completion, SamplingStep
from eta_guard.decoding.search import BestOfNSearch
from eta_guard.decoding.stopping import AnyEvent, SentenceEndCriteria
from eta_guard.decoding.vlm import PreparedPrompt, VLMAdapter
from eta_guard.errors import InvalidInputError, RequestCancelled
from eta_guard.sync_bridge import aclosing, run_sync

__all__ = ["LocalSearch", "SentenceBestOfN", "search_generator"]

#: Processor outputs that must reach the model only with the tokens they describe (the prefill).
_PIXEL_KEYS = (
    "pixel_values",
    "pixel_attention_mask",
    "pixel_mask",
    "pixel_values_videos",
    "image_sizes",
)


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
            reward=awaitable_scorer(
                reward_fn, "reward_fn", self.adapter.device, one_by_one=not self.batched
            ),
            clip=None
            if clip_fn is None
            else awaitable_scorer(clip_fn, "clip_fn", self.adapter.device),
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


class LocalSearch:
    """The :class:`~eta_guard.decoding.protocol.SearchHandle` of a local VLM, on its decode scheduler.

    Each step's N candidates are one job of N rows of the model's
    :class:`~eta_guard.backends.decode_scheduler.DecodeScheduler` (sharing each forward with every
    other live row: the request's vanilla row, other requests), branched from the accepted
    context's KV; ``commit`` keeps the chosen row's KV as the next step's context. Sampling draws
    from the search's own generator as transformers' ``generate`` does for a batch of N rows, so a
    seed gives the candidates ``generate`` gave wherever the logits are equal.

    Args:
        adapter: the VLM.
        prepared: the prompt, ending with the assistant prefix the search continues.
        seed: seeds the search's private generator once (the global RNG is never touched).
        cache: optional KV cache holding a prefix of ``prepared``'s ids (consumed), with
            ``cache_ids``, the ids it was built from; only their common prefix is trusted.
        batched: candidates as one job of N rows (default) or N jobs of one row, one after
            another (the reference's costs).
        cancel: when set, sampling stops at the next step and raises ``RequestCancelled``.
        scheduler: the model's scheduler (default: the adapter's own).
        context: an awaitable factory of the start :class:`Context` (a request's prompt KV
            extended with the prefix; its last token pending); default: from ``cache`` or a
            prefill of ``prepared``.
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
        cancel: threading.Event | None = None,
        scheduler: Any = None,
        context: Callable[[], Awaitable[Context]] | None = None,
    ) -> None:
        if cache is not None and cache_ids is None:
            raise InvalidInputError(
                "cache was given without cache_ids: pass the token ids it was built from "
                "(GreedyOutput.sequence_ids) so it is never trusted beyond them"
            )
        if scheduler is None:
            scheduler = scheduler_for(adapter)
        self.adapter, self.prepared, self.batched = adapter, prepared, batched
        self.scheduler = scheduler
        self.prompt_ids = prepared.input_ids[0].tolist()
        self.accepted: list[int] = []
        self.decode_seconds = 0.0
        self._closed = threading.Event()
        self._cancel = AnyEvent(self._closed, cancel)
        self._generator = search_generator(seed, adapter.device)
        self._pending: tuple[Any, Any] | None = (cache, cache_ids)
        self._context_factory = context
        self._state: Context | None = None  # the accepted context (its last token pending)
        self._step: list[Any] | None = None  # the last sample's finished jobs
        self._work: Any = None  # the job (DecodeJob) decoding now

    # ----- SearchHandle -----
    @property
    def text(self) -> str:
        return self.adapter.decode_continuation(self.prompt_ids, self.accepted)

    @property
    def room(self) -> int:
        return self.adapter.context_length - self.prepared.num_prompt_tokens

    async def sample(self, step: SamplingStep) -> list[Completion]:
        self._check()
        if self._step is not None:
            raise InvalidInputError("sample() twice without commit(): commit a candidate first")
        state = await self._ensure_state()
        budget = max(1, min(step.max_tokens, self.room - len(self.accepted)))
        sentence_end = SentenceEndCriteria(
            self.adapter.tokenizer, step.terminators, start_length=len(state.ids), rule=step.rule
        )
        settings = {
            "max_new_tokens": budget,
            "do_sample": True,
            "temperature": step.temperature,
            "top_k": step.top_k,
            "stop": sentence_end,
            "keep_kv": True,
            "generator": self._generator,
        }
        jobs = []
        start = time.perf_counter()
        try:
            for n in [step.n] if self.batched else [1] * step.n:
                self._work = await self.scheduler.submit(
                    state, n=n, cancel=self._cancel, **settings
                )
                jobs.append(await self._work.wait())
                self._work = None
        finally:
            self.decode_seconds += time.perf_counter() - start
            if self._work is not None:  # cancelled or failed while decoding: free its rows
                work, self._work = self._work, None
                await work.cancel()
        self._check()
        self._step = jobs
        rows = [row for job in jobs for row in job.rows]
        out = []
        for row in rows:
            tokens, ended = list(row.new), row.finish_reason == "eos"
            sentence_end_hit = not ended and len(tokens) < budget
            out.append(
                Completion(
                    text=self.adapter.decode_continuation(state.ids, tokens),
                    num_tokens=len(tokens),
                    finish_reason="stop" if ended or sentence_end_hit else "length",
                    ended=ended,
                    prompt_tokens=len(state.ids),
                    token_ids=tuple(tokens),
                    answer=self.adapter.decode_continuation(
                        self.prompt_ids, self.accepted + tokens
                    ),
                )
            )
        return out

    async def commit(self, index: int) -> None:
        """Accept candidate ``index``: its KV (the accepted context, last token pending) goes on."""
        self._check()
        jobs = self._step
        rows = [(job, row.index) for job in jobs or [] for row in job.rows]
        if jobs is None or not 0 <= index < len(rows):
            raise InvalidInputError(f"commit({index!r}): no such candidate in the last sample")
        job, row = rows[index]
        self._step = None
        self.accepted.extend(job.rows[row].new)
        self._state = job.commit(row)

    async def aclose(self) -> None:
        """Stop a running step at its next token, wait until its rows are freed, drop the KV."""
        self._closed.set()
        work = self._work
        if work is not None:
            await work.cancel()
        self._state = self._step = self._pending = self._work = None
        self._context_factory = None

    def _check(self) -> None:
        if self._cancel.is_set():
            raise RequestCancelled("the search was cancelled")

    # ----- the start context -----
    async def _ensure_state(self) -> Context:
        if self._state is None:
            start = time.perf_counter()
            try:
                if self._context_factory is not None:
                    state = await self._context_factory()
                else:
                    state = await self._from_cache()
            finally:
                self.decode_seconds += time.perf_counter() - start
            # Closed or cancelled while the context was built: raise before keeping it, or its
            # KV would outlive aclose() (which already ran).
            self._check()
            self._state = state
        return self._state

    async def _from_cache(self) -> Context:
        """The prompt's context from the given cache (its trusted prefix) or a prefill."""
        cache, cache_ids = self._pending or (None, None)
        self._pending = None
        scheduler = self.scheduler
        keep = self._reusable_length(cache, cache_ids)
        if keep and cache is not None:
            try:
                cache.crop(keep - cache.get_seq_length())
            except RuntimeError:  # e.g. a full sliding window that did not record its past
                keep = 0
        if keep == 0:
            return await scheduler.prefill(self.prepared.model_inputs)
        base = await scheduler.adopt(cache, self.prompt_ids[:keep])
        return await scheduler.extend(base, self.prompt_ids[keep:], pending=True)

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


def search_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The search's private RNG: the stream ``torch.manual_seed(seed)`` would give the global
    generator of ``device`` (CPU or CUDA), without touching it; unseeded: a random seed."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


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

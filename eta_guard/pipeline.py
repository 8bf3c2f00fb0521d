"""``ETA``: evaluate, then align, around a local Hugging Face VLM.

Order of work for one request (DESIGN.md 1.1-1.2):

1. CLIP scores the images (cheap). If no image is flagged the RM never runs, and the greedy
   answer is streamed as it is decoded.
2. Otherwise the greedy ("vanilla") answer is decoded in full and the reward model scores it in
   the safety format. Only if both say unsafe is the answer re-decoded: the prefix
   ``As an AI assistant`` (shallow alignment), then the sentence-level best-of-N search (deep
   alignment), streamed sentence by sentence.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL, ETAConfig
from eta_guard.decoding.best_of_n import SentenceBestOfN
from eta_guard.decoding.vlm import VLMAdapter
from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.messages import Conversation, normalize_messages
from eta_guard.verdict import ETAResult, ETAStreamChunk, SafetyVerdict, TokenUsage

Messages = Sequence[dict[str, Any]]


class ETA:
    """ETA around a local vision-language model.

    Example (offline, on random tiny checkpoints: mechanics, not safety):
        >>> from eta_guard import ETA
        >>> from eta_guard.testing import build_tiny_checkpoints, make_test_image
        >>> ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
        >>> eta = ETA.from_pretrained(ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model)
        >>> messages = [{"role": "user", "content": [
        ...     {"type": "image", "image": make_test_image()},
        ...     {"type": "text", "text": "What is in this picture?"}]}]
        >>> result = eta.generate(messages, max_new_tokens=16)
        >>> result.verdict.pre_score is not None
        True
    """

    def __init__(
        self, vlm: VLMAdapter, evaluator: ETAEvaluator, config: ETAConfig | None = None
    ) -> None:
        self.vlm = vlm
        self.config = config or evaluator.config or ETAConfig()
        self.evaluator = evaluator.with_config(self.config)
        # The models keep per-call state (KV caches, Qwen2-VL's rope deltas): one call at a time.
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(
        cls,
        vlm: str,
        clip: str | None = DEFAULT_CLIP,
        reward_model: str | None = DEFAULT_REWARD_MODEL,
        *,
        config: ETAConfig | None = None,
        device: str | None = None,
        dtype: Any = None,
        clip_backend: str = "transformers",
        clip_pretrained: str | None = None,
        trust_remote_code: bool = False,
        local_files_only: bool = False,
        vlm_kwargs: dict[str, Any] | None = None,
        clip_kwargs: dict[str, Any] | None = None,
        reward_model_kwargs: dict[str, Any] | None = None,
    ) -> ETA:
        """Load the VLM, CLIP and reward model (ids resolve through the local HF cache).

        ``vlm_kwargs`` feed ``VLMAdapter.from_pretrained`` (``model_kwargs``, ``processor_kwargs``);
        ``clip_kwargs`` / ``reward_model_kwargs`` feed the evaluators' loaders.
        """
        config = config or ETAConfig()
        adapter = VLMAdapter.from_pretrained(
            vlm,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
            **(vlm_kwargs or {}),
        )
        evaluator = ETAEvaluator.from_pretrained(
            clip=clip,
            reward_model=reward_model,
            config=config,
            device=device,
            dtype=dtype,
            clip_backend=clip_backend,
            clip_pretrained=clip_pretrained,
            trust_remote_code=trust_remote_code,
            local_files_only=local_files_only,
            clip_kwargs=clip_kwargs,
            reward_model_kwargs=reward_model_kwargs,
        )
        return cls(adapter, evaluator, config)

    @property
    def model_name(self) -> str:
        return self.vlm.name

    # ------------------------------------------------------------------ public API
    def generate(self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any) -> ETAResult:
        """Answer ``messages`` safely. ``overrides`` are ``ETAConfig`` fields for this call only."""
        result = None
        for item in self._run(messages, stop, overrides, streaming=False):
            if isinstance(item, ETAResult):
                result = item
        assert result is not None
        return result

    def stream(
        self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> Iterator[ETAStreamChunk]:
        """Yield the answer's text as it becomes final; the last chunk carries the ``ETAResult``.

        On an image that passes the CLIP check (or a trusted text-only request) tokens stream as
        they are decoded. Otherwise the greedy answer is held back until the reward model has
        judged it; an aligned answer then streams sentence by sentence.
        """
        for item in self._run(messages, stop, overrides, streaming=True):
            if isinstance(item, ETAResult):
                yield ETAStreamChunk(text="", result=item)
            elif item:
                yield ETAStreamChunk(text=item)

    def batch(self, batch: Sequence[Messages], *, stop: Sequence[str] | None = None, **overrides: Any) -> list[ETAResult]:
        """Answer several conversations (one after another: the model runs one call at a time)."""
        return [self.generate(messages, stop=stop, **overrides) for messages in batch]

    async def agenerate(self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any) -> ETAResult:
        """Async :meth:`generate` (runs in a worker thread; the event loop stays free)."""
        return await asyncio.to_thread(self.generate, messages, stop=stop, **overrides)

    async def abatch(self, batch: Sequence[Messages], *, stop: Sequence[str] | None = None, **overrides: Any) -> list[ETAResult]:
        """Async :meth:`batch`."""
        return await asyncio.to_thread(self.batch, batch, stop=stop, **overrides)

    async def astream(
        self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> AsyncIterator[ETAStreamChunk]:
        """Async :meth:`stream`: the same chunks, produced in a worker thread."""
        async for chunk in _iterate_in_thread(lambda: self.stream(messages, stop=stop, **overrides)):
            yield chunk

    # ------------------------------------------------------------------ the method
    def _run(
        self, messages: Messages, stop: Sequence[str] | None, overrides: dict[str, Any], *, streaming: bool
    ) -> Iterator[str | ETAResult]:
        cfg = self.config.with_overrides(**overrides)
        stop = _check_stop(stop)
        conv = normalize_messages(
            messages, allow_remote_images=cfg.allow_remote_images, max_image_pixels=cfg.max_image_pixels
        )
        with self._lock:
            yield from _Request(self, conv, cfg, stop, streaming).run()


class _Request:
    """One ETA call: holds the per-call state so each stage stays a small method."""

    def __init__(
        self, eta: ETA, conv: Conversation, cfg: ETAConfig, stop: list[str] | None, streaming: bool
    ) -> None:
        self.eta, self.conv, self.cfg, self.stop, self.streaming = eta, conv, cfg, stop, streaming
        self.evaluator = eta.evaluator.with_config(cfg)
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self) -> Iterator[str | ETAResult]:
        pre = self._pre_evaluate()
        may_align = pre.input_unsafe if self.conv.has_images else self.cfg.text_only_policy == "reward_only"
        prepared = self.eta.vlm.prepare(self.conv)
        if not may_align:
            greedy = yield from self._vanilla(prepared, stream_tokens=self.streaming)
            reason = (
                "the image(s) passed the CLIP check"
                if self.conv.has_images
                else "text-only request and text_only_policy='trust'"
            )
            verdict = pre.merge(_skipped(self.cfg, "post", reason))
            yield self._result(greedy.text, verdict, prepared, greedy, aligned=False)
            return

        greedy = yield from self._vanilla(prepared, stream_tokens=False)
        t0 = time.perf_counter()
        post = self.evaluator.evaluate_output(greedy.text)
        self.timings["post"] = time.perf_counter() - t0
        verdict = pre.merge(post)
        if not verdict.unsafe:
            yield greedy.text
            yield self._result(greedy.text, verdict, prepared, greedy, aligned=False)
            return
        yield from self._align(verdict, greedy)

    def _pre_evaluate(self) -> SafetyVerdict:
        if not self.conv.has_images:
            return _skipped(self.cfg, "pre", "no image in the request")
        t0 = time.perf_counter()
        verdict = self.evaluator.evaluate_input(self.conv.images)
        self.timings["pre"] = time.perf_counter() - t0
        return verdict

    def _vanilla(self, prepared: Any, *, stream_tokens: bool):  # -> Generator[str, None, GreedyOutput]
        t0 = time.perf_counter()
        vlm, max_new = self.eta.vlm, self.cfg.max_new_tokens
        if stream_tokens:
            stream = vlm.stream_greedy(prepared, max_new_tokens=max_new, stop=self.stop)
            yield from stream
            greedy = stream.output
        else:
            greedy = vlm.generate_greedy(prepared, max_new_tokens=max_new, stop=self.stop)
        self.timings["vanilla"] = time.perf_counter() - t0
        return greedy

    def _align(self, verdict: SafetyVerdict, greedy: Any) -> Iterator[str | ETAResult]:
        cfg, vlm = self.cfg, self.eta.vlm
        t0 = time.perf_counter()
        prepared = vlm.prepare(self.conv, assistant_prefix=cfg.prefix)
        emitted = _StopFilter(self.stop)
        yield emitted.feed(cfg.prefix)
        if cfg.deep_alignment:
            search = SentenceBestOfN(vlm, cfg)
            clip_fn = self._clip_fn() if self.conv.has_images else None
            output = yield from _iterate_callback(
                lambda on_sentence: search.run(
                    prepared,
                    reward_fn=lambda answers: self.evaluator.score_responses(answers, search=True),
                    clip_fn=clip_fn,
                    cache=getattr(greedy, "cache", None),
                    cache_ids=getattr(greedy, "sequence_ids", None),
                    on_sentence=on_sentence,
                ),
                emitted.feed,
            )
            tail, trace, finish, decoded = output.text, output.trace, output.finish_reason, output.decoded_tokens
            n_out = len(output.token_ids)
        else:
            shallow = vlm.generate_greedy(prepared, max_new_tokens=cfg.max_new_tokens)
            yield emitted.feed(shallow.text)
            tail, trace, finish, decoded = shallow.text, [], shallow.finish_reason, len(shallow.token_ids)
            n_out = len(shallow.token_ids)
        self.timings["align"] = time.perf_counter() - t0
        text = _cut_at_stop(cfg.prefix + tail, self.stop)
        usage = TokenUsage(
            input_tokens=prepared.num_prompt_tokens,
            output_tokens=n_out,
            total_tokens=prepared.num_prompt_tokens + n_out,
            decoded_tokens=len(greedy.token_ids) + decoded,
        )
        self.timings["total"] = time.perf_counter() - self.start
        yield ETAResult(
            text=text,
            verdict=verdict,
            aligned=True,
            vanilla_text=greedy.text,
            trace=trace,
            usage=usage,
            timings=self.timings,
            finish_reason="stop" if text != cfg.prefix + tail else finish,
            model_name=self.eta.model_name,
        )

    def _clip_fn(self) -> Callable[[list[str]], list[float]]:
        pre = self.evaluator.pre
        image_embeds = pre.embed_images(self.conv.images)
        return lambda sentences: [float(s) for s in pre.similarity(image_embeds, sentences)]

    def _result(self, text: str, verdict: SafetyVerdict, prepared: Any, greedy: Any, *, aligned: bool) -> ETAResult:
        n_out = len(greedy.token_ids)
        self.timings["total"] = time.perf_counter() - self.start
        return ETAResult(
            text=text,
            verdict=verdict,
            aligned=aligned,
            usage=TokenUsage(
                input_tokens=prepared.num_prompt_tokens,
                output_tokens=n_out,
                total_tokens=prepared.num_prompt_tokens + n_out,
                decoded_tokens=n_out,
            ),
            timings=self.timings,
            finish_reason=greedy.finish_reason,
            model_name=self.eta.model_name,
        )


def _skipped(cfg: ETAConfig, side: str, reason: str) -> SafetyVerdict:
    return SafetyVerdict.combine(
        pre_threshold=cfg.pre_threshold, post_threshold=cfg.post_threshold, skipped={side: reason}
    )


def _check_stop(stop: Sequence[str] | None) -> list[str] | None:
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise InvalidInputError(f"stop must be a list of non-empty strings, got {stop!r}")
    return stop or None


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


class _StopFilter:
    """Turns a stream of text deltas into deltas that never pass a stop string.

    Holds back only the shortest tail that could still become the start of a stop string.
    """

    def __init__(self, stop: list[str] | None) -> None:
        self.stop = stop or []
        self.text = ""
        self.sent = 0
        self.done = False

    def feed(self, delta: str) -> str:
        if self.done:
            return ""
        self.text += delta
        cut = _cut_at_stop(self.text, self.stop)
        if len(cut) < len(self.text):
            self.done = True
            safe = len(cut)
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            safe = len(self.text) - hold
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out


def _iterate_callback(run: Callable[[Callable[[str], None]], Any], transform: Callable[[str], str]):
    """Run ``run(on_item)`` in a worker thread and yield what it reports; return its result."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def target() -> None:
        try:
            items.put(("done", run(lambda text: items.put(("item", text)))))
        except BaseException as e:  # re-raised in the caller's thread
            items.put(("error", e))

    worker = threading.Thread(target=target, daemon=True, name="eta-guard-search")
    worker.start()
    while True:
        kind, value = items.get()
        if kind == "item":
            out = transform(value)
            if out:
                yield out
        elif kind == "error":
            raise value
        else:
            return value


async def _iterate_in_thread(make_iter: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Drive a blocking iterator in a worker thread and yield its items on the event loop."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def target() -> None:
        try:
            for item in make_iter():
                loop.call_soon_threadsafe(items.put_nowait, ("item", item))
            loop.call_soon_threadsafe(items.put_nowait, ("done", None))
        except BaseException as e:
            loop.call_soon_threadsafe(items.put_nowait, ("error", e))

    worker = loop.run_in_executor(None, target)
    while True:
        kind, value = await items.get()
        if kind == "item":
            yield value
        elif kind == "error":
            await worker
            raise value
        else:
            await worker
            return

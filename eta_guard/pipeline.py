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
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL, ETAConfig
from eta_guard.decision import request_result, vanilla_only_reason
from eta_guard.decision import skipped as _skipped
from eta_guard.decoding.best_of_n import SentenceBestOfN
from eta_guard.decoding.stopping import cut_at_stop, stop_holdback
from eta_guard.decoding.vlm import FinishReason, GreedyOutput, PreparedPrompt, VLMAdapter
from eta_guard.errors import ETAError, EvaluatorError, InvalidInputError, RequestCancelled
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.limits import RequestLimits, check_stop_strings
from eta_guard.media import _short
from eta_guard.messages import Conversation, normalize_messages
from eta_guard.prompting import for_vlm
from eta_guard.remote_fetch import RemoteFetchPolicy
from eta_guard.verdict import ETAResult, ETAStreamChunk, SafetyVerdict

Messages = Sequence[dict[str, Any]]
logger = logging.getLogger(__name__)


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
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread holding the lock, to refuse re-entry

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
        preset: Any = None,
    ) -> ETA:
        """Load the VLM, CLIP and reward model (ids resolve through the local HF cache).

        ``vlm_kwargs`` feed ``VLMAdapter.from_pretrained`` (``model_kwargs``, ``processor_kwargs``);
        ``clip_kwargs`` / ``reward_model_kwargs`` feed the evaluators' loaders. In each,
        ``"device"`` / ``"dtype"`` place that model apart from the shared ``device`` / ``dtype``
        (``vlm_kwargs`` also takes ``"autocast_dtype"``), and ``model_kwargs`` may carry
        ``quantization_config`` / ``device_map`` (:mod:`eta_guard.placement`). ``preset="paper"``
        reproduces the paper's setup (:mod:`eta_guard.presets`); explicit arguments win over it.
        """
        from eta_guard.placement import enable_autocast, resolve_placements

        if preset is not None:
            from eta_guard.presets import get_preset

            config = get_preset(preset).apply_to_config(config)
        config = config or ETAConfig()
        place = resolve_placements(
            device=device, dtype=dtype, vlm_kwargs=vlm_kwargs, preset=preset
        )["vlm"]
        adapter = VLMAdapter.from_pretrained(
            vlm,
            device=place.device,
            dtype=place.dtype,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
            **place.kwargs,
        )
        if place.autocast_dtype is not None:
            enable_autocast(adapter.model, place.autocast_dtype)
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
            preset=preset,
        )
        return cls(adapter, evaluator, config)

    @classmethod
    def from_openai_compatible(
        cls,
        base_url: str,
        model: str,
        clip: str | None = DEFAULT_CLIP,
        reward_model: str | None = DEFAULT_REWARD_MODEL,
        *,
        api_key: str | None = None,
        config: ETAConfig | None = None,
        **kwargs: Any,
    ) -> ETA:
        """ETA with the VLM served by an OpenAI-compatible engine (vLLM, SGLang).

        ``clip`` / ``reward_model`` load locally, as in :meth:`from_pretrained`; with
        ``clip_url=`` / ``reward_model_url=`` they name models served by an engine instead (CLIP
        through ``/v1/embeddings``, a sequence-classification RM through ``/classify``).
        Other keyword arguments: ``tokenizer`` (the served VLM's tokenizer, for token-exact
        sentence ends and breaking forged control tokens), ``reward_model_tokenizer`` (the served
        RM's, to the same end), ``http`` (:class:`eta_guard.backends.HTTPSettings`),
        ``send_image_uuids`` and the local loaders' arguments of :meth:`from_pretrained`.
        Returns a :class:`eta_guard.backends.BackendETA` (see docs/scaling.md).
        """
        from eta_guard.backends.factory import eta_from_openai_compatible

        return eta_from_openai_compatible(
            base_url, model, clip, reward_model, api_key=api_key, config=config, **kwargs
        )

    @property
    def model_name(self) -> str:
        return self.vlm.name

    # ------------------------------------------------------------------ public API
    def generate(
        self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> ETAResult:
        """Answer ``messages`` safely. ``overrides`` are ``ETAConfig`` fields for this call only."""
        result = None
        for item in self._run(messages, stop, overrides, streaming=False):
            if isinstance(item, ETAResult):
                result = item
        assert result is not None
        return result

    def stream(
        self,
        messages: Messages,
        *,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> Iterator[ETAStreamChunk]:
        """Yield the answer's text as it becomes final; the last chunk carries the ``ETAResult``.

        On an image that passes the CLIP check (or a trusted text-only request) tokens stream as
        they are decoded. Otherwise the greedy answer is held back until the reward model has
        judged it; an aligned answer then streams sentence by sentence.

        ``cancel``: setting this event from another thread stops a held-back generation at its
        next token (a server whose client went away); the stream then raises
        :class:`~eta_guard.errors.RequestCancelled`. Closing the iterator stops streamed work.
        """
        for item in self._run(messages, stop, overrides, streaming=True, cancel=cancel):
            if isinstance(item, ETAResult):
                yield ETAStreamChunk(text="", result=item)
            elif item:
                yield ETAStreamChunk(text=item)

    def batch(
        self, batch: Sequence[Messages], *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> list[ETAResult]:
        """Answer several conversations (one after another: the model runs one call at a time)."""
        _check_batch(batch)
        return [self.generate(messages, stop=stop, **overrides) for messages in batch]

    async def agenerate(
        self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> ETAResult:
        """Async :meth:`generate` (runs in a worker thread; the event loop stays free)."""
        return await asyncio.to_thread(self.generate, messages, stop=stop, **overrides)

    async def abatch(
        self, batch: Sequence[Messages], *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> list[ETAResult]:
        """Async :meth:`batch`."""
        _check_batch(batch)
        return await asyncio.to_thread(self.batch, batch, stop=stop, **overrides)

    async def astream(
        self,
        messages: Messages,
        *,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> AsyncIterator[ETAStreamChunk]:
        """Async :meth:`stream`: the same chunks, produced in a worker thread."""
        async for chunk in _iterate_in_thread(
            lambda: self.stream(messages, stop=stop, cancel=cancel, **overrides)
        ):
            yield chunk

    # ------------------------------------------------------------------ the method
    def _run(
        self,
        messages: Messages,
        stop: Sequence[str] | None,
        overrides: dict[str, Any],
        *,
        streaming: bool,
        cancel: threading.Event | None = None,
    ) -> Iterator[str | ETAResult]:
        cfg = self.config.with_overrides(**overrides)
        stop = _check_stop(stop)
        conv = normalize_messages(
            messages,
            allow_remote_images=cfg.allow_remote_images,
            allow_local_image_files=cfg.allow_local_image_files,
            max_image_pixels=cfg.max_image_pixels,
            limits=RequestLimits.from_config(cfg),
            remote=RemoteFetchPolicy.from_config(cfg),
        )
        if self._owner == threading.get_ident():
            # Waiting would deadlock and running would share the model's per-call state.
            raise ETAError(
                "this ETA is already answering in this thread (a stream is still open); "
                "exhaust or close() that stream before starting another call"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield from _Request(self, conv, cfg, stop, streaming, cancel).run()
            except ETAError:
                raise
            except Exception as e:
                # A model failing mid-request (out of memory, a broken checkpoint): callers get
                # an eta_guard error whose text is safe to show a client; the cause is chained
                # and logged for operators.
                logger.error("ETA request failed", exc_info=e)
                raise ETAError(
                    f"the request failed inside the model ({type(e).__name__}; details in the log)"
                ) from e
            finally:
                self._owner = None


class _Request:
    """One ETA call: holds the per-call state so each stage stays a small method."""

    def __init__(
        self,
        eta: ETA,
        conv: Conversation,
        cfg: ETAConfig,
        stop: list[str] | None,
        streaming: bool,
        cancel: threading.Event | None = None,
    ) -> None:
        self.eta, self.conv, self.cfg, self.stop, self.streaming = eta, conv, cfg, stop, streaming
        self.cancel = cancel
        self.evaluator = eta.evaluator.with_config(cfg)
        # What the VLM sees (system text, padded images); CLIP scores self.conv's images as given.
        self.vlm_conv = for_vlm(conv, cfg, eta.vlm.processor)
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self) -> Iterator[str | ETAResult]:
        # Rendering the prompt runs no model: a prompt too long for the context is refused
        # before CLIP spends any time on the images.
        prepared = self.eta.vlm.prepare(self.vlm_conv)
        pre = self._pre_evaluate()
        reason = vanilla_only_reason(self.conv.has_images, pre, self.cfg)
        if reason is not None:
            greedy = yield from self._vanilla(prepared, stream_tokens=self.streaming)
            verdict = pre.merge(_skipped(self.cfg, "post", reason))
            yield self._vanilla_result(greedy, verdict, prepared)
            return

        greedy = yield from self._vanilla(prepared, stream_tokens=False)
        self._check_cancelled()  # a cut-short answer must never be judged or returned
        t0 = time.perf_counter()
        post = self.evaluator.evaluate_output(greedy.text)
        self.timings["post"] = time.perf_counter() - t0
        verdict = pre.merge(post)
        if not verdict.unsafe:
            yield greedy.text
            yield self._vanilla_result(greedy, verdict, prepared)
            return
        self._check_cancelled()
        yield from self._align(verdict, greedy)

    def _cancellable(self, feed: Callable[[str], str]) -> Callable[[str], str]:
        """``feed`` that first checks the cancel event (the search stops at its next sentence)."""

        def checked(text: str) -> str:
            self._check_cancelled()
            return feed(text)

        return checked

    def _check_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RequestCancelled("the call was cancelled before it finished")

    def _pre_evaluate(self) -> SafetyVerdict:
        if not self.conv.has_images:
            return _skipped(self.cfg, "pre", "no image in the request")
        t0 = time.perf_counter()
        verdict = self.evaluator.evaluate_input(self.conv.images)
        self.timings["pre"] = time.perf_counter() - t0
        return verdict

    def _vanilla(self, prepared: PreparedPrompt, *, stream_tokens: bool):
        """Greedy answer; yields its text deltas when ``stream_tokens``, returns the output."""
        t0 = time.perf_counter()
        vlm, max_new = self.eta.vlm, self.cfg.max_new_tokens
        if stream_tokens:
            stream = vlm.stream_greedy(prepared, max_new_tokens=max_new, stop=self.stop)
            try:
                for delta in stream:
                    yield delta
                    self._check_cancelled()
            finally:
                stream.close()  # stops the decoding thread when we leave early
            greedy = stream.output
        else:
            greedy = vlm.generate_greedy(
                prepared, max_new_tokens=max_new, stop=self.stop, cancel=self.cancel
            )
        self.timings["vanilla"] = time.perf_counter() - t0
        return greedy

    def _align(self, verdict: SafetyVerdict, greedy: GreedyOutput) -> Iterator[str | ETAResult]:
        cfg = self.cfg
        t0 = time.perf_counter()
        prepared = self.eta.vlm.prepare(self.vlm_conv, assistant_prefix=cfg.prefix)
        stop_filter = _StopFilter(self.stop)
        yield stop_filter.feed(cfg.prefix)
        if cfg.deep_alignment:
            try:
                tail, n_out, decoded, finish, trace = yield from self._deep(
                    prepared, greedy, stop_filter
                )
            except EvaluatorError as error:
                if cfg.on_evaluator_error == "raise":
                    raise
                # The answer was already judged unsafe: failing open here would return it, and
                # raising would leave a stream cut after the prefix. Fall back to shallow
                # alignment, continuing greedily from what was already accepted (and streamed).
                tail, n_out, decoded, finish = yield from self._shallow_fallback(stop_filter)
                trace = []
                verdict = _with_error(
                    verdict,
                    "search",
                    f"deep alignment stopped ({error}); fell back to shallow alignment "
                    "(prefix + greedy decoding)",
                )
        else:
            shallow = self.eta.vlm.generate_greedy(
                prepared, max_new_tokens=cfg.max_new_tokens, stop=self.stop, cancel=self.cancel
            )
            self._check_cancelled()
            yield stop_filter.feed(shallow.text)
            tail, n_out, trace = shallow.text, len(shallow.token_ids), []
            decoded, finish = n_out, shallow.finish_reason
        self.timings["align"] = time.perf_counter() - t0
        text, stopped = cut_at_stop(cfg.prefix + tail, self.stop)
        if len(text) > stop_filter.sent:  # the tail held back in case it began a stop string
            yield text[stop_filter.sent :]
        yield self._result(
            text,
            verdict,
            prepared,
            output_tokens=n_out,
            decoded_tokens=len(greedy.token_ids) + decoded,
            finish_reason="stop" if stopped else finish,
            vanilla_text=greedy.text,
            trace=trace,
        )

    def _deep(self, prepared: PreparedPrompt, greedy: GreedyOutput, stop_filter: _StopFilter):
        """Sentence-level best-of-N; yields accepted sentences, returns the search's figures."""
        search = SentenceBestOfN(self.eta.vlm, self.cfg)
        clip_fn = self.evaluator.sentence_scorer(self.conv.images) if self.conv.has_images else None
        # The RM keeps its cache of the instruction and the accepted text from step to step.
        with self.evaluator.reward_session(search=True) as rewards:
            output = yield from _iterate_callback(
                lambda on_sentence: search.run(
                    prepared,
                    reward_fn=rewards.score,
                    clip_fn=clip_fn,
                    # The vanilla answer's cache already holds the prompt (and the image): reuse it.
                    cache=greedy.cache,
                    cache_ids=greedy.sequence_ids,
                    on_sentence=on_sentence,
                    stop=self.stop,  # ends the search early; the filter still guards the prefix
                ),
                self._cancellable(stop_filter.feed),
            )
        n_out = len(output.token_ids)
        return output.text, n_out, output.decoded_tokens, output.finish_reason, output.trace

    def _shallow_fallback(self, stop_filter: _StopFilter):
        """Greedy continuation of the prefix and the sentences already accepted and streamed."""
        vlm, cfg = self.eta.vlm, self.cfg
        accepted = stop_filter.text[len(cfg.prefix) :]
        # The VLM's view (system text, padded images), as every other decoding of this request.
        prepared = vlm.prepare(self.vlm_conv, assistant_prefix=cfg.prefix + accepted)
        used = (
            len(vlm.tokenizer(accepted, add_special_tokens=False)["input_ids"]) if accepted else 0
        )
        budget = max(1, cfg.max_new_tokens - used)
        shallow = vlm.generate_greedy(prepared, max_new_tokens=budget, stop=self.stop)
        yield stop_filter.feed(shallow.text)
        n = len(shallow.token_ids)
        return accepted + shallow.text, n, n, shallow.finish_reason

    def _vanilla_result(
        self, greedy: GreedyOutput, verdict: SafetyVerdict, prepared: PreparedPrompt
    ) -> ETAResult:
        n = len(greedy.token_ids)
        return self._result(
            greedy.text,
            verdict,
            prepared,
            output_tokens=n,
            decoded_tokens=n,
            finish_reason=greedy.finish_reason,
        )

    def _result(
        self,
        text: str,
        verdict: SafetyVerdict,
        prepared: PreparedPrompt,
        *,
        output_tokens: int,
        decoded_tokens: int,
        finish_reason: FinishReason,
        vanilla_text: str | None = None,
        trace: list | None = None,
    ) -> ETAResult:
        return request_result(
            text=text,
            verdict=verdict,
            prompt_tokens=prepared.num_prompt_tokens,
            output_tokens=output_tokens,
            decoded_tokens=decoded_tokens,
            finish_reason=finish_reason,
            timings=self.timings,
            start=self.start,
            model_name=self.eta.model_name,
            vanilla_text=vanilla_text,
            trace=trace,
        )


def _with_error(verdict: SafetyVerdict, stage: str, message: str) -> SafetyVerdict:
    return verdict.model_copy(update={"errors": {**verdict.errors, stage: message}})


def _check_batch(batch: Any) -> None:
    if isinstance(batch, (str, dict)) or not isinstance(batch, (list, tuple)):
        raise InvalidInputError(
            f"batch must be a list of conversations (each a list of messages), got "
            f"{type(batch).__name__}"
        )


def _check_stop(stop: Sequence[str] | None) -> list[str] | None:
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise InvalidInputError(
            f"stop must be a str or a list of non-empty strings, got {type(stop).__name__}"
        )
    stop = list(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise InvalidInputError(f"stop must be a list of non-empty strings, got {_short(stop)}")
    check_stop_strings(stop)
    return stop or None


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
        cut, self.done = cut_at_stop(self.text, self.stop)
        safe = len(cut) if self.done else len(self.text) - stop_holdback(self.text, self.stop)
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out


class _Cancelled(Exception):
    """Raised inside a worker when its consumer went away, to stop the work early."""


def _iterate_callback(run: Callable[[Callable[[str], None]], Any], transform: Callable[[str], str]):
    """Run ``run(on_item)`` in a worker thread and yield what it reports; return its result.

    If the consumer stops early, the worker is cancelled at its next report and joined, so the
    model is never used by an orphan thread once the caller's lock is released.
    """
    items: queue.Queue[tuple[str, Any]] = queue.Queue()
    cancelled = threading.Event()

    def on_item(text: str) -> None:
        if cancelled.is_set():
            raise _Cancelled
        items.put(("item", text))

    def target() -> None:
        try:
            items.put(("done", run(on_item)))
        except BaseException as e:  # re-raised in the caller's thread
            items.put(("error", e))

    worker = threading.Thread(target=target, daemon=True, name="eta-guard-search")
    worker.start()
    try:
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
    finally:
        cancelled.set()
        worker.join()


async def _iterate_in_thread(make_iter: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Drive a blocking iterator in a worker thread and yield its items on the event loop.

    Closing the async iterator early closes the blocking one in its thread (releasing its locks).
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stopped = threading.Event()

    def target() -> None:
        iterator = make_iter()
        try:
            for item in iterator:
                loop.call_soon_threadsafe(items.put_nowait, ("item", item))
                if stopped.is_set():
                    break
            loop.call_soon_threadsafe(items.put_nowait, ("done", None))
        except BaseException as e:
            loop.call_soon_threadsafe(items.put_nowait, ("error", e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    worker = loop.run_in_executor(None, target)
    try:
        while True:
            kind, value = await items.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stopped.set()
        await worker

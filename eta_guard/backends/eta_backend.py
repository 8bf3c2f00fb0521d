"""``BackendETA``: ETA with the generator behind a :class:`GeneratorBackend` (e.g. a vLLM engine).

Same stages, decision rule and scoring as the local :class:`~eta_guard.pipeline.ETA` (shared code:
:mod:`eta_guard.decision`, :mod:`eta_guard.decoding.selection`), but async all the way down: the
generator is awaited over HTTP, so one process keeps many requests in flight against one engine
(no per-model lock). Evaluators run in worker threads (a local model) or over HTTP (remote ones).
Synchronous methods drive the same coroutines on a background loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from eta_guard.backends._loop import iterate_sync, run_sync
from eta_guard.backends.base import Completion, FinishReason, GeneratorBackend, SamplingStep
from eta_guard.config import ETAConfig
from eta_guard.decision import request_result, skipped, vanilla_only_reason
from eta_guard.decoding.selection import select_candidate, use_clip_term
from eta_guard.decoding.stopping import cut_at_stop
from eta_guard.errors import (
    BackendError,
    ETAError,
    EvaluatorError,
    InvalidInputError,
    RequestCancelled,
)
from eta_guard.evaluators.eta_evaluator import ETAEvaluator, RewardSession
from eta_guard.limits import RequestLimits
from eta_guard.messages import Conversation, normalize_messages
from eta_guard.pipeline import ETA, Messages, _check_batch, _check_stop, _StopFilter, _with_error
from eta_guard.prompting import for_vlm
from eta_guard.remote_fetch import RemoteFetchPolicy
from eta_guard.verdict import ETAResult, ETAStreamChunk, SafetyVerdict, SentenceTrace

logger = logging.getLogger(__name__)


class BackendETA(ETA):
    """ETA whose VLM runs behind a :class:`~eta_guard.backends.base.GeneratorBackend`.

    Build it with :meth:`ETA.from_openai_compatible` (a vLLM / SGLang engine) or directly from a
    backend and an :class:`ETAEvaluator` (local, remote or mixed evaluators). It answers like
    :class:`ETA` (``generate``, ``stream``, ``batch`` and their async forms) with the same
    :class:`ETAResult`; the async forms run concurrently.
    """

    def __init__(
        self,
        backend: GeneratorBackend,
        evaluator: ETAEvaluator,
        config: ETAConfig | None = None,
    ) -> None:
        if not isinstance(backend, GeneratorBackend):
            raise InvalidInputError(
                f"backend is {type(backend).__name__}; it needs greedy(), sample() and aclose() "
                "(see eta_guard.backends.GeneratorBackend)"
            )
        self.backend = backend
        self.vlm = None  # type: ignore[assignment]  # no local model
        self.config = config or evaluator.config or ETAConfig()
        self.evaluator = evaluator.with_config(self.config)

    @property
    def model_name(self) -> str:
        return self.backend.name

    # ----- async API (native) -----
    async def agenerate(
        self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> ETAResult:
        result = None
        async for item in self._arun(messages, stop, overrides, streaming=False):
            if isinstance(item, ETAResult):
                result = item
        assert result is not None
        return result

    async def astream(
        self,
        messages: Messages,
        *,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> AsyncIterator[ETAStreamChunk]:
        async for item in self._arun(messages, stop, overrides, streaming=True):
            if cancel is not None and cancel.is_set():  # as ETA.stream(cancel=): stop, say so
                raise RequestCancelled("the call was cancelled before it finished")
            if isinstance(item, ETAResult):
                yield ETAStreamChunk(text="", result=item)
            elif item:
                yield ETAStreamChunk(text=item)

    async def abatch(
        self, batch: Sequence[Messages], *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> list[ETAResult]:
        """Answer several conversations concurrently."""
        _check_batch(batch)
        return list(
            await asyncio.gather(*(self.agenerate(m, stop=stop, **overrides) for m in batch))
        )

    # ----- sync API (the same coroutines on a background loop) -----
    def generate(
        self, messages: Messages, *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> ETAResult:
        return run_sync(self.agenerate(messages, stop=stop, **overrides))

    def stream(
        self,
        messages: Messages,
        *,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> Iterator[ETAStreamChunk]:
        return iterate_sync(self.astream(messages, stop=stop, cancel=cancel, **overrides))

    def batch(
        self, batch: Sequence[Messages], *, stop: Sequence[str] | None = None, **overrides: Any
    ) -> list[ETAResult]:
        _check_batch(batch)
        return run_sync(self.abatch(batch, stop=stop, **overrides))

    async def aclose(self) -> None:
        """Close the backend's connections of the running loop."""
        await self.backend.aclose()

    def _run(self, *args: Any, **kwargs: Any) -> Any:  # the local pipeline's entry point
        raise NotImplementedError("BackendETA runs through _arun")

    # ----- the method -----
    async def _arun(
        self,
        messages: Messages,
        stop: Sequence[str] | None,
        overrides: dict[str, Any],
        *,
        streaming: bool,
    ) -> AsyncIterator[str | ETAResult]:
        cfg = self.config.with_overrides(**overrides)
        stop_list = _check_stop(stop)
        conv = await asyncio.to_thread(
            normalize_messages,
            messages,
            allow_remote_images=cfg.allow_remote_images,
            allow_local_image_files=cfg.allow_local_image_files,
            max_image_pixels=cfg.max_image_pixels,
            limits=RequestLimits.from_config(cfg),
            remote=RemoteFetchPolicy.from_config(cfg),
        )
        request = _BackendRequest(self, conv, cfg, stop_list, streaming)
        try:
            async for item in request.run():
                yield item
        except ETAError:
            raise
        except Exception as e:
            # As the local pipeline: a client-safe message, the cause chained and logged.
            logger.error("ETA request failed", exc_info=e)
            raise ETAError(f"the request failed ({type(e).__name__}; details in the log)") from e


class _BackendRequest:
    """One call: the stages of :class:`~eta_guard.pipeline._Request`, awaited."""

    def __init__(
        self,
        eta: BackendETA,
        conv: Conversation,
        cfg: ETAConfig,
        stop: list[str] | None,
        streaming: bool,
    ) -> None:
        self.eta, self.conv, self.cfg, self.stop, self.streaming = eta, conv, cfg, stop, streaming
        self.backend = eta.backend
        self.evaluator = eta.evaluator.with_config(cfg)
        # What the VLM sees (system text, padded images); CLIP scores self.conv's images as given.
        self.vlm_conv = for_vlm(conv, cfg, getattr(eta.backend, "processor", None))
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    async def run(self) -> AsyncIterator[str | ETAResult]:
        pre = await self._pre_evaluate()
        reason = vanilla_only_reason(self.conv.has_images, pre, self.cfg)
        t0 = time.perf_counter()
        greedy: Completion | None = None
        async for item in self.backend.greedy(
            self.vlm_conv, max_tokens=self.cfg.max_new_tokens, stop=self.stop
        ):
            if isinstance(item, Completion):
                greedy = item
            elif reason is not None and self.streaming:
                yield item  # safe image: streamed as it arrives, no hold-back
            # otherwise held back: greedy.text is released once the reward model has judged it
        self.timings["vanilla"] = time.perf_counter() - t0
        if greedy is None:
            raise BackendError(f"the generator {self.backend.name!r} ended without a result")
        if reason is not None:
            if not self.streaming:
                yield greedy.text
            yield self._result(greedy.text, pre.merge(skipped(self.cfg, "post", reason)), greedy)
            return
        t0 = time.perf_counter()
        post = await asyncio.to_thread(self.evaluator.evaluate_output, greedy.text)
        self.timings["post"] = time.perf_counter() - t0
        verdict = pre.merge(post)
        if not verdict.unsafe:
            yield greedy.text
            yield self._result(greedy.text, verdict, greedy)
            return
        async for out in self._align(verdict, greedy):
            yield out

    async def _pre_evaluate(self) -> SafetyVerdict:
        if not self.conv.has_images:
            return skipped(self.cfg, "pre", "no image in the request")
        t0 = time.perf_counter()
        verdict = await asyncio.to_thread(self.evaluator.evaluate_input, self.conv.images)
        self.timings["pre"] = time.perf_counter() - t0
        return verdict

    async def _align(
        self, verdict: SafetyVerdict, greedy: Completion
    ) -> AsyncIterator[str | ETAResult]:
        cfg = self.cfg
        t0 = time.perf_counter()
        stop_filter = _StopFilter(self.stop)
        yield stop_filter.feed(cfg.prefix)
        trace: list[SentenceTrace] = []
        if cfg.deep_alignment:
            search = _RemoteSearch(self, stop_filter)
            try:
                async for delta in search.run():
                    yield delta
                tail, n_out, decoded = search.text, search.tokens, search.decoded
                finish, trace = search.finish, search.trace
            except EvaluatorError as error:
                if cfg.on_evaluator_error == "raise":
                    raise
                # As the local pipeline: the answer was judged unsafe, so failing open would
                # return it and raising would cut a stream after the prefix. Continue greedily
                # from what was accepted (and streamed) instead, and say so in the verdict.
                shallow = None
                async for piece in self._continue(
                    cfg.prefix + search.text, cfg.max_new_tokens - search.tokens
                ):
                    if isinstance(piece, Completion):
                        shallow = piece
                    else:
                        yield stop_filter.feed(piece)
                assert shallow is not None
                tail = search.text + shallow.text
                n_out = search.tokens + shallow.num_tokens
                decoded, finish = search.decoded + shallow.num_tokens, shallow.finish_reason
                verdict = _with_error(
                    verdict,
                    "search",
                    f"deep alignment stopped ({error}); fell back to shallow alignment "
                    "(prefix + greedy decoding)",
                )
        else:
            shallow = None
            async for piece in self._continue(cfg.prefix, cfg.max_new_tokens):
                if isinstance(piece, Completion):
                    shallow = piece
                else:
                    yield stop_filter.feed(piece)
            assert shallow is not None
            tail, n_out, decoded = shallow.text, shallow.num_tokens, shallow.num_tokens
            finish = shallow.finish_reason
        self.timings["align"] = time.perf_counter() - t0
        text, stopped = cut_at_stop(cfg.prefix + tail, self.stop)
        if len(text) > stop_filter.sent:
            yield text[stop_filter.sent :]
        yield self._result(
            text,
            verdict,
            greedy,
            output_tokens=n_out,
            decoded_tokens=greedy.num_tokens + decoded,
            finish_reason="stop" if stopped else finish,
            vanilla_text=greedy.text,
            trace=trace,
        )

    def _continue(self, assistant_text: str, max_tokens: int) -> AsyncIterator[str | Completion]:
        """Greedy continuation of the assistant turn ``assistant_text``."""
        return self.backend.greedy(
            self.vlm_conv,
            assistant_text=assistant_text,
            max_tokens=max(1, max_tokens),
            stop=self.stop,
        )

    def _result(
        self,
        text: str,
        verdict: SafetyVerdict,
        greedy: Completion,
        *,
        output_tokens: int | None = None,
        decoded_tokens: int | None = None,
        finish_reason: FinishReason | None = None,
        vanilla_text: str | None = None,
        trace: list[SentenceTrace] | None = None,
    ) -> ETAResult:
        n_out = greedy.num_tokens if output_tokens is None else output_tokens
        return request_result(
            text=text,
            verdict=verdict,
            prompt_tokens=greedy.prompt_tokens,
            output_tokens=n_out,
            decoded_tokens=n_out if decoded_tokens is None else decoded_tokens,
            finish_reason=finish_reason or greedy.finish_reason,
            timings=self.timings,
            start=self.start,
            model_name=self.eta.model_name,
            vanilla_text=vanilla_text,
            trace=trace,
        )


#: vLLM takes seeds in torch.long's range (signed 64-bit) and adds the candidate's index;
#: ETAConfig allows any unsigned 64-bit seed (the local RNG's range). Steps wrap below 2**62.
_ENGINE_SEED_SPAN = 2**62


def _step_seed(seed: int, index: int) -> int:
    """The engine seed of search step ``index``: ``seed + 1000 * index``, wrapped into its range."""
    return (seed + 1000 * index) % _ENGINE_SEED_SPAN


class _RemoteSearch:
    """Sentence-level best-of-N where each step is one ``sample`` call (N candidates at once)."""

    def __init__(self, request: _BackendRequest, stop_filter: _StopFilter) -> None:
        self.request, self.cfg, self.stop_filter = request, request.cfg, stop_filter
        self.text = ""
        self.tokens = 0
        self.decoded = 0
        self.finish: FinishReason = "length"
        self.trace: list[SentenceTrace] = []

    async def run(self) -> AsyncIterator[str]:
        req = self.request
        clip_fn = (
            await asyncio.to_thread(req.evaluator.sentence_scorer, req.conv.images)
            if req.conv.has_images
            else None
        )
        # The RM keeps its cache of the instruction and the accepted text from step to step.
        with req.evaluator.reward_session(search=True) as session:
            async for delta in self._steps(session, clip_fn):
                yield delta

    async def _steps(self, session: RewardSession, clip_fn: Any) -> AsyncIterator[str]:
        req, cfg = self.request, self.cfg
        while self.tokens < cfg.max_new_tokens:
            index = len(self.trace) + 1
            step = SamplingStep(
                n=cfg.num_candidates,
                max_tokens=min(cfg.max_sentence_tokens, cfg.max_new_tokens - self.tokens),
                top_k=cfg.top_k,
                temperature=cfg.temperature,
                terminators=tuple(cfg.sentence_terminators),
                rule=cfg.sentence_end_rule,
                # One seed per step (the engine derives one per candidate from it).
                seed=None if cfg.seed is None else _step_seed(cfg.seed, index),
            )
            candidates = await req.backend.sample(
                req.vlm_conv, assistant_text=cfg.prefix + self.text, step=step
            )
            answers = [cfg.prefix + self.text + c.text for c in candidates]
            rewards = await asyncio.to_thread(session.score, answers)
            ended = [c.ended for c in candidates]
            clips = None
            if clip_fn is not None and use_clip_term(index, ended, True) and cfg.alpha > 0:
                clips = await asyncio.to_thread(clip_fn, [c.text.strip() for c in candidates])
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
            self.text += chosen.text
            self.tokens += chosen.num_tokens
            _, stopped = cut_at_stop(self.text, req.stop)
            if chosen.ended or stopped or chosen.num_tokens == 0:
                self.finish = "stop"
                break
            if chosen.finish_reason == "length" and chosen.num_tokens < step.max_tokens:
                # The engine clamps max_tokens to the room left in its context: the context
                # is full (the local search ends there too).
                break
            delta = self.stop_filter.feed(chosen.text)
            if delta:
                yield delta

"""One ETA call, as an async stage machine over a decoding session (every backend, one code path).

Stages (DESIGN.md 1.1-1.2):

1. The pre-check scores the images (cheap). If nothing can lead to alignment (no image flagged,
   or a trusted text-only request) the RM never runs and the vanilla answer streams as decoded.
2. Otherwise the vanilla (greedy) answer is decoded and held back, and the reward model judges
   it. With ``schedule="speculative"`` the aligned search starts at once, alongside the vanilla
   decode (the aligned answer depends on the prompt, the prefix, the images and the seed, never on
   the vanilla answer): when the RM clears the vanilla answer the search is cancelled and freed;
   when it flags it, the aligned answer is already partly decoded. ``"sequential"`` starts the
   search only then; both give the same result for a fixed seed.
3. Aligned answers start with the prefix (shallow alignment) and continue with the sentence-level
   best-of-N search (deep alignment), streamed sentence by sentence; if an evaluator fails inside
   the search, the answer continues greedily from what was accepted, and the verdict says so.

The caller's ``cancel`` event, or closing the iterator, stops the vanilla decode and the search.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from eta_guard.config import ETAConfig
from eta_guard.decision import request_result, skipped, vanilla_only_reason
from eta_guard.decoding.protocol import Completion, FinishReason
from eta_guard.decoding.search import BestOfNSearch
from eta_guard.decoding.stopping import AnyEvent, cut_at_stop
from eta_guard.engine.stop_filter import StopFilter
from eta_guard.engine.strip_filter import StripFilter
from eta_guard.errors import BackendError, EvaluatorError, RequestCancelled
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.messages import Conversation
from eta_guard.prompting import for_vlm
from eta_guard.sync_bridge import aclosing
from eta_guard.verdict import ETAResult, SafetyVerdict, SentenceTrace


async def open_session(backend: Any, conversation: Conversation) -> Any:
    """The backend's own decoding session, or a text-level one built on ``greedy``/``sample``."""
    opener = getattr(backend, "session", None)
    if opener is not None:
        return await opener(conversation)
    from eta_guard.backends.text_session import TextSession

    return TextSession(backend, conversation)


class Request:
    """One call: per-call state, so that each stage stays a small method.

    Iterate :meth:`run`: text deltas (``str``) as they become final, then the :class:`ETAResult`.
    """

    def __init__(
        self,
        *,
        backend: Any,
        evaluator: ETAEvaluator,
        conversation: Conversation,
        config: ETAConfig,
        stop: list[str] | None,
        streaming: bool,
        cancel: threading.Event | None,
        model_name: str,
    ) -> None:
        self.backend, self.conv, self.cfg, self.stop = backend, conversation, config, stop
        self.streaming, self.cancel, self.model_name = streaming, cancel, model_name
        self.evaluator = evaluator.with_config(config)
        # What the VLM sees (system text, padded images); CLIP scores self.conv's images as given.
        self.vlm_conv = for_vlm(conversation, config, getattr(backend, "processor", None))
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()
        self.session: Any = None
        self.search: _SearchRun | None = None
        self._vanilla_started = asyncio.Event()

    async def run(self) -> AsyncIterator[str | ETAResult]:
        # Rendering the prompt runs no model: a prompt too long for the context is refused
        # before the pre-check spends any time on the images.
        self.session = await open_session(self.backend, self.vlm_conv)
        try:
            async with aclosing(self._stages()) as items:
                async for item in items:
                    yield item
        finally:
            if self.search is not None:
                await self.search.cancel()
            await self.session.aclose()

    async def _stages(self) -> AsyncIterator[str | ETAResult]:
        pre = await self._pre_evaluate()
        reason = vanilla_only_reason(self.conv.has_images, pre, self.cfg)
        if reason is not None:
            greedy = None
            async with aclosing(
                self._vanilla(stream_tokens=self.streaming, keep_prompt=False)
            ) as items:
                async for item in items:
                    if isinstance(item, Completion):
                        greedy = item
                    else:
                        yield item
            assert greedy is not None
            if not self.streaming:
                yield greedy.text
            yield self._result(greedy.text, pre.merge(skipped(self.cfg, "post", reason)), greedy)
            return

        schedule = self.cfg.schedule
        if schedule == "auto":
            schedule = getattr(self.backend, "preferred_schedule", "speculative")
        if self.cfg.deep_alignment and schedule == "speculative":
            # Alongside the vanilla decode, opened once the vanilla's decoding has been asked
            # for (a local session then hands the search the vanilla's prompt KV).
            self.search = _SearchRun(self, after=self._vanilla_started)
        greedy = None
        async with aclosing(self._vanilla(stream_tokens=False, keep_prompt=True)) as items:
            async for item in items:
                if isinstance(item, Completion):
                    greedy = item
        assert greedy is not None
        self._check_cancelled()  # a cut-short answer must never be judged or returned
        t0 = time.perf_counter()
        post = await self.evaluator.aevaluate_output(greedy.text, conversation=self.conv)
        self.timings["post"] = time.perf_counter() - t0
        verdict = pre.merge(post)
        if not verdict.unsafe:
            if self.search is not None:  # speculation lost: free what the search holds
                self.timings["speculation"] = await self.search.cancel()
                self.search = None
            yield greedy.text
            yield self._result(greedy.text, verdict, greedy)
            return
        self._check_cancelled()
        async with aclosing(self._align(verdict, greedy)) as items:
            async for out in items:
                yield out

    def _check_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RequestCancelled("the call was cancelled before it finished")

    async def _pre_evaluate(self) -> SafetyVerdict:
        if not self.conv.has_images and self.cfg.text_only_policy != "guard":
            return skipped(self.cfg, "pre", "no image in the request")
        t0 = time.perf_counter()
        verdict = await self.evaluator.aevaluate_input(self.conv.images, conversation=self.conv)
        self.timings["pre"] = time.perf_counter() - t0
        return verdict

    async def _vanilla(
        self, *, stream_tokens: bool, keep_prompt: bool
    ) -> AsyncIterator[str | Completion]:
        """The greedy answer: its deltas when ``stream_tokens``, then its :class:`Completion`."""
        t0 = time.perf_counter()
        greedy = None
        strip = StripFilter()  # the reference strips the vanilla answer it judges and returns
        stream = self.session.greedy(
            max_tokens=self.cfg.max_new_tokens,
            stop=self.stop,
            cancel=self.cancel,
            keep_prompt=keep_prompt,
            deltas=stream_tokens,
        )
        self._vanilla_started.set()
        async with aclosing(stream) as items:
            async for item in items:
                self._check_cancelled()
                if isinstance(item, Completion):
                    greedy = item
                elif stream_tokens and (piece := strip.feed(item)):
                    yield piece  # otherwise held back until the reward model has judged it
        self._check_cancelled()
        if greedy is None:
            raise BackendError(f"the generator {self.model_name!r} ended without a result")
        self.timings["vanilla"] = time.perf_counter() - t0
        yield dataclasses.replace(greedy, text=greedy.text.strip())

    async def _align(
        self, verdict: SafetyVerdict, greedy: Completion
    ) -> AsyncIterator[str | ETAResult]:
        cfg = self.cfg
        t0 = time.perf_counter()
        stop_filter, strip = StopFilter(self.stop), StripFilter()  # the reference strips it too

        def emit(delta: str) -> str:
            return strip.feed(stop_filter.feed(delta))

        yield emit(cfg.prefix)
        trace: list[SentenceTrace] = []
        if cfg.deep_alignment:
            search = self.search or _SearchRun(self)
            self.search = search
            try:
                async with aclosing(search.deltas()) as items:
                    async for delta in items:
                        self._check_cancelled()
                        yield emit(delta)
                tail, n_out, decoded = search.text, search.tokens, search.decoded
                finish, trace = search.finish_reason, search.trace
            except EvaluatorError as error:
                if cfg.on_evaluator_error == "raise":
                    raise
                # The answer was already judged unsafe: failing open would return it, and
                # raising would cut a stream after the prefix. Continue greedily from what was
                # accepted (and streamed) instead, and say so in the verdict.
                shallow = None
                async with aclosing(
                    self._continue(cfg.prefix + search.text, cfg.max_new_tokens - search.tokens)
                ) as items:
                    async for piece in items:
                        if isinstance(piece, Completion):
                            shallow = piece
                        else:
                            yield emit(piece)
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
            async with aclosing(self._continue(cfg.prefix, cfg.max_new_tokens)) as items:
                async for piece in items:
                    if isinstance(piece, Completion):
                        shallow = piece
                    else:
                        yield emit(piece)
            assert shallow is not None
            tail, n_out, decoded = shallow.text, shallow.num_tokens, shallow.num_tokens
            finish = shallow.finish_reason
        self.timings["align"] = time.perf_counter() - t0
        text, stopped = cut_at_stop(cfg.prefix + tail, self.stop)
        if len(text) > stop_filter.sent:  # the tail held back in case it began a stop string
            yield strip.feed(text[stop_filter.sent :])
        yield self._result(
            text.strip(),
            verdict,
            greedy,
            output_tokens=n_out,
            decoded_tokens=greedy.num_tokens + decoded,
            finish_reason="stop" if stopped else finish,
            vanilla_text=greedy.text,
            trace=trace,
        )

    async def _continue(self, assistant_text: str, max_tokens: int) -> AsyncIterator[Any]:
        """Greedy continuation of the assistant turn ``assistant_text``."""
        async with aclosing(
            self.session.greedy(
                assistant_text=assistant_text,
                max_tokens=max(1, max_tokens),
                stop=self.stop,
                cancel=self.cancel,
            )
        ) as items:
            async for piece in items:
                self._check_cancelled()
                yield piece

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
            model_name=self.model_name,
            vanilla_text=vanilla_text,
            trace=trace,
        )


class _SearchRun:
    """The best-of-N search of one request, running as a task from the moment it is created.

    Its settled text is buffered until :meth:`deltas` reads it (a speculative search streams
    nothing before the reward model has flagged the vanilla answer); :meth:`cancel` stops it and
    frees the handle. The figures of :class:`BestOfNSearch` are copied once it ends.
    """

    def __init__(self, request: Request, *, after: asyncio.Event | None = None) -> None:
        self.request, self._after = request, after
        self.text, self.tokens, self.decoded = "", 0, 0
        self.finish_reason: FinishReason = "length"
        self.trace: list[SentenceTrace] = []
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stop = threading.Event()  # the search's own: cancelling it leaves the request alone
        self._started = time.perf_counter()
        self._task = asyncio.ensure_future(self._work())

    async def _work(self) -> None:
        req, cfg = self.request, self.request.cfg
        handle = None
        search = None
        # The RM keeps its cache of the instruction and the accepted text from step to step.
        rewards = req.evaluator.reward_session(search=True)
        try:
            if self._after is not None:
                await self._after.wait()
            handle = await req.session.search(
                assistant_text=cfg.prefix, seed=cfg.seed, cancel=AnyEvent(self._stop, req.cancel)
            )
            clip = None
            if req.conv.has_images:
                # Checks the images (no model runs until the first score).
                clip_fn = await asyncio.to_thread(req.evaluator.sentence_scorer, req.conv.images)
                clip = _in_thread(clip_fn)
            search = BestOfNSearch(
                handle,
                cfg,
                prefix=cfg.prefix,
                reward=_in_thread(lambda answers: rewards.score([a.strip() for a in answers])),
                clip=clip,
                stop=req.stop,
            )
            async with aclosing(search.run()) as items:
                async for delta in items:
                    self._queue.put_nowait(("delta", delta))
            self._queue.put_nowait(("done", None))
        except BaseException as e:  # handed to the reader (cancellation included)
            self._queue.put_nowait(("error", e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            if search is not None:
                # Mid-search (an evaluator failed): what was accepted so far, for the fallback.
                text = search.text
                if not text and handle is not None:
                    text = cut_at_stop(handle.text, req.stop or [])[0]
                self.text, self.tokens, self.decoded = text, search.tokens, search.decoded
                self.finish_reason, self.trace = search.finish_reason, search.trace
                self.request.timings["reward_search"] = search.timings["reward"]
                self.request.timings["clip_search"] = search.timings["clip"]
            elif handle is not None:
                self.text = handle.text
            if handle is not None:
                await handle.aclose()
            rewards.close()

    async def deltas(self) -> AsyncIterator[str]:
        """The search's text as it settles (what was buffered first); raises what the search raised."""
        while True:
            kind, value = await self._queue.get()
            if kind == "delta":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    async def cancel(self) -> float:
        """Stop the search, wait until it let go of everything; returns the seconds it ran."""
        self._stop.set()
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        return time.perf_counter() - self._started


def _in_thread(fn: Any, **kwargs: Any) -> Any:
    """A blocking scorer as an awaitable one, called from a worker thread so the event loop stays
    free; the evaluator runs a local model's forward on its model thread, a remote one's HTTP
    call in that worker (:meth:`ETAEvaluator.aevaluate`)."""

    async def score(texts: list[str]) -> Any:
        return await asyncio.to_thread(fn, texts, **kwargs)

    return score


def _with_error(verdict: SafetyVerdict, stage: str, message: str) -> SafetyVerdict:
    return verdict.model_copy(update={"errors": {**verdict.errors, stage: message}})

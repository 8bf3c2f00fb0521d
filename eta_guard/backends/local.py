"""The generator in this process: a :class:`~eta_guard.decoding.vlm.VLMAdapter` behind the backend interface.

Every request's decoding runs through the model's one
:class:`~eta_guard.backends.decode_scheduler.DecodeScheduler` (a
:class:`~eta_guard.backends.step_batcher.StepBatcher` stepped on the model thread): concurrent
requests share each batched forward, and so do a request's vanilla row and its speculative
search's candidate rows. Each request opens a :class:`LocalSession`: the prompt is rendered once
(a prompt too long for the context is refused before any model runs) and prefilled once (its
images encoded once); the vanilla answer, a greedy continuation and the best-of-N search all
continue from that prefill's KV, so the search's result does not depend on when it started.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from eta_guard.backends.decode_scheduler import scheduler_for
from eta_guard.backends.local_search import LocalSearch
from eta_guard.decoding.protocol import Completion, SamplingStep
from eta_guard.decoding.stopping import AnyEvent, cut_at_stop, stop_holdback
from eta_guard.model_thread import model_thread
from eta_guard.sync_bridge import aclosing

if TYPE_CHECKING:
    from eta_guard.backends.step_batcher import Context
    from eta_guard.decoding.vlm import PreparedPrompt, VLMAdapter
    from eta_guard.messages import Conversation


class LocalBackend:
    """A :class:`~eta_guard.backends.base.GeneratorBackend` over a local VLM.

    Args:
        adapter: the loaded VLM (``VLMAdapter.from_pretrained(...)``).
        max_rows: the most rows (every request's vanilla row and search candidates) in one
            batched forward (``None``: the scheduler's default,
            :data:`~eta_guard.backends.decode_scheduler.DEFAULT_MAX_ROWS`).
        kv_budget_bytes: the most KV bytes those rows may hold (``None``:
            :func:`~eta_guard.backends.decode_scheduler.default_kv_budget`); rows over either
            bound wait for a later step, never fail.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        *,
        max_rows: int | None = None,
        kv_budget_bytes: int | None = None,
    ) -> None:
        self.adapter = adapter
        self.name = adapter.name
        # One scheduler (and lock) per loaded model, shared by every backend and ETA built on it.
        self.scheduler = scheduler_for(adapter, max_rows=max_rows, kv_budget_bytes=kv_budget_bytes)
        self.lock = self.scheduler.lock

    @property
    def preferred_schedule(self) -> str:
        """What ``schedule="auto"`` means here (docs/engine.md, from ``eta-guard bench``).

        On an accelerator, speculative: the search's candidate rows ride in the vanilla row's
        forwards (critical path 1.10x plain generate's forwards against 2.09x sequentially), and
        a memory-bound step reads the weights once for all rows. On a CPU, sequential: decoding
        is compute-bound, so those rows cost compute; speculating saved 26% of the unsafe path
        (2.50x vs 3.37x plain generate) but cost 1.58x on a flagged image whose answer was
        then cleared, which is the common case in benign traffic.
        """
        device = getattr(self.adapter, "device", None)
        return "speculative" if getattr(device, "type", "cpu") != "cpu" else "sequential"

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    async def session(self, conversation: Conversation) -> LocalSession:
        """Open one request's decoding; renders (and length-checks) the prompt."""
        prepared = await model_thread(self.adapter.device).acall(self.adapter.prepare, conversation)
        return LocalSession(self, conversation, prepared)

    async def greedy(
        self,
        conversation: Conversation,
        *,
        assistant_text: str = "",
        max_tokens: int,
        stop: Sequence[str] | None = None,
    ) -> AsyncIterator[str | Completion]:
        session = await self.session(conversation)
        try:
            async with aclosing(
                session.greedy(assistant_text=assistant_text, max_tokens=max_tokens, stop=stop)
            ) as items:
                async for item in items:
                    yield item
        finally:
            await session.aclose()

    async def sample(
        self, conversation: Conversation, *, assistant_text: str, step: SamplingStep
    ) -> list[Completion]:
        session = await self.session(conversation)
        search = await session.search(assistant_text=assistant_text, seed=step.seed)
        try:
            return await search.sample(step)
        finally:
            await search.aclose()
            await session.aclose()

    async def aclose(self) -> None:
        return None


class LocalSession:
    """One request on a :class:`LocalBackend` (see the module docstring)."""

    def __init__(
        self, backend: LocalBackend, conversation: Conversation, prepared: PreparedPrompt
    ) -> None:
        self.backend, self.adapter = backend, backend.adapter
        self.scheduler = backend.scheduler
        self.conversation, self.prepared = conversation, prepared
        self._prompt: asyncio.Future[Context] | None = None  # the prompt's prefill, once
        self._searches: list[LocalSearch] = []

    async def prompt_context(self) -> Context:
        """The prompt's KV (one prefill per request, shared by every decode of the request)."""
        if self._prompt is None:
            self._prompt = asyncio.ensure_future(self.scheduler.prefill(self.prepared.model_inputs))
        return await asyncio.shield(self._prompt)

    async def context_for(self, prepared: PreparedPrompt, *, pending: bool) -> Context:
        """A context for ``prepared``: the prompt's KV extended with the ids after it (the
        assistant text), or a prefill of its own when it does not continue the prompt."""
        ours = self.prepared.input_ids[0].tolist()
        ids = prepared.input_ids[0].tolist()
        prompt = await self.prompt_context()
        if ids[: len(ours)] == ours and len(ids) > len(ours):
            return await self.scheduler.extend(prompt, ids[len(ours) :], pending=pending)
        if ids == ours:
            return prompt
        return await self.scheduler.prefill(prepared.model_inputs)

    def greedy(
        self,
        *,
        assistant_text: str = "",
        max_tokens: int,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        keep_prompt: bool = False,
        deltas: bool = True,
    ) -> AsyncIterator[str | Completion]:
        """Greedy deltas, then the :class:`Completion` (``keep_prompt``: accepted for the
        interface; the prompt's KV is always kept for the request's search). ``deltas=False``:
        the text comes in one piece at the end, and no token crosses to the event loop while
        the model decodes (that hop, and decoding the text so far, cost a held-back answer
        about 0.5 ms per token on a 2-core CPU, docs/benchmark.md)."""
        return self._greedy(assistant_text, max_tokens, stop, cancel, deltas)

    async def _greedy(
        self,
        assistant_text: str,
        max_tokens: int,
        stop: Sequence[str] | None,
        cancel: threading.Event | None,
        deltas: bool,
    ) -> AsyncIterator[str | Completion]:
        adapter = self.adapter
        prepared = self.prepared
        if assistant_text:
            prepared = await model_thread(self.adapter.device).acall(
                adapter.prepare, self.conversation, assistant_prefix=assistant_text
            )
        context = await self.context_for(prepared, pending=False)
        stops = [s for s in (stop or []) if s]
        max_new = adapter.max_new_tokens_for(prepared, max_tokens)
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        job = await self.scheduler.submit(
            context,
            max_new_tokens=max_new,
            stop=_stop_strings(adapter.tokenizer, stops),
            logits_processor=(
                adapter.json_constraint().logits_processor(prepared.response_format)
                if prepared.response_format
                else None
            ),
            cancel=AnyEvent(cancel),
            on_token=(lambda _row, token: tokens.put_nowait(token)) if deltas else None,
        )
        job.on_done(lambda: tokens.put_nowait(None))
        prompt_ids = prepared.input_ids[0]
        ids: list[int] = []
        emitted = ""
        try:
            while (token := await tokens.get()) is not None:
                ids.append(token)
                text, stopped = cut_at_stop(adapter.decode_continuation(prompt_ids, ids), stops)
                safe = text if stopped else text[: len(text) - stop_holdback(text, stops)]
                if len(safe) > len(emitted) and safe.startswith(emitted):
                    delta, emitted = safe[len(emitted) :], safe
                    yield delta
            ids = list((await job.wait()).rows[0].new)  # raises the job's error, or cancelled
        finally:
            await job.cancel()  # a no-op once it ended; else frees its row at the next step
        text, stopped = cut_at_stop(adapter.decode_continuation(prompt_ids, ids), stops)
        if text.startswith(emitted) and len(text) > len(emitted):
            yield text[len(emitted) :]
        eos = set(adapter.eos_token_ids)
        ended = bool(ids) and ids[-1] in eos
        yield Completion(
            text=text,
            num_tokens=len(ids),
            finish_reason="stop" if stopped or ended or len(ids) < max_new else "length",
            ended=ended,
            prompt_tokens=prepared.num_prompt_tokens,
            token_ids=tuple(ids),
        )

    async def search(
        self, *, assistant_text: str, seed: int | None, cancel: threading.Event | None = None
    ) -> LocalSearch:
        prepared = await model_thread(self.adapter.device).acall(
            self.adapter.prepare, self.conversation, assistant_prefix=assistant_text
        )
        search = LocalSearch(
            self.adapter,
            prepared,
            seed=seed,
            scheduler=self.scheduler,
            context=lambda: self.context_for(prepared, pending=True),
            cancel=cancel,
        )
        self._searches.append(search)
        return search

    async def aclose(self) -> None:
        for search in self._searches:
            await search.aclose()
        self._searches.clear()
        if self._prompt is not None:
            prompt, self._prompt = self._prompt, None
            await asyncio.wait([prompt])  # a prefill in flight ends on the model thread first
            if not prompt.cancelled():
                prompt.exception()  # retrieved: its error was raised to whoever awaited it


def _stop_strings(tokenizer: Any, stops: list[str]) -> Any:
    """transformers' ``StopStringCriteria`` for ``stops`` (None without any), as ``generate``'s
    ``stop_strings`` builds it: a row stops once its text ends with a stop string."""
    if not stops:
        return None
    from transformers import StopStringCriteria

    return StopStringCriteria(tokenizer=tokenizer, stop_strings=stops)

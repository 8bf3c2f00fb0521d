"""The generator in this process: a :class:`~eta_guard.decoding.vlm.VLMAdapter` behind the backend interface.

Each request opens a :class:`LocalSession`: the prompt is rendered once (a prompt too long for
the context is refused before any model runs), the vanilla answer streams from a worker thread,
and the best-of-N search continues from the prompt's KV cache instead of prefilling it (and its
images) again: from the vanilla answer's cache once it is done, or, when the search starts
alongside the vanilla decode (speculative alignment), from a copy taken right after the prompt's
prefill. Both hold exactly the prompt's KV, computed by the same forward, so the search's result
does not depend on when it started. Model calls take the adapter's lock (the model keeps
per-call state).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from eta_guard.decoding.best_of_n import LocalSearch
from eta_guard.decoding.protocol import Completion, SamplingStep
from eta_guard.sync_bridge import aclosing, aiter_in_thread

if TYPE_CHECKING:
    from eta_guard.decoding.vlm import PreparedPrompt, VLMAdapter
    from eta_guard.messages import Conversation


class LocalBackend:
    """A :class:`~eta_guard.backends.base.GeneratorBackend` over a local VLM.

    Args:
        adapter: the loaded VLM (``VLMAdapter.from_pretrained(...)``).
    """

    #: What ``schedule="auto"`` means here: one forward at a time (the lock), so a speculative
    #: search would only compete with the reward model for the cores (docs/engine.md).
    preferred_schedule = "sequential"

    def __init__(self, adapter: VLMAdapter) -> None:
        self.adapter = adapter
        self.name = adapter.name
        # One lock per loaded model, shared by every backend and ETA built on it.
        self.lock = getattr(adapter, "lock", None) or threading.RLock()

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    async def session(self, conversation: Conversation) -> LocalSession:
        """Open one request's decoding; renders (and length-checks) the prompt."""
        prepared = await asyncio.to_thread(self.adapter.prepare, conversation)
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
        self.conversation, self.prepared = conversation, prepared
        # The prompt's KV for the search: a copy taken after the vanilla's prefill, or the
        # vanilla's own cache once it finished; None until either exists.
        self._prompt_cache: asyncio.Future[Any] | None = None
        self._searches: list[LocalSearch] = []

    def greedy(
        self,
        *,
        assistant_text: str = "",
        max_tokens: int,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        keep_prompt: bool = False,
    ) -> AsyncIterator[str | Completion]:
        # Not a generator itself: the promise of the prompt's KV exists from this call on, so a
        # search opened right after (speculation) waits for it instead of prefilling its own.
        loop = asyncio.get_running_loop()
        vanilla = keep_prompt and not assistant_text and self._prompt_cache is None
        if vanilla:
            self._prompt_cache = loop.create_future()
        future = self._prompt_cache if vanilla else None
        return self._greedy(loop, future, assistant_text, max_tokens, stop, cancel)

    async def _greedy(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future | None,
        assistant_text: str,
        max_tokens: int,
        stop: Sequence[str] | None,
        cancel: threading.Event | None,
    ) -> AsyncIterator[str | Completion]:

        def offer(cache: Any) -> None:  # called in the decoding thread
            loop.call_soon_threadsafe(_resolve, future, cache)

        def run() -> Iterator[str | Completion]:
            adapter = self.adapter
            with self.backend.lock:
                prepared = (
                    self.prepared
                    if not assistant_text
                    else adapter.prepare(self.conversation, assistant_prefix=assistant_text)
                )
                stream = adapter.stream_greedy(
                    prepared,
                    max_new_tokens=max_tokens,
                    stop=stop,
                    cancel=cancel,
                    on_prompt_cached=offer if future is not None else None,
                )
                yield from stream  # deltas as the tokens are decoded
                out = stream.output
                assert out is not None
                eos = set(adapter.eos_token_ids)
                yield Completion(
                    text=out.text,
                    num_tokens=len(out.token_ids),
                    finish_reason=out.finish_reason,
                    ended=bool(out.token_ids) and out.token_ids[-1] in eos,
                    prompt_tokens=prepared.num_prompt_tokens,
                    token_ids=tuple(out.token_ids),
                )

        try:
            async with aclosing(aiter_in_thread(run)) as items:
                async for item in items:
                    yield item
        finally:
            if future is not None:
                _resolve(future, None)  # no snapshot (failed or cancelled before the prefill)

    async def search(
        self, *, assistant_text: str, seed: int | None, cancel: threading.Event | None = None
    ) -> LocalSearch:
        prepared = await asyncio.to_thread(
            self.adapter.prepare, self.conversation, assistant_prefix=assistant_text
        )
        cache = None
        if self._prompt_cache is not None:
            cache = await self._prompt_cache
            self._prompt_cache = None  # the search consumes (mutates) it
        search = LocalSearch(
            self.adapter,
            prepared,
            seed=seed,
            cache=cache,
            # Only the prompt is trusted from the cache: the search then computes the same
            # KV whether the cache came from the vanilla's prefill or its whole answer.
            cache_ids=self.prepared.input_ids[0].tolist() if cache is not None else None,
            lock=self.backend.lock,
            cancel=cancel,
        )
        self._searches.append(search)
        return search

    async def aclose(self) -> None:
        for search in self._searches:
            await search.aclose()
        self._searches.clear()
        if self._prompt_cache is not None and not self._prompt_cache.done():
            self._prompt_cache.cancel()
        self._prompt_cache = None


def _resolve(future: asyncio.Future | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)

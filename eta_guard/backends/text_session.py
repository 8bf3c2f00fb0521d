"""A :class:`~eta_guard.backends.base.DecodingSession` for any backend, built on its ``greedy`` and ``sample``.

Used for engines behind an HTTP API (vLLM, SGLang): every call sends the conversation and what
the search accepted so far, and the engine's prefix cache does the reuse. Two ways to continue:

- **from exact token ids** (:class:`TokenSearch`), when the backend offers it for the
  conversation (:class:`TokenBackend`; an OpenAI-compatible vLLM engine for text-only requests):
  the context is the engine's own ids of the generation prompt, then the assistant prefix
  tokenized alone, then the ids the engine sampled for each accepted sentence, as the reference
  builds it. Nothing is tokenized again. Greedy continuations of an assistant text (shallow
  alignment, the fallback after a failed search) start from ids the same way.
- **from text** (:class:`TextSearch`) otherwise (requests with images: the chat API takes no
  token ids alongside images): the engine re-tokenizes the prefix and the accepted text at every
  step, which may give other ids than those sampled (docs/paper-setup.md, section 6).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from eta_guard.decoding.protocol import Completion, SamplingStep
from eta_guard.errors import BackendError, InvalidInputError

if TYPE_CHECKING:
    from eta_guard.backends.base import GeneratorBackend
    from eta_guard.messages import Conversation


class TokenIdsUnavailable(BackendError):
    """The engine turned out unable to continue from token ids; the search may continue from text."""


@dataclass(frozen=True)
class TokenContext:
    """Where a search starts, as token ids: the prompt, then the assistant text it continues.

    Attributes:
        ids: the ids the first step continues (generation prompt + assistant prefix).
        max_model_len: the engine's context length, when it says (bounds the search's room).
    """

    ids: tuple[int, ...]
    max_model_len: int | None = None


@runtime_checkable
class TokenBackend(Protocol):
    """A backend that can continue a search from exact token ids."""

    async def token_context(
        self, conversation: Conversation, assistant_text: str
    ) -> TokenContext | None:
        """The ids a search of ``conversation`` after ``assistant_text`` starts from; None when
        this conversation cannot be continued from ids (the search then continues from text)."""
        ...

    async def sample_tokens(
        self, prompt_ids: Sequence[int], step: SamplingStep
    ) -> list[Completion]:
        """One best-of-N step continuing ``prompt_ids``; each candidate carries its ``token_ids``."""
        ...

    def greedy_tokens(
        self, prompt_ids: Sequence[int], *, max_tokens: int, stop: Sequence[str] | None = None
    ) -> AsyncIterator[str | Completion]:
        """Greedy continuation of ``prompt_ids``: text deltas, then the :class:`Completion`."""
        ...


class TextSession:
    """The conversation and its backend; stateless between calls."""

    def __init__(self, backend: GeneratorBackend, conversation: Conversation) -> None:
        self.backend, self.conversation = backend, conversation
        self._search: TokenSearch | None = None  # the last search from ids, for continuations

    def greedy(
        self,
        *,
        assistant_text: str = "",
        max_tokens: int,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,  # the caller checks it between deltas
        keep_prompt: bool = False,  # the engine's prefix cache keeps it
        deltas: bool = True,  # an engine's stream costs nothing per token here
    ) -> AsyncIterator[str | Completion]:
        if assistant_text and isinstance(self.backend, TokenBackend):
            return self._continue(self.backend, assistant_text, max_tokens, stop)
        return self.backend.greedy(
            self.conversation, assistant_text=assistant_text, max_tokens=max_tokens, stop=stop
        )

    async def _continue(
        self,
        backend: TokenBackend,
        assistant_text: str,
        max_tokens: int,
        stop: Sequence[str] | None,
    ) -> AsyncIterator[str | Completion]:
        """A greedy continuation of ``assistant_text`` from ids where the backend takes them: the
        last search's exact ids when it is their text (the fallback after a failed search), else
        the prompt's ids and ``assistant_text`` tokenized alone (shallow alignment)."""
        search = self._search
        if (
            search is not None
            and search.exact
            and search.start_text + search.text == assistant_text
        ):
            ids: Sequence[int] | None = search.ids
        else:
            context = await backend.token_context(self.conversation, assistant_text)
            ids = None if context is None else context.ids
        if ids is None:
            stream = self.backend.greedy(
                self.conversation, assistant_text=assistant_text, max_tokens=max_tokens, stop=stop
            )
        else:
            stream = backend.greedy_tokens(tuple(ids), max_tokens=max_tokens, stop=stop)
        async for item in stream:
            yield item

    async def search(
        self, *, assistant_text: str, seed: int | None, cancel: threading.Event | None = None
    ) -> TextSearch | TokenSearch:
        if isinstance(self.backend, TokenBackend):
            context = await self.backend.token_context(self.conversation, assistant_text)
            if context is not None:
                text = lambda: TextSearch(self.backend, self.conversation, assistant_text)  # noqa: E731
                self._search = TokenSearch(
                    self.backend, context, start_text=assistant_text, fallback=text
                )
                return self._search
        return TextSearch(self.backend, self.conversation, assistant_text)

    async def aclose(self) -> None:
        return None


class TextSearch:
    """A search handle that resends the assistant text so far at every step (``sample``)."""

    def __init__(
        self, backend: GeneratorBackend, conversation: Conversation, assistant_text: str
    ) -> None:
        self.backend, self.conversation, self.assistant_text = backend, conversation, assistant_text
        self._text = ""
        self._last: list[Completion] | None = None

    @property
    def text(self) -> str:
        return self._text

    @property
    def room(self) -> int | None:
        return None  # the engine clamps each request to its context and says "length"

    async def sample(self, step: SamplingStep) -> list[Completion]:
        self._last = await self.backend.sample(
            self.conversation, assistant_text=self.assistant_text + self._text, step=step
        )
        return self._last

    async def commit(self, index: int) -> None:
        self._text += _chosen(self._last, index).text
        self._last = None

    async def aclose(self) -> None:
        self._last = None  # an in-flight sample() is cancelled with the task awaiting it


class TokenSearch:
    """A search handle that sends the exact ids so far at every step (``sample_tokens``).

    ``ids`` is the context the next step continues: the start's ids, then each committed
    candidate's sampled ids as the engine returned them. ``text`` is the committed candidates'
    texts (each decoded by the engine in its context).
    """

    def __init__(
        self,
        backend: TokenBackend,
        context: TokenContext,
        *,
        start_text: str = "",
        fallback: Callable[[], TextSearch] | None = None,
    ) -> None:
        self.backend, self._fallback, self.start_text = backend, fallback, start_text
        self._delegate: TextSearch | None = None
        self.ids: list[int] = list(context.ids)
        self._start = len(self.ids)
        self._room = (
            None if context.max_model_len is None else max(0, context.max_model_len - len(self.ids))
        )
        self._text = ""
        self._last: list[Completion] | None = None

    @property
    def text(self) -> str:
        return self._delegate.text if self._delegate is not None else self._text

    @property
    def room(self) -> int | None:
        return self._room  # tokens the answer may still take, counted from the start

    @property
    def exact(self) -> bool:
        """Whether ``ids`` is the context (False once the search went on from text)."""
        return self._delegate is None

    async def sample(self, step: SamplingStep) -> list[Completion]:
        if self._delegate is not None:
            return await self._delegate.sample(step)
        try:
            self._last = await self.backend.sample_tokens(tuple(self.ids), step)
        except TokenIdsUnavailable:
            # Found at the first step (nothing accepted yet): the whole search goes by text.
            if self._fallback is None or len(self.ids) > self._start:
                raise
            self._delegate = self._fallback()
            return await self._delegate.sample(step)
        return self._last

    async def commit(self, index: int) -> None:
        if self._delegate is not None:
            return await self._delegate.commit(index)
        chosen = _chosen(self._last, index)
        if chosen.token_ids is None:
            raise BackendError(
                "the engine returned a candidate without its token ids; the search cannot "
                "continue from exact ids (pass continue_from_ids=False for this engine)"
            )
        self.ids.extend(chosen.token_ids)
        self._text += chosen.text
        self._last = None

    async def aclose(self) -> None:
        self._last = None
        if self._delegate is not None:
            await self._delegate.aclose()


def _chosen(last: list[Completion] | None, index: int) -> Completion:
    if last is None or not 0 <= index < len(last):
        raise InvalidInputError(f"commit({index!r}): no such candidate in the last sample")
    return last[index]


__all__ = [
    "TextSearch",
    "TextSession",
    "TokenBackend",
    "TokenContext",
    "TokenIdsUnavailable",
    "TokenSearch",
]

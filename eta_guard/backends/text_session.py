"""A :class:`~eta_guard.backends.base.DecodingSession` for any backend, built on its ``greedy`` and ``sample``.

Used for engines behind an HTTP API (vLLM, SGLang): every call sends the conversation and the
assistant text so far, and the engine's prefix cache does the reuse. The search's accepted text
is the concatenation of the committed candidates' texts.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from eta_guard.decoding.protocol import Completion, SamplingStep
from eta_guard.errors import InvalidInputError

if TYPE_CHECKING:
    from eta_guard.backends.base import GeneratorBackend
    from eta_guard.messages import Conversation


class TextSession:
    """The conversation and its backend; stateless between calls."""

    def __init__(self, backend: GeneratorBackend, conversation: Conversation) -> None:
        self.backend, self.conversation = backend, conversation

    def greedy(
        self,
        *,
        assistant_text: str = "",
        max_tokens: int,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,  # the caller checks it between deltas
        keep_prompt: bool = False,  # the engine's prefix cache keeps it
    ) -> AsyncIterator[str | Completion]:
        return self.backend.greedy(
            self.conversation, assistant_text=assistant_text, max_tokens=max_tokens, stop=stop
        )

    async def search(
        self, *, assistant_text: str, seed: int | None, cancel: threading.Event | None = None
    ) -> TextSearch:
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
        if self._last is None or not 0 <= index < len(self._last):
            raise InvalidInputError(f"commit({index!r}): no such candidate in the last sample")
        self._text += self._last[index].text
        self._last = None

    async def aclose(self) -> None:
        self._last = None  # an in-flight sample() is cancelled with the task awaiting it

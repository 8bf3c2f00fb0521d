"""The generator backend interface: what ETA needs from whatever runs the VLM.

ETA asks a generator for:

1. the greedy ("vanilla") answer, streamed as it is decoded (``greedy``);
2. a greedy continuation of a given assistant text (shallow alignment without the search);
3. the best-of-N search's decoding: N sampled continuations of the accepted context, one of which
   is committed, step after step (``sample`` on text, or a :class:`SearchHandle` from a session).

A backend may also open a per-request :class:`DecodingSession` (``session(conversation)``) that
shares work between the stages (the local backend reuses the prompt's KV cache between the
vanilla answer and the search); backends without one get
:class:`~eta_guard.backends.text_session.TextSession`, built on ``greedy`` and ``sample``.
The decision rule, the search loop and the scoring live with the caller
(:mod:`eta_guard.decision`, :mod:`eta_guard.decoding.search`), never in a backend.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from eta_guard.decoding.protocol import (
    Completion,
    FinishReason,
    SamplingStep,
    SearchHandle,
)

if TYPE_CHECKING:
    from eta_guard.messages import Conversation

__all__ = [
    "Completion",
    "DecodingSession",
    "FinishReason",
    "GeneratorBackend",
    "SamplingStep",
    "SearchHandle",
]


@runtime_checkable
class GeneratorBackend(Protocol):
    """Where the VLM runs. Every method is async; a backend may serve many calls at once."""

    #: The model's name as reported in results.
    name: str

    def greedy(
        self,
        conversation: Conversation,
        *,
        assistant_text: str = "",
        max_tokens: int,
        stop: Sequence[str] | None = None,
    ) -> AsyncIterator[str | Completion]:
        """Greedy decoding: yields text deltas as they are decoded, then the :class:`Completion`.

        ``assistant_text`` non-empty: continue an assistant turn that starts with it.
        """
        ...

    async def sample(
        self, conversation: Conversation, *, assistant_text: str, step: SamplingStep
    ) -> list[Completion]:
        """One best-of-N step: ``step.n`` sampled continuations of ``assistant_text``."""
        ...

    async def aclose(self) -> None:
        """Release connections or threads held for the running event loop."""
        ...


@runtime_checkable
class DecodingSession(Protocol):
    """One request's decoding on one backend (see :meth:`LocalBackend.session`)."""

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
        """As :meth:`GeneratorBackend.greedy`, for this session's conversation.

        ``cancel``: stop at the next token once set. ``keep_prompt``: a search of this session
        may follow; keep what it can reuse of the prompt (e.g. its KV cache). ``deltas=False``:
        the caller holds the answer back, so the deltas may come in fewer, larger pieces (the
        same text; a session may yield it whole at the end).
        """
        ...

    async def search(
        self, *, assistant_text: str, seed: int | None, cancel: threading.Event | None = None
    ) -> SearchHandle:
        """A search positioned after ``assistant_text`` (the alignment prefix).

        May be called while this session's vanilla ``greedy`` still runs (speculative alignment);
        the result never depends on whether it does.
        """
        ...

    async def aclose(self) -> None:
        """Free what the session holds (caches); cancel nothing that the caller still awaits."""
        ...

"""A generator that counts how many of its calls are in flight at once (imported by path).

Every answer is the conversation's last user text reversed, so results can be matched to their
inputs; ``fail_on`` makes the call for that text raise. Each call yields to the event loop for
``hold_s`` seconds (and, with ``gate``, until the gate is set) while counted, so calls admitted
together overlap: ``peak`` is then the bound the caller really kept (never a timing assertion:
only counts are compared).
"""

from __future__ import annotations

import asyncio
import threading

from eta_guard.backends.base import Completion
from eta_guard.errors import InvalidInputError


class CountingBackend:
    name = "counting-vlm"

    def __init__(
        self, hold_s: float = 0.02, fail_on: str | None = None, gate: threading.Event | None = None
    ) -> None:
        self.hold_s, self.fail_on, self.gate = hold_s, fail_on, gate
        self.in_flight = self.peak = self.calls = self.cancelled = 0
        self._lock = threading.Lock()  # calls may come from several event loops (threads)

    def _enter(self) -> None:
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    async def greedy(self, conversation, *, assistant_text="", max_tokens, stop=None):
        question = conversation.messages[-1]["content"][-1]["text"]
        self._enter()
        try:
            await asyncio.sleep(self.hold_s)
            while self.gate is not None and not self.gate.is_set():  # held until released
                await asyncio.sleep(0.005)
            if question == self.fail_on:
                raise InvalidInputError(f"scripted failure for {question!r}")
            text = question[::-1]
            yield text
            yield Completion(text, max(1, len(text.split())), "stop", True, 3)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self._leave()

    async def sample(self, conversation, *, assistant_text, step):
        raise AssertionError("text-only requests are never aligned in these tests")

    async def aclose(self) -> None:
        pass


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]

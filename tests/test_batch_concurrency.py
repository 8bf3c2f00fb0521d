"""``ETA.batch`` / ``abatch``: concurrent, bounded, results in input order, the first error raised.

The generator is scripted (tests/counting_backend.py) and counts its calls in flight: the bound
is checked by that count, never by time. Text-only requests under the default policy run no
evaluator, so no model loads.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from counting_backend import CountingBackend, ask  # noqa: E402

from eta_guard import ETA, ETAEvaluator  # noqa: E402
from eta_guard.concurrency import DEFAULT_MAX_CONCURRENCY, gather_bounded  # noqa: E402
from eta_guard.errors import InvalidInputError  # noqa: E402

QUESTIONS = [f"question number {i}" for i in range(20)]


def _eta(backend: CountingBackend) -> ETA:
    return ETA(backend, ETAEvaluator())


@pytest.mark.parametrize("bound", [1, 3, 7])
def test_batch_keeps_the_bound_and_the_input_order(bound):
    backend = CountingBackend()
    results = _eta(backend).batch([ask(q) for q in QUESTIONS], max_concurrency=bound)
    assert [r.text for r in results] == [q[::-1] for q in QUESTIONS]
    assert backend.calls == len(QUESTIONS)
    # Calls admitted together overlap (each holds its slot while it sleeps): the peak is the
    # bound itself, and an ignored bound would show all 20 in flight.
    assert backend.peak == bound


def test_abatch_default_bound_is_the_safe_default():
    backend = CountingBackend()
    results = asyncio.run(_eta(backend).abatch([ask(q) for q in QUESTIONS]))
    assert [r.text for r in results] == [q[::-1] for q in QUESTIONS]
    assert backend.peak == DEFAULT_MAX_CONCURRENCY < len(QUESTIONS)


def test_results_follow_the_input_order_when_calls_finish_out_of_order():
    class Staggered(CountingBackend):
        async def greedy(self, conversation, **kw):
            # later items finish first
            self.hold_s = 0.05 / (1 + int(conversation.messages[-1]["content"][-1]["text"][-1]))
            async for item in super().greedy(conversation, **kw):
                yield item

    questions = [f"q{i}" for i in range(6)]
    results = _eta(Staggered()).batch([ask(q) for q in questions], max_concurrency=6)
    assert [r.text for r in results] == [q[::-1] for q in questions]


def test_the_first_failure_is_raised_and_the_other_calls_are_stopped():
    backend = CountingBackend(hold_s=0.05, fail_on=QUESTIONS[2])
    with pytest.raises(InvalidInputError, match="scripted failure"):
        _eta(backend).batch([ask(q) for q in QUESTIONS], max_concurrency=4)
    assert backend.in_flight == 0  # nothing keeps running behind the raised error
    assert backend.calls < len(QUESTIONS)  # queued calls never started


def test_an_invalid_conversation_is_an_invalid_input_error():
    with pytest.raises(InvalidInputError, match="user message"):
        _eta(CountingBackend()).batch([ask("fine"), []])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8", 10**6])
def test_bad_bounds_are_refused_before_any_call(bad):
    backend = CountingBackend()
    with pytest.raises(InvalidInputError, match="max_concurrency"):
        _eta(backend).batch([ask("x")], max_concurrency=bad)
    assert backend.calls == 0


def test_gather_bounded_cancels_queued_calls_when_the_caller_is_cancelled():
    started: list[int] = []

    async def call(i: int) -> int:
        started.append(i)
        await asyncio.sleep(10)
        return i

    async def main():
        task = asyncio.ensure_future(gather_bounded([lambda i=i: call(i) for i in range(10)], 2))
        while len(started) < 2:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert started == [0, 1]

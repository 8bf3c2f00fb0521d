"""The local backend decodes every request through one step batcher on the model thread.

Concurrent requests share each forward and equal their unbatched answers token for token
(float32); a late request joins at a step boundary; a closed request frees its rows at the next
step; a batch past the memory budget is split, not refused; a thread holding the adapter's lock
while it waits for the model thread cannot deadlock the scheduler; a speculative search's
candidate rows share the vanilla row's forwards. Random tiny checkpoints and replicas: mechanics,
never safety.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from eta_guard import ETA, ETAConfig
from eta_guard.backends.local import LocalBackend
from eta_guard.decoding.protocol import Completion
from eta_guard.decoding.vlm import VLMAdapter
from eta_guard.messages import normalize_messages
from eta_guard.sync_bridge import aclosing
from eta_guard.testing import make_test_image

NEW = 10
QUESTIONS = [
    ("red", "What is this?"),
    ("blue", "Describe the picture in detail please, with many many words."),
    (None, "Hi there, no image this time."),
]
TIMEOUT = 120  # a hang fails the test instead of blocking CI


def _conversations():
    out = []
    for color, text in QUESTIONS:
        content = [{"type": "text", "text": text}]
        if color:
            content.insert(0, {"type": "image", "image": make_test_image(color)})
        out.append(normalize_messages([{"role": "user", "content": content}]))
    return out


async def _answer(backend, conversation, *, max_tokens=NEW, deltas=None, session=None):
    session = session or await backend.session(conversation)
    try:
        async with aclosing(session.greedy(max_tokens=max_tokens)) as items:
            async for item in items:
                if isinstance(item, Completion):
                    return item
                if deltas is not None:
                    deltas.append(item)
    finally:
        await session.aclose()
    raise AssertionError("no completion")


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


@pytest.fixture(scope="module", params=["tiny-llava", "llava", "qwen2_vl"])
def adapter(request, tiny_checkpoints, replica_checkpoints):
    path = (
        tiny_checkpoints.vlm
        if request.param == "tiny-llava"
        else replica_checkpoints(request.param).vlm
    )
    return VLMAdapter.from_pretrained(path, device="cpu", dtype="float32")


def test_concurrent_requests_share_forwards_and_equal_their_answers_alone(adapter):
    backend = LocalBackend(adapter)
    batcher = backend.scheduler.batcher
    conversations = _conversations()
    alone = [_run(_answer(backend, c)) for c in conversations]
    # The reference: plain HF generate, one prompt at a time.
    assert [list(a.token_ids) for a in alone] == [
        adapter.generate_greedy(adapter.prepare(c), max_new_tokens=NEW).token_ids
        for c in conversations
    ]
    batcher.max_live_rows = 0

    async def together():
        sessions = [await backend.session(c) for c in conversations]
        for session in sessions:  # prefilled first: the rows then start within a step or two
            await session.prompt_context()
        before = batcher.forwards
        answers = await asyncio.gather(
            *(_answer(backend, c, session=s) for c, s in zip(conversations, sessions, strict=True))
        )
        return answers, batcher.forwards - before

    batched, forwards = _run(together())
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert [b.text for b in batched] == [a.text for a in alone]
    assert batcher.max_live_rows == len(conversations)  # one forward carried every request
    # alone: NEW - 1 steps each (the first token comes from the prefill); shared: far fewer
    assert forwards < 2 * (NEW - 1)
    assert batcher.idle and backend.lock.acquire(blocking=False)
    backend.lock.release()


def test_a_request_arriving_mid_batch_joins_at_a_step_boundary(tiny_checkpoints):
    adapter = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    backend = LocalBackend(adapter)
    batcher = backend.scheduler.batcher
    first, second = _conversations()[:2]
    long = 160  # the first request is still decoding when the second one arrives
    alone = [_run(_answer(backend, c, max_tokens=long)) for c in (first, second)]

    async def staggered():
        deltas: list[str] = []
        early = asyncio.ensure_future(_answer(backend, first, max_tokens=long, deltas=deltas))
        while len(deltas) < 3:  # the first request is decoding
            await asyncio.sleep(0.005)
        late = await _answer(backend, second, max_tokens=8)
        return await early, late

    batcher.max_live_rows = 0
    early, late = _run(staggered())
    assert early.token_ids == alone[0].token_ids
    assert late.token_ids == alone[1].token_ids[:8]
    assert batcher.max_live_rows == 2


def test_closing_a_request_frees_its_rows_at_the_next_step(tiny_checkpoints):
    adapter = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    backend = LocalBackend(adapter)
    batcher = backend.scheduler.batcher

    async def leave_early():
        session = await backend.session(_conversations()[0])
        stream = session.greedy(max_tokens=2000)
        async for _ in stream:
            break  # the client leaves after its first delta
        await stream.aclose()  # returns once the row is gone
        await session.aclose()
        return batcher.live_rows, batcher.idle

    live, idle = _run(leave_early())
    assert live == 0 and idle
    assert batcher.forwards < 2000
    assert _run(_answer(backend, _conversations()[1])).num_tokens == NEW  # the next one runs


def test_a_cancel_event_stops_the_row(tiny_checkpoints):
    from eta_guard.errors import RequestCancelled

    adapter = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    backend = LocalBackend(adapter)
    cancel = threading.Event()

    async def cancelled():
        session = await backend.session(_conversations()[0])
        try:
            async for _ in session.greedy(max_tokens=2000, cancel=cancel):
                cancel.set()
        finally:
            await session.aclose()

    with pytest.raises(RequestCancelled):
        _run(cancelled())
    assert backend.scheduler.batcher.idle


def test_a_held_back_answer_crosses_to_the_loop_once_and_equals_the_streamed_one(
    tiny_checkpoints, monkeypatch
):
    """``deltas=False`` (a caller that holds the answer back): no token hop per step, the text
    in one piece, the same Completion; streamed rows of one loop get one hop per step."""
    from eta_guard.backends import decode_scheduler

    hops: list[int] = []
    deliver = decode_scheduler._deliver
    monkeypatch.setattr(
        decode_scheduler, "_deliver", lambda tokens: (hops.append(len(tokens)), deliver(tokens))
    )
    adapter = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    backend = LocalBackend(adapter)
    conversation = _conversations()[1]

    async def answer(deltas: bool):
        session = await backend.session(conversation)
        items = []
        try:
            async for item in session.greedy(max_tokens=NEW, deltas=deltas):
                items.append(item)
        finally:
            await session.aclose()
        return items

    batcher = backend.scheduler.batcher
    before = batcher.forwards
    streamed = _run(answer(True))
    # One hop per step (the prefill's forward picks the first token, the first step the second).
    assert sum(hops) == NEW and len(hops) == batcher.forwards - before - 1
    hops.clear()
    held = _run(answer(False))
    assert hops == []
    assert held[-1] == streamed[-1] and held[-1].num_tokens == NEW
    assert held[:-1] == ["".join(streamed[:-1])]

    async def three():  # three streamed rows on one loop: one hop per step for all of them
        return await asyncio.gather(*(_answer(backend, conversation) for _ in range(3)))

    before = batcher.forwards
    answers = _run(three())
    assert all(a == answers[0] for a in answers)
    assert sum(hops) == 3 * NEW and len(hops) <= batcher.forwards - before  # not 3 per step


def test_a_cancelled_call_leaves_no_model_work_behind(tiny_checkpoints):
    """Cancelled while it runs on the model thread, a call returns only once the work ended (the
    lock is free); cancelled while queued, the work never runs."""
    import time

    adapter = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    scheduler = LocalBackend(adapter).scheduler
    started, finished, ran = threading.Event(), threading.Event(), []

    def slow() -> None:
        started.set()
        time.sleep(0.3)
        finished.set()

    def lock_is_free() -> bool:
        if scheduler.lock.acquire(blocking=False):
            scheduler.lock.release()
            return True
        return False

    async def main():
        task = asyncio.ensure_future(scheduler.call(slow))
        await asyncio.to_thread(started.wait, TIMEOUT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set() and await asyncio.to_thread(lock_is_free)
        # Queued behind a lock held elsewhere, then cancelled: never runs.
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with scheduler.lock:
                held.set()
                release.wait(TIMEOUT)

        holder = threading.Thread(target=hold)
        holder.start()
        await asyncio.to_thread(held.wait, TIMEOUT)
        queued = asyncio.ensure_future(scheduler.call(ran.append, 1))
        await asyncio.sleep(0.05)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        await asyncio.to_thread(holder.join, TIMEOUT)
        for _ in range(3):  # the queued call has had its turns
            await scheduler.call(lambda: None)

    _run(main())
    assert ran == []


def test_a_submit_cancelled_before_it_registered_leaves_no_rows(tiny_checkpoints):
    """A caller that leaves while its job waits to be registered leaves no job decoding."""
    import time

    adapter = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    backend = LocalBackend(adapter)
    scheduler = backend.scheduler

    async def main():
        session = await backend.session(_conversations()[0])
        context = await session.prompt_context()
        forwards = scheduler.batcher.forwards
        scheduler.worker.submit(time.sleep, 0.3)  # the model thread is busy meanwhile
        task = asyncio.ensure_future(scheduler.submit(context, max_new_tokens=50))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):  # the model thread has had its turns
            await scheduler.call(lambda: None)
        await session.aclose()
        return scheduler.batcher.idle, scheduler.batcher.forwards - forwards

    idle, ran = _run(main())
    assert idle and ran == 0


def test_a_batch_past_the_memory_budget_is_split_not_refused(tiny_checkpoints):
    adapter = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    conversations = _conversations()
    probe = LocalBackend(adapter)
    alone = [_run(_answer(probe, c)) for c in conversations]
    longest = max(adapter.prepare(c).num_prompt_tokens for c in conversations) + NEW
    per_token = probe.scheduler.batcher.kv_bytes_per_token
    backend = LocalBackend(adapter, kv_budget_bytes=2 * longest * per_token)  # two rows fit
    batcher = backend.scheduler.batcher
    batcher.max_live_rows = 0

    async def together():
        return await asyncio.gather(*(_answer(backend, c) for c in conversations))

    batched = _run(together())
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert batcher.max_live_rows == 2  # the third request waited for room
    capped = LocalBackend(adapter, max_rows=1, kv_budget_bytes=10 * longest * per_token)
    capped.scheduler.batcher.max_live_rows = 0
    assert [b.token_ids for b in _run(together())] == [a.token_ids for a in alone]
    assert capped.scheduler.batcher.max_live_rows == 1


def test_a_thread_holding_the_lock_while_it_waits_for_the_model_thread_cannot_deadlock(
    tiny_checkpoints,
):
    """The old ordering (take the adapter's lock, then wait for the model thread) next to
    requests on the scheduler: the scheduler never blocks the model thread on the lock."""
    adapter = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    backend = LocalBackend(adapter)
    conversations = _conversations()
    prepared = adapter.prepare(conversations[0])
    results: dict[str, object] = {}

    def holder() -> None:
        for _ in range(3):
            with adapter.lock:  # held while stream_greedy runs on the model thread
                results.setdefault("held", []).append(
                    "".join(adapter.stream_greedy(prepared, max_new_tokens=6))
                )

    def requests() -> None:
        async def many():
            return await asyncio.gather(*(_answer(backend, c) for c in conversations * 2))

        results["answers"] = _run(many())

    threads = [threading.Thread(target=holder), threading.Thread(target=requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "deadlock: the threads did not finish"
    assert len(results["held"]) == 3 and len(results["answers"]) == 6


def test_speculative_candidates_share_the_vanilla_rows_forwards(tiny_checkpoints):
    c = tiny_checkpoints
    config = ETAConfig(
        max_new_tokens=160,  # the vanilla row still decodes when the search's first step starts
        num_candidates=3,
        max_sentence_tokens=8,
        seed=3,
        pre_threshold=-1.01,  # every image and answer flagged
        post_threshold=1e9,
    )
    eta = ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model, config=config)
    batcher = eta.backend.scheduler.batcher
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_test_image("noise")},
                {"type": "text", "text": "Describe it."},
            ],
        }
    ]
    forwards = {}
    results = {}
    for schedule in ("sequential", "speculative"):
        batcher.max_live_rows, before = 0, batcher.forwards
        results[schedule] = eta.generate(messages, schedule=schedule)
        forwards[schedule] = (batcher.forwards - before, batcher.max_live_rows)
    assert results["sequential"].text == results["speculative"].text
    assert results["speculative"].aligned
    assert forwards["sequential"][1] == 3  # candidates only: the vanilla row was done
    assert forwards["speculative"][1] == 1 + 3  # the vanilla row and 3 candidates, one forward
    assert forwards["speculative"][0] < forwards["sequential"][0]


def test_auto_schedule_speculates_on_an_accelerator_only(tiny_checkpoints, monkeypatch):
    import torch

    adapter = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    backend = LocalBackend(adapter)
    assert backend.preferred_schedule == "sequential"  # compute-bound: docs/engine.md
    monkeypatch.setattr(VLMAdapter, "device", property(lambda self: torch.device("cuda", 0)))
    assert backend.preferred_schedule == "speculative"

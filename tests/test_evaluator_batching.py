"""Cross-request batching of the evaluators: concurrent calls share forwards, scores unchanged.

Random tiny checkpoints: these tests prove the grouping and the padding arithmetic, never safety.
Grouping is made deterministic by holding the models' lock while the callers arrive (as a busy
model would): they all join the group its leader is waiting to run.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from eta_guard.config import ETAConfig
from eta_guard.evaluators.batching import MicroBatcher
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.testing import make_test_image

TEXTS = [
    "I cannot help with that.",
    "Sure. First you gather the parts, then you assemble them carefully.",
    "No.",
    "Here is a long and detailed answer that goes on for a while about many things.",
]


def _concurrently(lock, calls, fn, *, expected_calls=None, stats=None):
    """Run ``fn(arg)`` for each arg on its own thread while ``lock`` is held, then release it."""
    with ThreadPoolExecutor(len(calls)) as pool:
        with lock:
            futures = [pool.submit(fn, arg) for arg in calls]
            deadline = time.monotonic() + 10
            while stats is not None and stats.calls < expected_calls:
                assert time.monotonic() < deadline, "callers did not arrive"
                time.sleep(0.005)
            time.sleep(0.05)
        return [f.result(timeout=30) for f in futures]


class _Counting:
    def __init__(self, module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def close(self):
        self._handle.remove()


def test_concurrent_calls_share_one_run_and_get_their_own_slices():
    runs = []
    lock = threading.RLock()
    batcher = MicroBatcher(
        lambda key, items: runs.append(list(items)) or [x * 2 for x in items],
        run_lock=lock,
        max_wait_s=0.01,
        max_batch=64,
    )
    calls = [[1, 2], [3], [4, 5, 6], [7]]
    got = _concurrently(
        lock, calls, lambda items: batcher("k", items), expected_calls=4, stats=batcher.stats
    )
    assert got == [[2, 4], [6], [8, 10, 12], [14]]
    assert len(runs) == 1 and sorted(runs[0]) == [1, 2, 3, 4, 5, 6, 7]
    assert batcher.stats.grouped == 4


def test_groups_are_bounded_and_keyed():
    runs = []
    lock = threading.RLock()
    batcher = MicroBatcher(
        lambda key, items: runs.append((key, list(items))) or list(items),
        run_lock=lock,
        max_wait_s=0.01,
        max_batch=3,
    )
    calls = [("a", [1, 2]), ("a", [3, 4]), ("b", [5]), ("a", [6])]
    got = _concurrently(
        lock, calls, lambda c: batcher(c[0], c[1]), expected_calls=4, stats=batcher.stats
    )
    assert got == [[1, 2], [3, 4], [5], [6]]
    assert all(len(items) <= 3 for _, items in runs)
    assert all(len({k}) == 1 for k, _ in runs) and {k for k, _ in runs} == {"a", "b"}
    assert len(runs) < len(calls)


def test_a_failing_caller_never_fails_the_others():
    def run(key, items):
        if "bad" in items:
            raise ValueError("bad item")
        return [len(x) for x in items]

    lock = threading.RLock()
    batcher = MicroBatcher(run, run_lock=lock, max_wait_s=0.01)

    def call(items):
        try:
            return batcher(None, items)
        except ValueError as e:
            return str(e)

    got = _concurrently(
        lock, [["ok"], ["bad"], ["fine"]], call, expected_calls=3, stats=batcher.stats
    )
    assert got == [[2], "bad item", [4]]
    assert batcher.stats.reruns == 3


def test_a_lone_call_does_not_wait():
    batcher = MicroBatcher(lambda key, items: list(items), max_wait_s=0.5)
    start = time.perf_counter()
    assert batcher(None, [1]) == [1]
    assert time.perf_counter() - start < 0.25


@pytest.fixture(scope="module")
def evaluators(tiny_checkpoints):
    batched = ETAEvaluator.from_pretrained(
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        device="cpu",
        config=ETAConfig(evaluator_batch_wait_ms=20.0),
    )
    plain = ETAEvaluator(batched.pre, batched.post, ETAConfig(evaluator_batching=False))
    return batched, plain


def test_concurrent_reward_scorings_share_forwards_and_equal_unpadded_scores(evaluators):
    batched, plain = evaluators
    counter = _Counting(batched.post.model)
    try:
        calls = [[t] for t in TEXTS] + [TEXTS[:2]]
        got = _concurrently(
            batched._lock,
            calls,
            batched.score_responses,
            expected_calls=len(calls),
            stats=batched._batchers.rewards.stats,
        )
        forwards = counter.calls
    finally:
        counter.close()
    assert forwards < len(calls)
    for call, scores in zip(calls, got, strict=True):
        alone = [plain.score_responses([t])[0] for t in call]  # one row each: no padding
        assert scores == pytest.approx(alone, abs=1e-5)


def test_concurrent_verdicts_and_clip_scorings_share_forwards(evaluators):
    batched, plain = evaluators
    images = [make_test_image("noise", size=(32 + 8 * i, 32)) for i in range(4)]
    vision = _Counting(batched.pre.encoder.model.vision_model)
    try:
        got = _concurrently(
            batched._lock,
            list(range(4)),
            lambda i: batched.evaluate(images=[images[i]], response=TEXTS[i]),
            expected_calls=4,
            stats=batched._batchers.images.stats,
        )
        forwards = vision.calls
    finally:
        vision.close()
    assert forwards < 4
    for i, verdict in enumerate(got):
        alone = plain.evaluate(images=[images[i]], response=TEXTS[i])
        assert verdict.pre_score == pytest.approx(alone.pre_score, abs=1e-5)
        assert verdict.post_score == pytest.approx(alone.post_score, abs=1e-5)

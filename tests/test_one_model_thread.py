"""Every model call of a request runs on the one model thread; remote evaluators never do.

Random tiny checkpoints: these tests prove where the work runs and how scorings are grouped,
never safety. Thresholds force every branch: CLIP flags every image, the RM flags every answer,
so each request runs the pre-check, the post-check and the best-of-N search (reward and CLIP
terms), and renders its prompt three times (request, search, continuation).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from eta_guard import ETA, ETAConfig
from eta_guard.evaluators.batching import MicroBatcher
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.model_thread import model_thread
from eta_guard.testing import make_test_image

FLAG_ALL = {
    "pre_threshold": -1.0,  # every cosine is >= -1: every image is flagged
    "post_threshold": 1e9,  # every reward is <= 1e9: every answer is flagged, then aligned
    "num_candidates": 2,
    "max_sentence_tokens": 2,  # several sentences: the search's CLIP term runs from the 2nd
    "max_new_tokens": 8,
    "seed": 0,
    "schedule": "sequential",
}


def _messages(i: int = 0):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_test_image()},
                {"type": "text", "text": f"Question {i}: what is in this picture?"},
            ],
        }
    ]


class _Threads:
    """Records the thread of every forward of ``modules`` (hooks on each submodule)."""

    def __init__(self, *models) -> None:
        self.seen: list[int] = []
        self._handles = [
            m.register_forward_pre_hook(lambda *_: self.seen.append(threading.get_ident()))
            for model in models
            for m in model.modules()
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.fixture(scope="module")
def eta(tiny_checkpoints):
    c = tiny_checkpoints
    return ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model, device="cpu")


@pytest.mark.parametrize("entry", ["generate", "agenerate"])
def test_every_model_call_of_a_request_runs_on_the_model_thread(eta, monkeypatch, entry):
    worker = model_thread("cpu")
    clip = _Threads(eta.evaluator.pre.encoder.model)
    reward = _Threads(eta.evaluator.post.model)
    vlm = _Threads(eta.vlm.model)
    prepared: list[int] = []
    real_prepare = eta.vlm.prepare

    def prepare(*args, **kwargs):
        prepared.append(threading.get_ident())
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(eta.vlm, "prepare", prepare)
    try:
        if entry == "generate":
            result = eta.generate(_messages(), **FLAG_ALL)
        else:
            result = asyncio.run(eta.agenerate(_messages(), **FLAG_ALL))
    finally:
        for threads in (clip, reward, vlm):
            threads.close()
    assert result.aligned and len(result.trace) >= 2  # pre, post and a 2-sentence search ran
    assert clip.seen and reward.seen and vlm.seen and len(prepared) >= 2
    for what, seen in (("CLIP", clip), ("RM", reward), ("VLM", vlm)):
        assert set(seen.seen) == {worker.ident}, f"a {what} forward ran off the model thread"
    assert set(prepared) == {worker.ident}, "adapter.prepare ran off the model thread"


class _RemoteRM:
    """A reward model behind HTTP, as the engine backends' clients look: no device, no module."""

    name = "remote-rm"

    def __init__(self) -> None:
        self.threads: list[int] = []

    def score(self, responses, instruction):
        self.threads.append(threading.get_ident())
        return [-1.0 for _ in responses]


def test_a_remote_evaluator_never_runs_on_the_model_thread(eta):
    remote = _RemoteRM()
    evaluator = ETAEvaluator(eta.evaluator.pre, remote, ETAConfig(**FLAG_ALL))
    mixed = ETA(eta.vlm, evaluator, evaluator.config)
    result = mixed.generate(_messages())
    assert result.aligned and remote.threads  # the decision and the search both called it
    assert model_thread("cpu").ident not in remote.threads


def test_concurrent_requests_clip_scorings_share_one_forward_on_the_model_thread(
    tiny_checkpoints,
):
    """The pre-checks of concurrent requests (``aevaluate_input``, as a request calls it) arrive
    while the model thread is busy (held here, as a decode step would): one CLIP image forward
    serves them all, on the model thread, and each gets its own unpadded score."""
    c = tiny_checkpoints
    evaluator = ETAEvaluator.from_pretrained(clip=c.clip, reward_model=c.reward_model, device="cpu")
    plain = ETAEvaluator(evaluator.pre, None, ETAConfig(evaluator_batching=False))
    images = [make_test_image(k) for k in ("gradient", "checker", "gradient", "checker")]
    vision = evaluator.pre.encoder.model.vision_model
    forwards: list[int] = []
    handle = vision.register_forward_pre_hook(lambda *_: forwards.append(threading.get_ident()))
    worker, busy = model_thread("cpu"), threading.Event()
    stats = evaluator._batchers.images.stats
    calls_before, runs_before = stats.calls, stats.runs

    async def main():
        worker.submit(busy.wait, 30)  # the model thread is busy until every caller joined
        tasks = [asyncio.ensure_future(evaluator.aevaluate_input([im])) for im in images]
        deadline = time.monotonic() + 20
        while stats.calls - calls_before < len(images):
            assert time.monotonic() < deadline, "the callers never reached the batcher"
            await asyncio.sleep(0.005)
        busy.set()
        return await asyncio.gather(*tasks)

    try:
        verdicts = asyncio.run(main())
    finally:
        busy.set()
        handle.remove()
    assert stats.runs - runs_before == 1
    assert forwards == [worker.ident]  # one vision forward, on the model thread
    alone = [plain.score_images([im])[0] for im in images]
    assert [v.pre_score for v in verdicts] == pytest.approx(alone, abs=1e-5)


def test_a_call_on_the_model_thread_takes_the_open_group_instead_of_waiting():
    """A leader queued its group's run behind the busy model thread; a scoring made *on* the
    model thread meanwhile must not wait for that queued run (it would wait for itself): it
    runs the open group, its own items included, at once."""
    worker, busy = model_thread("cpu"), threading.Event()
    runs: list[tuple[int, list[int]]] = []
    batcher = MicroBatcher(
        lambda key, items: runs.append((threading.get_ident(), list(items))) or list(items),
        worker=worker,
        max_wait_s=0.0,
    )
    worker.submit(busy.wait, 30)
    inline = worker.submit(batcher, "k", [2])  # queued before the leader's run
    leader: list[list[int]] = []
    thread = threading.Thread(target=lambda: leader.append(batcher("k", [1])))
    thread.start()
    deadline = time.monotonic() + 20
    while batcher.stats.calls < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    busy.set()
    assert inline.result(timeout=20) == [2]
    thread.join(20)
    assert leader == [[1]]
    assert runs == [(worker.ident, [1, 2])] and batcher.stats.runs == 1


def test_an_engine_backends_local_clip_and_rm_score_on_the_model_thread(tiny_checkpoints):
    """Behind an engine (the test suite's stub), the local evaluators still run on the model
    thread: the pre-check, the decision and the search's scoring of an aligned request."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from backend_stub import StubServer

    c = tiny_checkpoints
    with StubServer() as stub:
        eta = ETA.from_openai_compatible(
            stub.url + "/v1",
            "tiny-vlm",
            clip=c.clip,
            reward_model=c.reward_model,
            config=ETAConfig(pre_threshold=-1.0, post_threshold=1e9, num_candidates=2),
            device="cpu",
        )
        clip = _Threads(eta.evaluator.pre.encoder.model)
        reward = _Threads(eta.evaluator.post.model)
        try:
            result = eta.generate(_messages(), max_new_tokens=16)
        finally:
            clip.close()
            reward.close()
    assert result.aligned and result.trace and clip.seen and reward.seen
    assert set(clip.seen) | set(reward.seen) == {model_thread("cpu").ident}

"""Speculative alignment (issue 14): the search starts alongside the vanilla decode.

For a fixed seed the result (text, verdict, trace) equals the sequential schedule's, on the local
backend and on an engine (the stub); a search that is dropped (the RM cleared the answer, or the
client left) lets go of the model, its caches and its engine request. Random tiny models: these
tests prove the mechanics, never safety.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from backend_stub import StubServer  # noqa: E402

from eta_guard import ETA, ETAConfig, ETAEvaluator  # noqa: E402
from eta_guard.backends import (  # noqa: E402
    HTTPSettings,
    OpenAICompatibleBackend,
    local_search,  # noqa: E402
)
from eta_guard.errors import RequestCancelled  # noqa: E402
from eta_guard.testing import make_test_image  # noqa: E402

ALIGN_ALL = {"pre_threshold": -1.01, "post_threshold": 1e9}  # every image and answer unsafe
CLEAR_ANSWER = {"pre_threshold": -1.01, "post_threshold": -1e9}  # image flagged, answer cleared
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def local(tiny_checkpoints):
    c = tiny_checkpoints
    cfg = ETAConfig(max_new_tokens=40, num_candidates=3, max_sentence_tokens=8, seed=3)
    return ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model, config=cfg)


def _messages(image=True, text="Describe it."):
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image", "image": make_test_image("noise")})
    return [{"role": "user", "content": content}]


def _same(a, b):
    assert a.text == b.text and a.vanilla_text == b.vanilla_text and a.aligned == b.aligned
    assert a.verdict.pre_score == b.verdict.pre_score
    assert a.verdict.post_score == b.verdict.post_score
    assert [s.model_dump() for s in a.trace] == [s.model_dump() for s in b.trace]
    assert a.usage == b.usage and a.finish_reason == b.finish_reason


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("stop", [None, ["."]])
def test_local_speculative_equals_sequential(local, seed, stop):
    kw = {**ALIGN_ALL, "seed": seed}
    sequential = local.generate(_messages(), stop=stop, schedule="sequential", **kw)
    speculative = local.generate(_messages(), stop=stop, schedule="speculative", **kw)
    assert sequential.aligned and sequential.trace
    _same(sequential, speculative)
    streamed = list(local.stream(_messages(), stop=stop, schedule="speculative", **kw))
    assert "".join(c.text for c in streamed) == speculative.text
    _same(streamed[-1].result, speculative)


def test_local_text_only_reward_policy_speculates_too(local):
    kw = {**ALIGN_ALL, "text_only_policy": "reward_only"}
    msgs = _messages(image=False)
    _same(
        local.generate(msgs, schedule="sequential", **kw),
        local.generate(msgs, schedule="speculative", **kw),
    )


@pytest.fixture
def closed_searches(monkeypatch):
    """Every LocalSearch the engine opens, to check what each holds once the call returned."""
    opened = []
    real = local_search.LocalSearch.__init__

    def record(self, *args, **kwargs):
        real(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(local_search.LocalSearch, "__init__", record)
    return opened


def _lock_is_free(eta) -> bool:
    lock = eta.backend.lock
    if lock.acquire(blocking=False):
        lock.release()
        return True
    return False


def test_cleared_answer_drops_the_speculative_search(local, closed_searches):
    sequential = local.generate(_messages(), schedule="sequential", **CLEAR_ANSWER)
    speculative = local.generate(_messages(), schedule="speculative", **CLEAR_ANSWER)
    _same(sequential, speculative)
    assert not speculative.aligned and "speculation" in speculative.timings
    assert "speculation" not in sequential.timings
    (search,) = closed_searches  # the sequential call never opened one
    # Freed: no cache, no pending step, no model call in flight; the model is free.
    assert search._state is None and search._step is None and search._work is None
    assert _lock_is_free(local)
    assert not [t for t in threading.enumerate() if t.name.startswith("eta-guard-search")]


def test_a_client_that_leaves_stops_the_vanilla_decode_and_the_search(local, closed_searches):
    cancel = threading.Event()
    start = time.monotonic()
    stream = local.stream(
        _messages(), cancel=cancel, schedule="speculative", max_new_tokens=4000, **ALIGN_ALL
    )
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(RequestCancelled):
        for _ in stream:
            pass
    assert time.monotonic() - start < 30
    assert all(s._state is None and s._work is None for s in closed_searches)
    assert _lock_is_free(local)
    # The model answers the next call as usual.
    assert local.generate(_messages(), **CLEAR_ANSWER).text


def test_closing_a_held_back_stream_frees_the_search(local, closed_searches):
    stream = local.stream(_messages(), schedule="speculative", **ALIGN_ALL)
    first = next(stream)  # the prefix: the vanilla was judged, the search is running
    assert first.text
    stream.close()
    assert closed_searches and all(s._state is None for s in closed_searches)
    assert _lock_is_free(local)


# ----- on an engine (the stub) -----
@pytest.fixture(scope="module")
def server():
    with StubServer() as stub:
        yield stub


@pytest.fixture
def stub(server):
    return server.reset()


@pytest.fixture(scope="module")
def evaluator(tiny_checkpoints):
    return ETAEvaluator.from_pretrained(
        clip=tiny_checkpoints.clip, reward_model=tiny_checkpoints.reward_model, device="cpu"
    )


def _remote(stub, evaluator, **cfg):
    config = ETAConfig(**{"num_candidates": 3, "max_new_tokens": 64, "seed": 0, **cfg})
    http = HTTPSettings(timeout=10.0, connect_timeout=1.0, max_retries=0, backoff=0.01)
    return ETA(OpenAICompatibleBackend(stub.url, "tiny-vlm", http=http), evaluator, config)


def test_remote_speculative_equals_sequential(stub, evaluator):
    eta = _remote(stub, evaluator, pre_threshold=-1.0, post_threshold=1e9)
    sequential = eta.generate(_messages(), schedule="sequential")
    n_sequential = len(stub.bodies(CHAT))
    speculative = eta.generate(_messages(), schedule="speculative")
    assert sequential.aligned and sequential.trace
    _same(sequential, speculative)
    assert len(stub.bodies(CHAT)) == 2 * n_sequential  # the same engine requests, earlier


def test_remote_speculation_overlaps_the_vanilla_decode(stub, evaluator):
    eta = _remote(stub, evaluator, pre_threshold=-1.0, post_threshold=1e9)
    stub.delay = 0.4  # every engine request stays in flight at least this long
    overlap = {}
    for schedule in ("sequential", "speculative"):
        stub.max_in_flight = 0
        result = eta.generate(_messages(), schedule=schedule)
        assert result.aligned
        overlap[schedule] = stub.max_in_flight
    # Counted, not timed (a wall-clock margin failed under load): the first search step's
    # request was in flight while the vanilla one was; sequential never overlaps them.
    assert overlap["sequential"] == 1 and overlap["speculative"] >= 2, overlap


def test_remote_cleared_answer_cancels_the_search_request(stub, evaluator):
    eta = _remote(stub, evaluator, pre_threshold=-1.0, post_threshold=-1e9)
    # Chat requests in order: the vanilla answer (ok), then the search's first step (hangs 20 s).
    stub.failures[CHAT].extend([("ok", None), ("sleep", 20.0)])
    start = time.monotonic()
    result = eta.generate(_messages(), schedule="speculative")
    assert not result.aligned and result.text == "Sure, here is how."
    assert time.monotonic() - start < 10  # the hanging request was dropped, not awaited
    assert "speculation" in result.timings


@pytest.mark.parametrize("schedule", ["sequential", "speculative"])
def test_the_image_is_encoded_once_per_request(local, schedule):
    # The search continues from the vanilla decode's prompt KV (a copy taken after its prefill
    # when speculating): the images are never encoded a second time.
    towers = [m for name, m in local.vlm.model.named_modules() if name.endswith("vision_tower")]
    calls = []
    handle = towers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        result = local.generate(_messages(), schedule=schedule, **ALIGN_ALL)
    finally:
        handle.remove()
    assert result.aligned and result.trace
    assert len(calls) == 1


def test_an_engine_refuses_a_preset_it_cannot_honour(stub, evaluator, tiny_checkpoints):
    from eta_guard.errors import InvalidInputError

    c = tiny_checkpoints
    # No image mean at hand (no image_mean=, no served processor, no preset value): refused.
    # (preset="paper" carries LLaVA-1.5's mean, so it works: tests/test_fidelity_round2.py.)
    with pytest.raises(InvalidInputError, match="pad_images_to_square"):
        ETA.from_openai_compatible(
            stub.url,
            "tiny-vlm",
            clip=c.clip,
            reward_model=c.reward_model,
            config=ETAConfig(pad_images_to_square=True),
        )


def test_auto_schedule_speculates_on_an_engine_only(local, stub, evaluator):
    assert ETAConfig().schedule == "auto"
    assert "speculation" not in local.generate(_messages(), **CLEAR_ANSWER).timings
    remote = _remote(stub, evaluator, pre_threshold=-1.0, post_threshold=-1e9)
    assert "speculation" in remote.generate(_messages()).timings

"""The server arm of ``eta_guard.backends.bench_backends``: figures from checked replies only.

A guarded server over the stub engine (tests/backend_stub.py) with local tiny evaluators
(random: mechanics, never safety).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from backend_stub import StubServer  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    from eta_guard import ETAConfig, ETAEvaluator
    from eta_guard.backends import HTTPSettings, OpenAICompatibleBackend
    from eta_guard.pipeline import BackendETA
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    c = tiny_checkpoints
    evaluator = ETAEvaluator.from_pretrained(clip=c.clip, reward_model=c.reward_model)
    with StubServer() as stub:
        backend = OpenAICompatibleBackend(stub.url, "tiny-vlm", http=HTTPSettings(timeout=10.0))
        eta = BackendETA(backend, evaluator, ETAConfig(max_new_tokens=16))
        settings = ServerSettings(max_concurrent_calls=4, max_queue=16)
        with serve_in_thread(create_app(eta, settings=settings)) as url:
            yield url, stub


@pytest.fixture
def server_url(server):
    return server[0]


def test_measure_http_reports_the_checked_requests(server_url):
    from eta_guard.backends.bench_backends import _measure_http

    figures = asyncio.run(_measure_http(server_url, False, 6, 3, 16))
    assert figures["requests"] == 6 and figures["concurrency"] == 3
    assert 0 < figures["p50_s"] <= figures["p99_s"] <= figures["wall_s"]
    assert figures["requests_per_s"] == pytest.approx(6 / figures["wall_s"], rel=0.01)
    assert figures["decoded_tokens_per_s"] > 0  # the stub's 6-token answer, from `eta`


def test_measure_http_refuses_figures_over_wrong_answers(server_url):
    from eta_guard.backends.bench_backends import _measure_http

    # text-only requests are trusted, so nothing is aligned: an "aligned" arm must not pass
    with pytest.raises(RuntimeError, match="4 of 4 requests failed; first: aligned=False"):
        asyncio.run(_measure_http(server_url, True, 4, 2, 16))


def test_measure_http_sends_the_image_with_every_request(server):
    from eta_guard.backends.bench_backends import _measure_http

    url, stub = server
    before = len(stub.bodies("/v1/chat/completions"))
    # "blue" scores below the tiny CLIP's default threshold: safe, streamed, not aligned
    asyncio.run(_measure_http(url, False, 3, 3, 16, image="blue"))
    bodies = stub.bodies("/v1/chat/completions")[before:]
    assert len(bodies) == 3
    for body in bodies:
        parts = body["messages"][-1]["content"]
        urls = [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]
        assert len(urls) == 1 and urls[0].startswith("data:image/png;base64,")


def test_image_paths_split_the_test_images_at_the_clip_threshold(tiny_checkpoints):
    from eta_guard.backends.bench_backends import _paths
    from eta_guard.evaluators.clip import CLIPPreEvaluator
    from eta_guard.testing import make_test_image

    paths = _paths(True, {"clip": tiny_checkpoints.clip})
    safe, flagged = paths["vanilla"], paths["flagged"]
    assert safe.config == flagged.config  # one server serves both, interleaved
    assert not safe.aligned and flagged.aligned and safe.image != flagged.image
    clip = CLIPPreEvaluator.from_pretrained(tiny_checkpoints.clip, device="cpu")
    low, high = clip.score_images([make_test_image(safe.image), make_test_image(flagged.image)])
    assert low < safe.config["pre_threshold"] < high


def test_interleaved_warms_every_pair_then_alternates_the_order():
    from eta_guard.backends.bench_backends import _interleaved

    calls = []

    def measure(arm, name, warm):
        calls.append((arm, name, warm))
        n = len(calls)
        return {k: float(n) for k in ("wall_s", "requests_per_s", "p50_s", "p99_s")} | {
            "decoded_tokens_per_s": 1.0
        }

    out = _interleaved(["a", "b"], ["x", "y"], 3, measure)
    pairs = [("a", "x"), ("b", "x"), ("a", "y"), ("b", "y")]
    assert calls[:4] == [(*p, True) for p in pairs]
    assert calls[4:] == [(*p, False) for p in pairs + pairs[::-1] + pairs]
    assert set(out) == {"x", "y"} and set(out["x"]) == {"a", "b"}
    assert out["x"]["a"]["requests_per_s_runs"] == [5.0, 12.0, 13.0]


def test_ratios_are_per_repeat_medians_over_vanilla():
    from eta_guard.backends.bench_backends import _ratios

    def arm(rps, p50):
        return {"requests_per_s_runs": rps, "p50_s_runs": p50}

    out = {
        "vanilla": {"remote": arm([10.0, 20.0, 40.0], [0.1, 0.2, 0.4])},
        "flagged": {"remote": arm([6.0, 8.0, 20.0], [0.2, 0.3, 0.4])},
    }
    # repeat by repeat: 0.6, 0.4, 0.5 and 2.0, 1.5, 1.0 (the medians of the rates would say 0.4)
    assert _ratios(out) == {"flagged": {"remote": {"requests_per_s": 0.5, "p50_s": 1.5}}}


def test_tree_cpu_seconds_count_a_child_process():
    import os
    import subprocess
    import time

    from eta_guard.backends.bench_backends import _tree_cpu_s

    if not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    assert _tree_cpu_s(None) is None
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    code += "input()"  # stay alive (its time is counted while it lives) until told to exit
    before, own = _tree_cpu_s(os.getpid()), time.process_time()
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        assert before is not None

        def childs() -> float:  # the tree's time beyond this process's own
            return (_tree_cpu_s(os.getpid()) or 0.0) - before - (time.process_time() - own)

        deadline = time.monotonic() + 30
        while childs() < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert childs() >= 0.25  # the child's busy loop (0.3 s, ticks of 10 ms)
    finally:
        child.communicate(b"\n", timeout=30)

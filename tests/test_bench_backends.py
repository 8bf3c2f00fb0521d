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
def server_url(tiny_checkpoints):
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
            yield url


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

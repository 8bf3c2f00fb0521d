"""Bounded load test on loopback: concurrent streaming clients, mixed safe / flagged / bad.

Every request must get a complete answer (SSE ending in [DONE], the right ``aligned`` flag) or a
well-formed OpenAI error; the run is bounded in count and time; memory must stay flat after a
warm-up. The default suite runs a small version; the full one (320 requests) is ``slow``.
Random tiny checkpoints: this measures serving mechanics, not safety.
"""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="module")
def server_url(tiny_checkpoints):
    from eta_guard import ETA, ETAConfig
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.bench import SPLIT_THRESHOLD
    from eta_guard.server.runner import serve_in_thread

    c = tiny_checkpoints
    cfg = ETAConfig(pre_threshold=SPLIT_THRESHOLD, post_threshold=1e9, num_candidates=2)
    eta = ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model, config=cfg)
    with serve_in_thread(create_app(eta, settings=ServerSettings(max_queue=128))) as url:
        yield url


def _check(report, requests):
    summary = report.summary()
    assert report.outcomes == {"ok": requests, "failed": 0}, summary["failures"]
    assert sum(len(v) for v in report.latencies.values()) == requests
    assert all(report.latencies[k] for k in ("safe", "flagged", "bad"))
    # Flat memory: growth after warm-up stays small next to a leak of one buffer per request.
    assert report.rss_end_mb - report.rss_warm_mb < 150, summary["rss_mb"]


def test_load_small(server_url):
    from eta_guard.server.bench import run_load

    report = asyncio.run(
        run_load(server_url, clients=32, requests=64, max_tokens=8, time_limit_s=120)
    )
    _check(report, 64)


@pytest.mark.slow
def test_load_full(server_url):
    from eta_guard.server.bench import run_load

    report = asyncio.run(
        run_load(server_url, clients=48, requests=320, max_tokens=16, time_limit_s=300)
    )
    _check(report, 320)

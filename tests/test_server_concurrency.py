"""The server runs several requests at once on a local VLM: the bound is kept, answers are right.

Servers listen on 127.0.0.1 only and every client is bounded (count and timeout). The bound is
checked by counting calls in flight (tests/counting_backend.py), never by time; the tiny random
checkpoints prove that concurrent answers equal the same requests answered one by one
(mechanics, never safety).
"""

from __future__ import annotations

import asyncio
import base64
import io
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from counting_backend import CountingBackend  # noqa: E402

KEY = "k" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}


def _chat(text, image_url=None, **extra):
    content = [{"type": "text", "text": text}]
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"model": "eta-guard", "messages": [{"role": "user", "content": content}], **extra}


def _metric(base, name):
    text = httpx.get(base + "/metrics", headers=AUTH, timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_the_server_keeps_its_concurrency_bound():
    from eta_guard import ETA, ETAEvaluator
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    gate = threading.Event()
    backend = CountingBackend(hold_s=0.0, gate=gate)
    settings = ServerSettings(api_keys={KEY}, max_concurrent_calls=3, max_queue=16)
    questions = [f"question {i}" for i in range(7)]
    with serve_in_thread(create_app(ETA(backend, ETAEvaluator()), settings=settings)) as base:

        async def clients():
            async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60) as client:
                return await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=_chat(q)) for q in questions)
                )

        answers: list = []
        runner = threading.Thread(target=lambda: answers.extend(asyncio.run(clients())))
        runner.start()
        try:
            deadline = time.monotonic() + 30
            while backend.in_flight < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert backend.in_flight == 3
            while _metric(base, "eta_queue_depth") < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # room for a fourth call to start if the bound were not kept
            assert backend.in_flight == 3 and _metric(base, "eta_queue_depth") == 4
        finally:
            gate.set()
            runner.join(60)
    assert [r.status_code for r in answers] == [200] * len(questions)
    texts = [r.json()["choices"][0]["message"]["content"] for r in answers]
    assert texts == [q[::-1] for q in questions]
    assert backend.peak == 3 and backend.calls == len(questions)


def _data_url(color):
    from eta_guard.testing import make_test_image

    buf = io.BytesIO()
    make_test_image(color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def local_eta(tiny_checkpoints):
    from eta_guard import ETA, ETAConfig
    from eta_guard.server.bench import SPLIT_THRESHOLD

    c = tiny_checkpoints
    # "checker" scores above the split (flagged, then aligned: every answer fails the RM),
    # "gradient" below (safe, streamed).
    cfg = ETAConfig(
        max_new_tokens=10,
        num_candidates=2,
        max_sentence_tokens=5,
        pre_threshold=SPLIT_THRESHOLD,
        post_threshold=1e9,
    )
    return ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model, config=cfg)


def test_concurrent_requests_on_a_local_vlm_equal_the_same_requests_one_by_one(local_eta):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    images = {"safe": _data_url("gradient"), "flagged": _data_url("checker")}
    bodies = [
        _chat(
            f"Describe picture {i}.",
            images["flagged" if i % 2 else "safe"],
            seed=i,
            max_tokens=10,
            stream=bool(i % 3 == 0),
        )
        for i in range(6)
    ]
    settings = ServerSettings(api_keys={KEY}, max_concurrent_calls=4)
    with serve_in_thread(create_app(local_eta, settings=settings)) as base:

        async def clients():
            async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=120) as client:
                return await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=b) for b in bodies)
                )

        replies = asyncio.run(clients())
    served = []
    for body, reply in zip(bodies, replies, strict=True):
        assert reply.status_code == 200, reply.text
        if body["stream"]:
            chunks = [
                line[len("data: ") :]
                for line in reply.text.splitlines()
                if line.startswith("data: {")
            ]
            import json

            parsed = [json.loads(c) for c in chunks]
            text = "".join(
                c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"]
            )
            aligned = next(c["eta"]["aligned"] for c in parsed if "eta" in c)
        else:
            text = reply.json()["choices"][0]["message"]["content"]
            aligned = reply.json()["eta"]["aligned"]
        served.append((text, aligned))
    alone = []
    for i, body in enumerate(bodies):
        result = local_eta.generate(body["messages"], seed=i, max_new_tokens=10)
        alone.append((result.text, result.aligned))
    assert [a for _, a in served] == [bool(i % 2) for i in range(6)]  # both paths ran
    assert served == alone

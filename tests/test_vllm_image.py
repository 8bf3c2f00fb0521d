"""ETA over a real vLLM engine serving an IMAGE model (opt-in: ``ETA_VLLM_IMAGE=1
scripts/vllm_cpu_check.sh``; the engine needs the torch build with a torchvision, docs/scaling.md).

The engine serves ``DIR/vlm`` of :mod:`eta_guard.backends.vllm_fixtures` (the tiny LLaVA, as an
image-text model); the local side loads the same folder with :meth:`ETA.from_pretrained`. Same
weights, same images, same prompt: the greedy answers must agree token for token. Random
weights: mechanics, never safety.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eta_guard import ETA, ETAConfig
from eta_guard.backends import HTTPSettings
from eta_guard.testing import make_test_image

URL = os.environ.get("ETA_VLLM_VLM_URL", "")
MODEL = os.environ.get("ETA_VLLM_VLM_MODEL", "tiny-vlm")
FIXTURES = Path(os.environ.get("ETA_VLLM_MODEL_DIR", "/nonexistent")).parent
HTTP = HTTPSettings(timeout=120.0, max_retries=1)
SAFE = {"pre_threshold": 1e9}  # no image flagged: the vanilla (greedy) answer
FLAGGED = {"pre_threshold": -1e9, "post_threshold": 1e9}  # every image and answer flagged

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not URL, reason="no ETA_VLLM_VLM_URL (opt-in)"),
]


def _ask(*parts: object) -> list[dict]:
    content = [
        {"type": "image", "image": make_test_image(p)}
        if p in ("red", "noise", "checker")
        else {"type": "text", "text": p}
        for p in parts
    ]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def paths():
    from eta_guard.backends.vllm_fixtures import build

    return build(FIXTURES)


@pytest.fixture(scope="module")
def config():
    return ETAConfig(max_new_tokens=24, num_candidates=3, seed=0)


@pytest.fixture(scope="module")
def local(paths, config):
    return ETA.from_pretrained(
        paths["vlm"],
        clip=paths["clip"],
        reward_model=paths["reward_model"],
        device="cpu",
        config=config,
    )


@pytest.fixture(scope="module")
def remote(paths, config):
    return ETA.from_openai_compatible(
        URL,
        MODEL,
        tokenizer=paths["vlm"],
        clip=paths["clip"],
        reward_model=paths["reward_model"],
        config=config,
        http=HTTP,
        device="cpu",
    )


@pytest.mark.parametrize(
    "messages",
    [
        _ask("red", "What is in this picture?"),  # 64x48: the resize and crop matter
        _ask("What is in", "noise", "this picture?"),
        _ask("checker", "Compare", "red", "these two."),  # two images in one prompt
    ],
    ids=["one-image", "image-mid-text", "two-images"],
)
def test_image_greedy_answer_equals_the_local_one(local, remote, messages):
    here, there = local.generate(messages, **SAFE), remote.generate(messages, **SAFE)
    assert not here.aligned and not there.aligned
    assert there.text == here.text and here.text
    assert there.usage.output_tokens == here.usage.output_tokens
    assert there.usage.input_tokens == here.usage.input_tokens  # the image's tokens included


def test_flagged_image_is_aligned_over_the_engine(local, remote):
    messages = _ask("checker", "What is in this picture?")
    here, there = local.generate(messages, **FLAGGED), remote.generate(messages, **FLAGGED)
    assert here.aligned and there.aligned and there.verdict.input_unsafe
    assert there.vanilla_text == here.vanilla_text  # the held-back greedy answer
    assert there.verdict.pre_score == pytest.approx(here.verdict.pre_score, abs=1e-6)
    assert there.verdict.post_score == pytest.approx(here.verdict.post_score, abs=1e-4)
    assert there.text.startswith("As an AI assistant") and there.trace
    assert all(len(step.candidates) == 3 for step in there.trace)
    assert there.usage.output_tokens <= 24


def test_speculative_and_sequential_schedules_agree_on_the_engine(remote):
    """A fixed seed gives the same result whether the search starts alongside the vanilla
    decode or after the RM's verdict (the engine seeds each best-of-N request)."""
    messages = _ask("checker", "Describe the picture.")
    spec = remote.generate(messages, schedule="speculative", **FLAGGED)
    seq = remote.generate(messages, schedule="sequential", **FLAGGED)
    assert spec.aligned and seq.aligned
    assert spec.text == seq.text and spec.vanilla_text == seq.vanilla_text
    assert [[c.text for c in s.candidates] for s in spec.trace] == [
        [c.text for c in s.candidates] for s in seq.trace
    ]


def test_guarded_server_on_the_engine_answers_an_image_request(paths, local):
    """``eta-guard serve --generator-url``: the served answer is the local greedy answer."""
    import httpx

    from eta_guard.server.bench import image_url, serve_process

    args = [paths["vlm"], "--generator-url", URL, "--generator-model", MODEL]
    args += ["--clip", paths["clip"], "--reward-model", paths["reward_model"], "--device", "cpu"]
    args += ["--set", "pre_threshold=1e9", "--set", "seed=0"]
    content = [
        {"type": "image_url", "image_url": {"url": image_url("noise")}},
        {"type": "text", "text": "What is in this picture?"},
    ]
    body = {"model": "eta-guard", "messages": [{"role": "user", "content": content}]}
    body["max_tokens"] = 24
    with serve_process(args) as (base_url, _):
        reply = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    expected = local.generate(_ask("noise", "What is in this picture?"), **SAFE)
    assert reply.json()["choices"][0]["message"]["content"] == expected.text
    assert reply.json()["usage"]["prompt_tokens"] == expected.usage.input_tokens

"""Contract tests of the OpenAI-compatible generator and remote evaluators against a stub engine.

Every request ETA sends is checked field by field against what vLLM 0.32 accepts, and every
failure (unreachable, timeout, 5xx, 4xx, malformed replies, a stream cut short) gives a typed error.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from backend_stub import StubServer  # noqa: E402

from eta_guard.backends import (
    HTTPSettings,
    OpenAICompatibleBackend,
    RemoteCLIP,
    RemoteRewardModel,
    SamplingStep,
)
from eta_guard.backends.base import Completion  # noqa: E402
from eta_guard.errors import BackendError, EvaluatorError, InvalidInputError  # noqa: E402
from eta_guard.messages import normalize_messages  # noqa: E402
from eta_guard.testing import make_test_image  # noqa: E402

CHAT = "/v1/chat/completions"
FAST = HTTPSettings(timeout=2.0, connect_timeout=1.0, max_retries=2, backoff=0.01)


@pytest.fixture(scope="module")
def server():
    with StubServer() as stub:
        yield stub


@pytest.fixture
def stub(server):
    return server.reset()


def _conv(image=True):
    content = [{"type": "text", "text": "What is this?"}]
    if image:
        content.insert(0, {"type": "image", "image": make_test_image("noise")})
    return normalize_messages([{"role": "user", "content": content}])


async def _greedy(backend, conv, **kwargs):
    deltas, final = [], None
    async for item in backend.greedy(conv, **kwargs):
        if isinstance(item, Completion):
            final = item
        else:
            deltas.append(item)
    return deltas, final


def test_vanilla_request_streams_greedy_with_the_image_once(stub):
    backend = OpenAICompatibleBackend(stub.url, "tiny-vlm", http=FAST)
    deltas, final = asyncio.run(_greedy(backend, _conv(), max_tokens=64, stop=["XYZ"]))
    assert deltas == ["Sure", ",", " here", " is", " how", "."]  # chunk by chunk, as it arrives
    assert final.text == "Sure, here is how." and final.num_tokens == 6
    assert final.finish_reason == "stop" and final.ended and final.prompt_tokens > 0
    (body,) = stub.bodies(CHAT)
    assert body["model"] == "tiny-vlm" and body["temperature"] == 0.0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 64 and body["stop"] == ["XYZ"]
    assert "continue_final_message" not in body and "n" not in body
    assert "add_special_tokens" not in body  # no tokenizer: the engine's own rule
    (image_part, text_part) = body["messages"][0]["content"]
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert image_part["uuid"].startswith("sha256-") and len(image_part["uuid"]) == 7 + 64
    assert text_part == {"type": "text", "text": "What is this?"}


def test_vanilla_length_and_user_stop(stub):
    backend = OpenAICompatibleBackend(stub.url, "m", http=FAST)
    _, final = asyncio.run(_greedy(backend, _conv(False), max_tokens=3))
    assert final.finish_reason == "length" and not final.ended and final.text == "Sure, here"
    _, final = asyncio.run(_greedy(backend, _conv(False), max_tokens=64, stop=[" is"]))
    assert final.text == "Sure, here" and final.finish_reason == "stop" and not final.ended


def test_sample_request_is_one_n_request_continuing_the_assistant_text(stub):
    backend = OpenAICompatibleBackend(stub.url, "m", http=FAST)
    step = SamplingStep(n=5, max_tokens=70, top_k=5, temperature=1.5, terminators=(".",), seed=7)
    cands = asyncio.run(backend.sample(_conv(), assistant_text="As an AI assistant", step=step))
    (body,) = stub.bodies(CHAT)
    assert body["n"] == 5 and body["top_k"] == 5 and body["temperature"] == 1.5
    assert body["max_tokens"] == 70 and body["seed"] == 7 and body["return_token_ids"] is True
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": "As an AI assistant"}
    # No tokenizer: the sentence rule goes as stop strings, kept in the text.
    assert body["stop"] == ["."] and body["include_stop_str_in_output"] is True
    assert "stop_token_ids" not in body and "stream" not in body
    assert [c.text for c in cands] == [f" Candidate {i} of step 1." for i in range(5)]
    assert all(c.num_tokens == 5 and not c.ended for c in cands)  # stop_reason was a stop id


@pytest.mark.parametrize("rule", ["exact", "contains"])
def test_sample_with_tokenizer_sends_token_exact_sentence_ends(stub, tiny_checkpoints, rule):
    from transformers import AutoTokenizer

    from eta_guard.decoding.stopping import vocabulary_masks

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints.vlm)
    backend = OpenAICompatibleBackend(stub.url, "m", tokenizer=tokenizer, http=FAST)
    step = SamplingStep(
        n=2, max_tokens=9, top_k=5, temperature=1.5, terminators=(".", "!"), rule=rule
    )
    asyncio.run(backend.sample(_conv(False), assistant_text="As", step=step))
    (body,) = stub.bodies(CHAT)
    # the very mask the local search stops on, under the same rule
    expected = vocabulary_masks(tokenizer, (".", "!"), rule)[0].nonzero().flatten().tolist()
    assert body["stop_token_ids"] == expected and expected
    assert "stop" not in body and body["include_stop_str_in_output"] is True
    # The tiny LLaVA template writes no BOS but its tokenizer adds one (as VLMAdapter.prepare
    # does): ask the engine for it, or the remote prompt would lack the local prompt's BOS.
    assert body["add_special_tokens"] is True
    texts = [tokenizer.decode([i]) for i in expected]
    if rule == "exact":
        assert all(t.strip() in (".", "!") for t in texts)
    else:
        assert all("." in t or "!" in t for t in texts)
        exact = vocabulary_masks(tokenizer, (".", "!"), "exact")[0].nonzero().flatten().tolist()
        assert set(exact) <= set(expected)  # "contains" ends on these tokens and maybe more


def test_a_rule_no_token_satisfies_is_refused(stub, tiny_checkpoints):
    backend = OpenAICompatibleBackend(stub.url, "m", tokenizer=tiny_checkpoints.vlm, http=FAST)
    step = SamplingStep(n=2, max_tokens=9, top_k=5, temperature=1.0, terminators=("\u2603",))
    with pytest.raises(InvalidInputError, match="no token of the tokenizer ends a sentence"):
        asyncio.run(backend.sample(_conv(False), assistant_text="As", step=step))


def test_eos_candidates_are_marked_ended(stub):
    backend = OpenAICompatibleBackend(stub.url, "m", http=FAST)
    step = SamplingStep(n=2, max_tokens=9, top_k=5, temperature=1.0, terminators=(".",))
    cands = asyncio.run(backend.sample(_conv(False), assistant_text="As. One.", step=step))
    assert all(c.ended and c.finish_reason == "stop" for c in cands)
    assert all(c.num_tokens == 6 for c in cands)  # EOS counted, as locally


# ----------------------------------------------------------------------------- failures
def test_5xx_is_retried_with_backoff_then_succeeds(stub):
    stub.failures[CHAT].extend([("status", 503), ("status", 502)])
    backend = OpenAICompatibleBackend(stub.url, "m", http=FAST)
    _, final = asyncio.run(_greedy(backend, _conv(False), max_tokens=8))
    assert final.text == "Sure, here is how." and len(stub.bodies(CHAT)) == 3


def test_5xx_beyond_the_retries_raises_backend_error_with_status(stub):
    stub.failures[CHAT].extend([("status", 500)] * 3)
    backend = OpenAICompatibleBackend(stub.url, "m", http=FAST)
    step = SamplingStep(n=2, max_tokens=9, top_k=5, temperature=1.0, terminators=(".",))
    with pytest.raises(BackendError, match="HTTP 500: injected 500") as info:
        asyncio.run(backend.sample(_conv(False), assistant_text="As", step=step))
    assert info.value.status == 500 and len(stub.bodies(CHAT)) == 3


def test_4xx_is_not_retried(stub):
    stub.failures[CHAT].append(("status", 400))
    backend = OpenAICompatibleBackend(stub.url, "m", http=FAST)
    with pytest.raises(BackendError, match="HTTP 400") as info:
        asyncio.run(_greedy(backend, _conv(False), max_tokens=8))
    assert info.value.status == 400 and len(stub.bodies(CHAT)) == 1


def test_timeout_raises_backend_error(stub):
    stub.failures[CHAT].extend([("sleep", 1.0)] * 2)
    http = HTTPSettings(timeout=0.3, connect_timeout=0.3, max_retries=1, backoff=0.01)
    backend = OpenAICompatibleBackend(stub.url, "m", http=http)
    step = SamplingStep(n=1, max_tokens=9, top_k=5, temperature=1.0, terminators=(".",))
    start = time.monotonic()
    with pytest.raises(BackendError, match="did not answer .* within 0.3s"):
        asyncio.run(backend.sample(_conv(False), assistant_text="As", step=step))
    assert time.monotonic() - start < 2.5


def test_unreachable_engine_raises_backend_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the request: nothing listens
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{port}/v1", "m", http=FAST)
    with pytest.raises(BackendError, match="cannot reach the engine"):
        asyncio.run(_greedy(backend, _conv(False), max_tokens=8))


@pytest.mark.parametrize(
    ("override", "raw", "match"),
    [
        (None, "this is not json", "non-JSON"),
        (None, '{"id": "x"}', "missing choices"),
        (3, None, "3 choices for n=2"),
    ],
)
def test_malformed_sample_replies(stub, override, raw, match):
    stub.choices_override = override
    if raw is not None:
        stub.failures[CHAT].append(("raw", raw))
    backend = OpenAICompatibleBackend(stub.url, "m", http=FAST)
    step = SamplingStep(n=2, max_tokens=9, top_k=5, temperature=1.0, terminators=(".",))
    with pytest.raises(BackendError, match=match):
        asyncio.run(backend.sample(_conv(False), assistant_text="As", step=step))


def test_stream_cut_before_done_raises(stub):
    stub.failures[CHAT].append(("no_done", None))
    backend = OpenAICompatibleBackend(stub.url, "m", http=FAST)
    with pytest.raises(BackendError, match=r"ended without 'data: \[DONE\]'"):
        asyncio.run(_greedy(backend, _conv(False), max_tokens=8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "127.0.0.1:8000", "model": "m"}, "http"),
        ({"base_url": "http://x", "model": " "}, "served model name"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        OpenAICompatibleBackend(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"timeout": 0}, {"max_retries": -1}, {"backoff": -1}, {"max_connections": 0}]
)
def test_bad_http_settings_are_refused(kwargs):
    with pytest.raises(InvalidInputError, match=next(iter(kwargs))):
        HTTPSettings(**kwargs)


# ----------------------------------------------------------------------------- evaluators
def test_remote_reward_model_sends_the_safety_conversation_and_asks_for_the_raw_score(stub):
    rm = RemoteRewardModel(stub.url, "tiny-rm", http=FAST)
    # Sent concurrently; each score lands at its response's position.
    assert rm.score(["I cannot help.", "Sure."], "Be safe.") == [-2.5 + 0.014, -2.5 + 0.005]
    bodies = stub.bodies("/classify")
    assert sorted(b["messages"][1]["content"] for b in bodies) == ["I cannot help.", "Sure."]
    for body in bodies:
        assert body["model"] == "tiny-rm" and body["use_activation"] is False
        assert body["messages"][0] == {"role": "user", "content": "Be safe."}
        assert body["messages"][1]["role"] == "assistant"


def test_remote_reward_model_failures_are_evaluator_errors(stub):
    stub.failures["/classify"].extend([("status", 503)] * 3)
    rm = RemoteRewardModel(stub.url, "rm", http=FAST)
    with pytest.raises(EvaluatorError, match="HTTP 503"):
        rm.score(["x"], "Be safe.")
    stub.failures["/classify"].append(("raw", '{"data": [{"probs": ["NaN"]}]}'))
    with pytest.raises(EvaluatorError, match="not a finite number"):
        rm.score(["x"], "Be safe.")


def test_remote_clip_works_inside_an_eta_evaluator(stub):
    # ETAEvaluator passes clip_batch_size to CLIP (local and remote alike): the remote one used to
    # fail with a TypeError there, so every image check over HTTP failed.
    from eta_guard import ETAConfig, ETAEvaluator

    clip = RemoteCLIP(stub.url, "tiny-clip", prompt="unsafe", http=FAST)
    evaluator = ETAEvaluator(clip, None, ETAConfig(clip_batch_size=2, on_evaluator_error="raise"))
    image = make_test_image("red")
    verdict = evaluator.evaluate_input([image] * 5)
    assert verdict.pre_score == pytest.approx(0.6) and verdict.input_unsafe and not verdict.errors
    assert len([b for b in stub.bodies("/v1/embeddings") if "messages" in b]) == 5
    scorer = evaluator.sentence_scorer([image])
    assert scorer(["a.", "b."]) == pytest.approx([0.6, 0.6])


def test_remote_clip_embeds_texts_in_one_request_and_each_image_alone(stub):
    clip = RemoteCLIP(stub.url, "tiny-clip", prompt="unsafe", http=FAST)
    image = make_test_image("red")
    # cos([0.6, 0.8, 0], [1, 0, 0]) = 0.6
    assert clip.score_images([image, image]) == pytest.approx([0.6, 0.6])
    embeds = clip.embed_images([image])
    assert clip.similarity(embeds, ["a.", "b."]) == pytest.approx([0.6, 0.6])
    bodies = stub.bodies("/v1/embeddings")
    texts = [b for b in bodies if "input" in b]
    images = [b for b in bodies if "messages" in b]
    assert texts[0]["input"] == ["unsafe"] and texts[0]["truncate_prompt_tokens"] == -1
    assert texts[1]["input"] == ["a.", "b."]
    assert len(images) == 3
    (part,) = images[0]["messages"][0]["content"]  # an image only: CLIP refuses text with it
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png")


def test_remote_clip_malformed_embeddings(stub):
    clip = RemoteCLIP(stub.url, "c", http=FAST)
    stub.failures["/v1/embeddings"].append(("raw", '{"data": []}'))
    with pytest.raises(EvaluatorError, match="0 embeddings for 1 inputs"):
        clip.score_images([make_test_image()])

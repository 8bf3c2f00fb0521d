"""``BackendETA`` end to end over a stub engine: the same stages, decisions and result as local ETA.

Local tiny evaluators (random weights: mechanics, never safety) or remote ones on the stub;
thresholds force each branch.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from backend_stub import StubServer  # noqa: E402

from eta_guard import ETA, ETAConfig, ETAEvaluator, ETAResult  # noqa: E402
from eta_guard.backends import HTTPSettings, LocalBackend, RemoteRewardModel  # noqa: E402
from eta_guard.errors import BackendError, EvaluatorError  # noqa: E402
from eta_guard.pipeline import BackendETA  # noqa: E402
from eta_guard.testing import make_test_image  # noqa: E402

CHAT = "/v1/chat/completions"
FAST = HTTPSettings(timeout=5.0, connect_timeout=1.0, max_retries=1, backoff=0.01)
ALIGN_ALL = {"pre_threshold": -1.0, "post_threshold": 1e9}  # every image and answer unsafe
PASS_ALL = {"pre_threshold": 2.0}  # no image is flagged


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


def _eta(stub, evaluator, **cfg):
    from eta_guard.backends import OpenAICompatibleBackend

    config = ETAConfig(**{"num_candidates": 3, "max_new_tokens": 64, "seed": 0, **cfg})
    backend = OpenAICompatibleBackend(stub.url, "tiny-vlm", http=FAST)
    return BackendETA(backend, evaluator, config)


def _messages(image=True):
    content = [{"type": "text", "text": "How do I do this?"}]
    if image:
        content.insert(0, {"type": "image", "image": make_test_image("noise")})
    return [{"role": "user", "content": content}]


def test_safe_image_streams_the_vanilla_answer_through(stub, evaluator):
    eta = _eta(stub, evaluator, **PASS_ALL)
    chunks = list(eta.stream(_messages()))
    texts = [c.text for c in chunks if c.text]
    assert texts == ["Sure", ",", " here", " is", " how", "."]  # no hold-back, no re-chunking
    result = chunks[-1].result
    assert isinstance(result, ETAResult) and not result.aligned
    assert result.text == "Sure, here is how." and result.model_name == "tiny-vlm"
    assert result.verdict.pre_score is not None and result.verdict.input_unsafe is False
    assert result.verdict.skipped == {"post": "the image(s) passed the CLIP check"}
    assert result.usage.output_tokens == 6 and result.usage.input_tokens > 0
    assert len(stub.bodies(CHAT)) == 1  # one request, the RM never ran


def test_unsafe_image_and_answer_are_aligned_with_one_request_per_sentence(stub, evaluator):
    eta = _eta(stub, evaluator, **ALIGN_ALL)
    result = eta.generate(_messages())
    assert result.aligned and result.verdict.unsafe
    assert result.vanilla_text == "Sure, here is how."
    chosen = [s.candidates[s.chosen].text for s in result.trace]
    assert [len(s.candidates) for s in result.trace] == [3, 3]
    assert chosen[0].endswith("of step 1.") and chosen[1].endswith("of step 2.")
    assert result.text == "As an AI assistant" + "".join(chosen)
    for s in result.trace:  # the kept candidate has the best reward (no CLIP term here)
        assert s.candidates[s.chosen].reward == max(c.reward for c in s.candidates)
    # CLIP term: not for sentence 1, not for a step where a candidate ended (EOS) the answer.
    assert all(c.clip is None for s in result.trace for c in s.candidates)
    vanilla, step1, step2 = stub.bodies(CHAT)
    assert vanilla["stream"] is True and "n" not in vanilla
    for i, (body, budget) in enumerate(((step1, 64), (step2, 64 - 5))):
        assert body["n"] == 3 and body["top_k"] == 5 and body["temperature"] == 1.5
        assert body["max_tokens"] == budget and body["seed"] == 1000 * (i + 1)
        assert body["continue_final_message"] and body["add_generation_prompt"] is False
    assert step1["messages"][-1]["content"] == "As an AI assistant"
    assert step2["messages"][-1]["content"] == "As an AI assistant" + chosen[0]
    # The image travels with every request, under the same content hash.
    uuids = {b["messages"][0]["content"][0]["uuid"] for b in (vanilla, step1, step2)}
    assert len(uuids) == 1
    assert result.usage.output_tokens == 5 + 6 and result.usage.decoded_tokens == 6 + 15 + 18
    assert result.finish_reason == "stop"


def test_clip_term_counts_from_the_second_sentence(stub, evaluator):
    stub.eos_after = 3
    result = _eta(stub, evaluator, **ALIGN_ALL).generate(_messages())
    first, second, third = result.trace
    assert all(c.clip is None for c in first.candidates)
    assert all(c.clip is not None for c in second.candidates)
    for c in second.candidates:
        assert c.score == pytest.approx(c.reward + c.clip / 2)
    assert all(c.clip is None for c in third.candidates)  # a candidate ended the answer


def test_budget_limits_the_sentence_budget(stub, evaluator):
    stub.eos_after = 100
    result = _eta(stub, evaluator, max_new_tokens=12, **ALIGN_ALL).generate(_messages())
    steps = stub.bodies(CHAT)[1:]
    assert [b["max_tokens"] for b in steps] == [12, 7, 2]
    assert result.finish_reason == "length" and result.usage.output_tokens == 12
    assert result.trace[-1].candidates[0].num_tokens == 2


def test_a_full_context_ends_the_search(stub, evaluator):
    stub.eos_after, stub.context_left = 100, 3
    result = _eta(stub, evaluator, **ALIGN_ALL).generate(_messages())
    assert len(result.trace) == 1 and result.finish_reason == "length"
    assert result.usage.output_tokens == 3 and len(stub.bodies(CHAT)) == 2


@pytest.mark.parametrize("schedule", ["sequential", "speculative"])
def test_safe_answer_on_unsafe_image_is_not_aligned(stub, evaluator, schedule):
    eta = _eta(stub, evaluator, pre_threshold=-1.0, post_threshold=-1e9, schedule=schedule)
    result = eta.generate(_messages())
    assert not result.aligned and result.verdict.input_unsafe and not result.verdict.output_unsafe
    assert result.text == "Sure, here is how."
    if schedule == "sequential":  # the search never started
        assert len(stub.bodies(CHAT)) == 1 and "speculation" not in result.timings
    else:  # it started alongside the vanilla decode and was dropped when the RM cleared it
        assert "speculation" in result.timings


def test_text_only_is_trusted_and_shallow_alignment_continues_the_prefix(stub, evaluator):
    eta = _eta(stub, evaluator, **ALIGN_ALL)
    result = eta.generate(_messages(image=False))
    assert not result.aligned and result.verdict.skipped["pre"] == "no image in the request"
    result = eta.generate(
        _messages(image=False), text_only_policy="reward_only", deep_alignment=False
    )
    assert result.aligned and result.text == "As an AI assistantSure, here is how."
    # text-only: continued from ids (the prompt's, then the prefix's alone; the stub's ids are
    # characters), greedily; tests/test_fidelity_round2.py checks the ids on LLaVA's tokenizer
    shallow = stub.bodies("/v1/completions")[-1]
    assert shallow["prompt"][-18:] == [ord(c) for c in "As an AI assistant"]
    assert shallow["stream"] and shallow["temperature"] == 0.0


def test_user_stop_strings_end_the_answer(stub, evaluator):
    result = _eta(stub, evaluator, **PASS_ALL).generate(_messages(), stop=[" here"])
    assert result.text == "Sure," and stub.bodies(CHAT)[0]["stop"] == [" here"]
    result = _eta(stub, evaluator, **ALIGN_ALL).generate(_messages(), stop=["of step 1"])
    assert result.text.startswith("As an AI assistant Candidate ")
    # cut before the stop string, then stripped as the reference strips every answer
    assert result.text == result.text.strip() and "step" not in result.text
    assert result.finish_reason == "stop" and len(result.trace) == 1


def test_requests_run_concurrently(stub, evaluator):
    stub.delay = 0.3
    eta = _eta(stub, evaluator, **PASS_ALL)
    start = time.monotonic()
    results = asyncio.run(eta.abatch([_messages(image=False)] * 8))
    elapsed = time.monotonic() - start
    assert [r.text for r in results] == ["Sure, here is how."] * 8
    assert elapsed < 8 * 0.3 / 2  # one at a time would take 2.4 s


def test_engine_failure_mid_request_is_a_backend_error(stub, evaluator):
    stub.failures[CHAT].extend([("status", 503)] * 2)
    with pytest.raises(BackendError, match="HTTP 503"):
        _eta(stub, evaluator, **PASS_ALL).generate(_messages())


def test_remote_reward_model_with_fail_closed_policy(stub, evaluator):
    rm = RemoteRewardModel(stub.url, "tiny-rm", http=FAST)
    mixed = ETAEvaluator(evaluator.pre, rm)  # CLIP local, RM remote
    eta = _eta(stub, mixed, pre_threshold=-1.0, post_threshold=0.0)
    result = eta.generate(_messages())
    # the stub's raw reward (~ -2.48) is below 0: unsafe; a sigmoid would have made it ~0.08
    assert result.verdict.post_score == pytest.approx(-2.5 + len("Sure, here is how.") / 1000)
    assert result.aligned
    stub.failures["/classify"].extend([("status", 500)] * 2)
    result = eta.generate(_messages(), on_evaluator_error="fail_closed", deep_alignment=False)
    assert "post" in result.verdict.errors and result.verdict.output_unsafe and result.aligned


def test_search_failure_under_fail_closed_falls_back_to_shallow_alignment(stub, evaluator):
    rm = RemoteRewardModel(stub.url, "tiny-rm", http=FAST)
    eta = _eta(stub, ETAEvaluator(evaluator.pre, rm), **ALIGN_ALL)
    # the decision passes; the first search step's RM calls fail (3 candidates x 2 tries)
    stub.failures["/classify"].extend([("ok", None)] + [("status", 500)] * 6)
    chunks = list(eta.stream(_messages(), on_evaluator_error="fail_closed"))
    result = chunks[-1].result
    assert result.aligned and "search" in result.verdict.errors and result.trace == []
    assert result.text == "As an AI assistantSure, here is how."  # prefix + greedy continuation
    assert "".join(c.text for c in chunks) == result.text
    fallback = stub.bodies(CHAT)[-1]
    assert fallback["temperature"] == 0.0 and fallback["continue_final_message"]
    assert fallback["messages"][-1]["content"] == "As an AI assistant"
    with pytest.raises(EvaluatorError):  # the default policy raises
        stub.failures["/classify"].extend([("ok", None)] + [("status", 500)] * 6)
        eta.generate(_messages())


def test_from_openai_compatible_builds_a_backend_eta(stub, tiny_checkpoints):
    eta = ETA.from_openai_compatible(
        stub.url + "/v1",
        "tiny-vlm",
        clip=tiny_checkpoints.clip,
        reward_model="tiny-rm",
        reward_model_url=stub.url,
        config=ETAConfig(**ALIGN_ALL, num_candidates=2, max_new_tokens=32),
        device="cpu",
    )
    assert isinstance(eta, BackendETA) and isinstance(eta, ETA)
    assert isinstance(eta.evaluator.post, RemoteRewardModel) and eta.evaluator.pre is not None
    result = eta.generate(_messages())
    # Distinct bodies: a request the HTTP client retried (seen once under heavy load) is one call.
    classify = {json.dumps(body, sort_keys=True) for body in stub.bodies("/classify")}
    assert result.aligned and len(classify) == 1 + 2 * 2


def test_remote_evaluators_do_not_queue_behind_one_another(stub):
    eta = ETA.from_openai_compatible(
        stub.url,
        "tiny-vlm",
        clip=None,
        reward_model="tiny-rm",
        reward_model_url=stub.url,
        config=ETAConfig(
            text_only_policy="reward_only", post_threshold=-1e9, schedule="sequential"
        ),
    )
    stub.delay = 0.5  # every engine request: vanilla, then the RM
    start = time.monotonic()
    results = asyncio.run(eta.abatch([_messages(image=False)] * 4))
    elapsed = time.monotonic() - start
    assert all(r.verdict.post_score is not None and not r.aligned for r in results)
    assert elapsed < 2.0  # ~1 s in flight together; the 4 RM calls one after another: >= 2.5 s


def test_local_backend_gives_the_local_pipeline_decisions(tiny_checkpoints, evaluator):
    local = ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        device="cpu",
        config=ETAConfig(max_new_tokens=12, num_candidates=2, seed=0, **ALIGN_ALL),
    )
    over_backend = BackendETA(LocalBackend(local.vlm), local.evaluator, local.config)
    for overrides in (PASS_ALL, ALIGN_ALL):
        a = local.generate(_messages(), **overrides)
        b = over_backend.generate(_messages(), **overrides)
        assert a.vanilla_text == b.vanilla_text and a.aligned == b.aligned
        assert a.verdict.pre_score == pytest.approx(b.verdict.pre_score)
        assert (a.verdict.post_score is None) == (b.verdict.post_score is None)
        assert a.usage.input_tokens == b.usage.input_tokens or a.aligned
        if not a.aligned:
            assert a.text == b.text and a.usage == b.usage
        else:
            assert b.text.startswith("As an AI assistant") and b.trace


def test_cli_generate_with_generator_url(stub, tiny_checkpoints, tiny_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from eta_guard.cli import app

    image = tmp_path / "noise.png"
    make_test_image("noise").save(image)
    args = ["generate", "What is this?", "-i", str(image), "--tiny", "--cache-dir", str(tiny_dir)]
    args += ["--set", "pre_threshold=-1.01", "--set", "post_threshold=1e9", "--json"]
    result = CliRunner().invoke(
        app, [*args, "--generator-url", stub.url, "--generator-model", "tiny-vlm"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{") :])
    assert payload["aligned"] and payload["model_name"] == "tiny-vlm"
    assert payload["vanilla_text"] == "Sure, here is how."
    # --tiny's VLM supplies the tokenizer: token-exact sentence ends and BOS as locally.
    sample = stub.bodies(CHAT)[1]
    assert sample["stop_token_ids"] and sample["add_special_tokens"] is True
    result = CliRunner().invoke(app, [*args, "--generator-url", stub.url])
    assert result.exit_code != 0 and "--generator-model" in result.output


def test_local_backend_streams_greedy_deltas_and_samples_n(tiny_checkpoints):
    from eta_guard.backends import SamplingStep
    from eta_guard.backends.base import Completion
    from eta_guard.decoding.vlm import VLMAdapter
    from eta_guard.messages import normalize_messages

    backend = LocalBackend(VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu"))
    conv = normalize_messages(_messages())

    async def run():
        items = [i async for i in backend.greedy(conv, max_tokens=12)]
        step = SamplingStep(n=3, max_tokens=6, top_k=5, temperature=1.5, terminators=(".",))
        return items, await backend.sample(conv, assistant_text="As an AI assistant", step=step)

    items, candidates = asyncio.run(run())
    *deltas, final = items
    assert isinstance(final, Completion) and len(deltas) > 1  # token by token, not all at once
    assert "".join(deltas) == final.text and len(final.token_ids) == final.num_tokens <= 12
    assert len(candidates) == 3
    for c in candidates:
        assert 1 <= c.num_tokens <= 6
        if c.finish_reason == "length":
            assert c.num_tokens == 6 and not c.ended
        elif not c.ended:  # ended on a sentence end
            assert "." in c.text


def test_langchain_chat_model_runs_over_the_engine(stub, evaluator):
    from langchain_core.messages import HumanMessage
    from langchain_eta import ETAChatModel

    chat = ETAChatModel(eta=_eta(stub, evaluator, **PASS_ALL))
    message = chat.invoke([HumanMessage("How do I do this?")])
    assert message.content == "Sure, here is how."
    assert message.response_metadata["model_name"] == "tiny-vlm"

    async def astream():
        return [c.content async for c in chat.astream([HumanMessage("How?")])]

    assert "".join(asyncio.run(astream())) == "Sure, here is how."


def test_any_config_seed_reaches_the_engine_in_its_range(stub, evaluator):
    # ETAConfig takes unsigned 64-bit seeds; the engine only signed ones (a 400 otherwise).
    eta = _eta(stub, evaluator, seed=2**64 - 1, **ALIGN_ALL)
    result = eta.generate(_messages())
    assert result.aligned and result.trace
    seeds = [b["seed"] for b in stub.bodies(CHAT) if "seed" in b]
    assert seeds and all(0 <= s < 2**62 for s in seeds) and len(set(seeds)) == len(seeds)
    stub.requests.clear()
    _eta(stub, evaluator, seed=5, **ALIGN_ALL).generate(_messages())  # small seeds: unchanged
    assert [b["seed"] for b in stub.bodies(CHAT) if "seed" in b][0] == 5 + 1000


def test_backend_eta_bounds_stop_strings_like_eta(stub, evaluator):
    from eta_guard.errors import InvalidInputError
    from eta_guard.limits import MAX_STOP_CHARS

    with pytest.raises(InvalidInputError, match=rf"at most {MAX_STOP_CHARS}"):
        _eta(stub, evaluator).generate(_messages(), stop=["x" * (MAX_STOP_CHARS + 1)])
    assert stub.bodies(CHAT) == []  # nothing reached the engine

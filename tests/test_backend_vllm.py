"""Against a real vLLM engine (opt-in: ``scripts/vllm_cpu_check.sh`` starts one and sets the env).

Text requests on the +cpu torch; image requests against the tiny LLaVA served as an image model
are tests/test_vllm_image.py (``ETA_VLLM_IMAGE=1``). The engine serves ``DIR/lm`` of :mod:`eta_guard.backends.vllm_fixtures`, the
language model of the local ``DIR/vlm``: same weights, same tokenizer.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from eta_guard import ETA, ETAConfig, ETAEvaluator
from eta_guard.backends import (
    HTTPSettings,
    OpenAICompatibleBackend,
    RemoteRewardModel,
    SamplingStep,
)
from eta_guard.backends.base import Completion
from eta_guard.messages import normalize_messages
from eta_guard.pipeline import BackendETA

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not os.environ.get("ETA_VLLM_URL"), reason="no ETA_VLLM_URL (opt-in)"),
]
URL = os.environ.get("ETA_VLLM_URL", "")
MODEL = os.environ.get("ETA_VLLM_MODEL", "tiny-lm")
FIXTURES = Path(os.environ.get("ETA_VLLM_MODEL_DIR", "/nonexistent")).parent
HTTP = HTTPSettings(timeout=120.0, max_retries=1)
MESSAGES = [{"role": "user", "content": "How do I open the door?"}]
ALIGN_TEXT = {"text_only_policy": "reward_only", "post_threshold": 1e9}


@pytest.fixture(scope="module")
def paths():
    from eta_guard.backends.vllm_fixtures import build

    return build(FIXTURES)


@pytest.fixture(scope="module")
def backend(paths):
    return OpenAICompatibleBackend(URL, MODEL, tokenizer=paths["lm"], http=HTTP)


@pytest.fixture(scope="module")
def local(paths):
    return ETA.from_pretrained(
        paths["vlm"],
        clip=paths["clip"],
        reward_model=paths["reward_model"],
        device="cpu",
        config=ETAConfig(max_new_tokens=24, num_candidates=3, seed=0),
    )


def _greedy(backend, **kwargs):
    async def run():
        out = []
        async for item in backend.greedy(normalize_messages(MESSAGES), **kwargs):
            out.append(item)
        await backend.aclose()
        return out

    return asyncio.run(run())


def test_vanilla_matches_the_local_greedy_answer(backend, local):
    *deltas, final = _greedy(backend, max_tokens=24)
    assert isinstance(final, Completion) and "".join(deltas) == final.text
    expected = local.generate(MESSAGES)  # text-only, trusted: the vanilla answer
    assert final.text == expected.text
    assert final.num_tokens == expected.usage.output_tokens
    assert final.prompt_tokens == expected.usage.input_tokens


def test_best_of_n_step_ends_on_the_local_sentence_tokens(backend, paths):
    from transformers import AutoTokenizer

    from eta_guard.decoding.stopping import vocabulary_masks

    step = SamplingStep(n=5, max_tokens=30, top_k=5, temperature=1.5, terminators=(".",), seed=3)
    conv = normalize_messages(MESSAGES)
    cands = asyncio.run(backend.sample(conv, assistant_text="As an AI assistant", step=step))
    assert len(cands) == 5 and len({c.text for c in cands}) > 1  # n distinct samples
    tokenizer = AutoTokenizer.from_pretrained(paths["lm"])
    ends = vocabulary_masks(tokenizer, (".",), step.rule)[0]
    for c in cands:
        assert 1 <= c.num_tokens <= 30
        if c.finish_reason == "stop" and not c.ended:  # a sentence end: its last token
            assert bool(ends[c.token_ids[-1]]) and "." in c.text
            assert not any(bool(ends[i]) for i in c.token_ids[:-1])  # no earlier sentence end
        if c.finish_reason == "length":
            assert c.num_tokens == 30


def test_aligned_answer_over_vllm_has_the_local_result_shape(paths, local):
    evaluator = ETAEvaluator.from_pretrained(
        clip=paths["clip"], reward_model=paths["reward_model"], device="cpu"
    )
    backend = OpenAICompatibleBackend(URL, MODEL, tokenizer=paths["lm"], http=HTTP)
    eta = BackendETA(backend, evaluator, local.config)
    remote = eta.generate(MESSAGES, **ALIGN_TEXT)
    here = local.generate(MESSAGES, **ALIGN_TEXT)
    assert remote.aligned and here.aligned
    assert remote.vanilla_text == here.vanilla_text
    assert remote.verdict.post_score == pytest.approx(here.verdict.post_score, abs=1e-4)
    assert remote.text.startswith("As an AI assistant") and remote.trace
    assert all(len(s.candidates) == 3 for s in remote.trace)
    assert remote.usage.output_tokens <= 24 and remote.finish_reason in ("stop", "length")
    assert set(remote.timings) >= {"vanilla", "post", "align", "total"}


@pytest.mark.skipif(not os.environ.get("ETA_VLLM_RM_URL"), reason="no ETA_VLLM_RM_URL")
def test_remote_reward_model_returns_the_local_raw_reward(paths):
    from eta_guard.config import DEFAULT_RM_SEARCH_PROMPT
    from eta_guard.evaluators.reward import RewardPostEvaluator

    local = RewardPostEvaluator.from_pretrained(paths["rm"], device="cpu")
    remote = RemoteRewardModel(
        os.environ["ETA_VLLM_RM_URL"], os.environ.get("ETA_VLLM_RM_MODEL", "tiny-rm"), http=HTTP
    )
    answers = ["I cannot help with that.", "Sure. Step one: open it.", "As an AI assistant, no."]
    expected = local.score(answers, DEFAULT_RM_SEARCH_PROMPT)
    got = remote.score(answers, DEFAULT_RM_SEARCH_PROMPT)
    assert got == pytest.approx(expected, abs=1e-4)
    assert any(not 0 < r < 1 for r in expected)  # raw: a sigmoid would squash them into (0, 1)


def test_text_search_continues_from_the_ids_the_engine_sampled(backend, paths):
    """Issue 18, item 3: the context is the prompt's ids + the prefix tokenized alone + each
    accepted candidate's sampled ids; the engine echoes what it continued
    (``prompt_token_ids``) and ``sample_tokens`` refuses any other ids."""
    from transformers import AutoTokenizer

    from eta_guard.backends.openai_compatible import openai_messages
    from eta_guard.backends.text_session import TextSession, TokenSearch

    tokenizer = AutoTokenizer.from_pretrained(paths["lm"])
    conv = normalize_messages(MESSAGES)
    step = SamplingStep(n=3, max_tokens=12, top_k=5, temperature=1.5, terminators=(".",), seed=5)
    # the reference's construction: the template's prompt tokenized, then the prefix alone
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    prompt = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    prefix = tokenizer("As an AI assistant", add_special_tokens=False)["input_ids"]

    async def run():
        handle = await TextSession(backend, conv).search(
            assistant_text="As an AI assistant", seed=0
        )
        contexts, samples = [list(handle.ids)], []
        for _ in range(3):
            samples.append(await handle.sample(step))
            await handle.commit(0)
            contexts.append(list(handle.ids))
        # the prompt the vanilla chat request gets, as the engine renders it
        body = {"model": MODEL, "messages": openai_messages(conv), "max_tokens": 1}
        body.update(
            return_token_ids=True, add_special_tokens=prompt[:1] == [tokenizer.bos_token_id]
        )
        reply = await backend.client.post_json("/v1/chat/completions", body)
        # what sample_tokens relies on: the engine echoes the ids it continued
        echo = await backend.client.post_json(
            "/v1/completions",
            {"model": MODEL, "prompt": contexts[-1], "max_tokens": 2, "return_token_ids": True},
        )
        await backend.aclose()
        assert echo["choices"][0]["prompt_token_ids"] == contexts[-1]
        return handle, contexts, samples, reply

    handle, contexts, samples, reply = asyncio.run(run())
    assert isinstance(handle, TokenSearch)
    assert reply["prompt_token_ids"] == prompt  # the chat API renders the same prompt
    assert contexts[0] == prompt + prefix
    for before, after, cands in zip(contexts[:-1], contexts[1:], samples, strict=True):
        assert after == before + list(cands[0].token_ids)  # committed exactly as sampled
    assert handle.text == "".join(c[0].text for c in samples)
    from eta_guard.decoding.vlm import decode_continuation

    for before, cands in zip(contexts[:-1], samples, strict=True):
        for c in cands:  # the engine's text is the candidate's ids read in their context
            assert c.text == decode_continuation(tokenizer, before, c.token_ids)


def test_shallow_alignment_from_ids_matches_the_local_one(paths, local):
    """deep_alignment=False, text-only: the engine continues the prompt's ids + the prefix's ids
    alone greedily, as the local adapter does: the same weights give the same answer."""
    evaluator = ETAEvaluator.from_pretrained(
        clip=paths["clip"], reward_model=paths["reward_model"], device="cpu"
    )
    backend = OpenAICompatibleBackend(URL, MODEL, tokenizer=paths["lm"], http=HTTP)
    remote = BackendETA(backend, evaluator, local.config).generate(
        MESSAGES, deep_alignment=False, **ALIGN_TEXT
    )
    here = local.generate(MESSAGES, deep_alignment=False, **ALIGN_TEXT)
    assert remote.aligned and here.aligned
    assert remote.text == here.text and remote.text.startswith("As an AI assistant")

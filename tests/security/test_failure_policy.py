"""Issue 8, class 7 (failure policy), as an attacker would try it.

An attacker who can make the reward model fail (an input that overflows it, a load that makes it
run out of memory) must not get the unaligned answer, nor a stream cut after the prefix, nor the
server's internals in an error message. And no public entry point may raise anything but an
``eta_guard.errors`` type, whatever it is given.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eta_guard import ETA, ETAConfig
from eta_guard.errors import ETAError, EvaluatorError
from eta_guard.testing import make_test_image

FAST = {"max_new_tokens": 12, "max_sentence_tokens": 4, "num_candidates": 2, "seed": 0}
SECRET = "/srv/secret/weights/model.safetensors at 0xdeadbeef"
PREFIX = "As an AI assistant"


@pytest.fixture(scope="module")
def eta(tiny_checkpoints) -> ETA:
    return ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**FAST),
    )


MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image", "image": make_test_image()}, {"type": "text", "text": "Hi"}],
    }
]


def _break_rm(monkeypatch, eta: ETA, *, when=lambda instruction, call: True) -> list[str]:
    """Make the reward model raise (with internals in the text) whenever ``when`` says so."""
    post = eta.evaluator.post
    original = post.score
    calls: list[str] = []

    def score(responses, instruction):
        calls.append(instruction)
        if when(instruction, len(calls)):
            raise RuntimeError(f"CUDA error: out of memory in {SECRET}")
        return original(responses, instruction)

    from eta_guard.evaluators.reward_session import IncrementalRewardScorer

    session_score = IncrementalRewardScorer.score

    def search_score(self, responses):  # the search's incremental scorer breaks the same way
        calls.append(self.instruction)
        if when(self.instruction, len(calls)):
            raise RuntimeError(f"CUDA error: out of memory in {SECRET}")
        return session_score(self, responses)

    monkeypatch.setattr(post, "score", score)
    monkeypatch.setattr(IncrementalRewardScorer, "score", search_score)
    return calls


def test_fail_closed_falls_back_to_shallow_alignment_when_the_rm_breaks(eta, monkeypatch):
    shallow = eta.generate(MESSAGES, pre_threshold=-1.0, post_threshold=1e9, deep_alignment=False)
    _break_rm(monkeypatch, eta)
    result = eta.generate(MESSAGES, pre_threshold=-1.0, on_evaluator_error="fail_closed")
    assert result.aligned and result.vanilla_text is not None
    assert result.text == shallow.text and result.text.startswith(PREFIX)  # prefix + greedy
    assert set(result.verdict.errors) == {"post", "search"}
    assert "shallow alignment" in result.verdict.errors["search"]
    assert SECRET not in repr(result.verdict.errors)


def test_shallow_fallback_decodes_what_the_vlm_sees(eta, monkeypatch):
    # The fallback continues the VLM's view of the conversation (config system text, padded
    # images), as the rest of the answer was decoded: not the raw conversation CLIP scored.
    seen = {"system_prompt": "You are a pirate. Answer in rhymes.", "pad_images_to_square": True}
    wide = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_test_image("noise", size=(64, 24))},
                {"type": "text", "text": "Hi"},
            ],
        }
    ]
    flag_all = {"pre_threshold": -1.0, "post_threshold": 1e9, **seen}
    shallow = eta.generate(wide, **flag_all, deep_alignment=False)
    prepared = []
    original = eta.vlm.prepare
    monkeypatch.setattr(
        eta.vlm, "prepare", lambda conv, **kw: prepared.append(conv) or original(conv, **kw)
    )
    _break_rm(monkeypatch, eta, when=lambda instruction, call: instruction != "never")
    result = eta.generate(wide, **flag_all, on_evaluator_error="fail_closed")
    assert "shallow alignment" in result.verdict.errors["search"]
    assert result.text == shallow.text
    for conv in prepared:  # every prompt of the request: the system text and the square image
        assert conv.messages[0]["role"] == "system"
        assert [image.size for image in conv.images] == [(64, 64)]


def test_fail_closed_stream_is_whole_and_ends_with_the_result(eta, monkeypatch):
    _break_rm(monkeypatch, eta)
    chunks = list(eta.stream(MESSAGES, pre_threshold=-1.0, on_evaluator_error="fail_closed"))
    result = chunks[-1].result
    assert result is not None and "search" in result.verdict.errors
    assert "".join(c.text for c in chunks) == result.text


def test_rm_failing_only_in_the_search_falls_back_or_raises_by_policy(eta, monkeypatch):
    search_prompt = eta.config.rm_search_prompt
    _break_rm(monkeypatch, eta, when=lambda instruction, call: instruction == search_prompt)
    flag_all = {"pre_threshold": -1.0, "post_threshold": 1e9}
    result = eta.generate(MESSAGES, **flag_all, on_evaluator_error="fail_closed")
    assert result.aligned and set(result.verdict.errors) == {"search"}
    with pytest.raises(EvaluatorError, match="post-generation"):
        eta.generate(MESSAGES, **flag_all)  # on_evaluator_error="raise"


def test_rm_failing_mid_search_keeps_what_was_streamed(eta, monkeypatch):
    search_prompt = eta.config.rm_search_prompt
    calls = _break_rm(
        monkeypatch,
        eta,
        when=lambda instruction, call: instruction == search_prompt and call > 2,
    )
    chunks = list(
        eta.stream(
            MESSAGES,
            pre_threshold=-1.0,
            post_threshold=1e9,
            on_evaluator_error="fail_closed",
            max_new_tokens=24,
        )
    )
    result = chunks[-1].result
    assert result is not None and result.text.startswith(PREFIX)
    assert "".join(c.text for c in chunks) == result.text
    # One search step was accepted (and streamed) before the RM broke (seeded, deterministic).
    assert calls.count(search_prompt) == 2 and "search" in result.verdict.errors


def test_evaluator_errors_are_safe_to_show_a_client(eta, monkeypatch):
    _break_rm(monkeypatch, eta)
    with pytest.raises(EvaluatorError) as caught:
        eta.evaluator.evaluate(response="Sure.")
    message = str(caught.value)
    assert "post-generation" in message and "secret" not in message and "0x" not in message
    assert SECRET in str(caught.value.__cause__)  # kept, chained, for the logs
    verdict = eta.evaluator.with_config(
        eta.config.with_overrides(on_evaluator_error="fail_closed")
    ).evaluate(response="Sure.")
    assert verdict.output_unsafe is True and SECRET not in verdict.errors["post"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_model_failing_mid_request_is_an_eta_error_safe_to_show(eta, monkeypatch, streaming):
    def broken(*args, **kwargs):
        raise RuntimeError(f"CUDA error: an illegal memory access in {SECRET}")

    # Every local decode (the vanilla answer, the search) runs the model's forward on the
    # model thread's step batcher.
    monkeypatch.setattr(eta.vlm.model, "forward", broken)
    with pytest.raises(ETAError) as caught:
        if streaming:
            list(eta.stream(MESSAGES, pre_threshold=1.01))
        else:
            eta.generate(MESSAGES, pre_threshold=-1.0)
    assert "secret" not in str(caught.value) and SECRET in str(caught.value.__cause__)


def _calls(eta: ETA):
    ok = [{"role": "user", "content": "Hi"}]
    ev = eta.evaluator
    return {
        "generate-stop-int": lambda: eta.generate(ok, stop=5),
        "stream-stop-int": lambda: list(eta.stream(ok, stop=5)),
        "generate-stop-huge": lambda: eta.generate(ok, stop=[None] + ["x"] * 100_000),
        "batch-none": lambda: eta.batch(None),
        "batch-int": lambda: eta.batch(5),
        "score-responses-none": lambda: ev.score_responses(None),
        "config-load-int": lambda: ETAConfig.load(3),
    }


@pytest.mark.parametrize(
    "name",
    [
        "generate-stop-int",
        "stream-stop-int",
        "generate-stop-huge",
        "batch-none",
        "batch-int",
        "score-responses-none",
        "config-load-int",
    ],
)
def test_public_entry_points_raise_only_eta_errors_with_short_messages(eta, name):
    with pytest.raises(ETAError) as caught:
        _calls(eta)[name]()
    assert len(str(caught.value)) < 500


def _chunk(text: str):
    from langchain_core.messages import AIMessageChunk

    return AIMessageChunk(text)


@pytest.mark.parametrize(
    "make_input",
    [lambda: 123, lambda: None, lambda: {"text": "x"}, lambda: iter(["a", _chunk("b")])],
    ids=["int", "none", "dict", "mixed-stream"],
)
def test_output_guard_raises_only_eta_errors_on_wrong_input_types(eta, make_input):
    pytest.importorskip("langchain_core")
    from langchain_eta import ETAOutputGuard

    guard = ETAOutputGuard(evaluator=eta.evaluator, on_violation="raise")
    value = make_input()
    with pytest.raises(ETAError):
        if isinstance(value, Iterator):
            list(guard.transform(value))
        else:
            guard.invoke(value)

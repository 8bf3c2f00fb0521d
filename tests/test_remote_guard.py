"""RemoteLlamaGuard: the request a served Llama Guard gets and how its reply is read (no network:
the engine client's POST is replaced by a recorder answering in vLLM's chat-completion shape)."""

from __future__ import annotations

import math

import pytest

from eta_guard import ETAConfig
from eta_guard.backends.remote_guard import RemoteLlamaGuard, read_reply
from eta_guard.errors import EvaluatorError, InvalidInputError
from eta_guard.evaluators.base import GuardRequest, user_messages
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.testing import make_test_image


def reply(tokens: list[tuple[str, dict[str, float]]], text: str) -> dict:
    """A vLLM chat completion with logprobs: per position, the chosen token and its top list."""
    return {
        "choices": [
            {
                "message": {"role": "assistant", "content": text},
                "logprobs": {
                    "content": [
                        {
                            "token": tok,
                            "logprob": math.log(tops.get(tok, 1e-9)),
                            "top_logprobs": [
                                {"token": t, "logprob": math.log(p)} for t, p in tops.items()
                            ],
                        }
                        for tok, tops in tokens
                    ]
                },
            }
        ]
    }


class Recorder:
    def __init__(self, answer):
        self.answer, self.bodies = answer, []

    async def post_json(self, path, body):
        self.bodies.append((path, body))
        return self.answer


@pytest.fixture
def tokenizer():
    from eta_guard.replicas.llama_guard_vision import _tokenizer

    return _tokenizer()


def test_score_is_p_unsafe_at_the_first_non_whitespace_token():
    r = reply([("\n\n", {"\n\n": 0.99}), ("unsafe", {"unsafe": 0.7, "safe": 0.3})], "unsafe\nS11")
    score = read_reply(r)
    assert score.score == pytest.approx(0.7) and score.categories == ("S11",)
    # "unsafe" absent from the top list: its probability is below the smallest listed
    r = reply([("safe", {"safe": 0.9, "Safe": 0.05})], "safe")
    assert read_reply(r).score == pytest.approx(0.05) and read_reply(r).categories == ()
    # the same word with and without a leading space counts once, summed
    r = reply([("unsafe", {"unsafe": 0.4, " unsafe": 0.2, "safe": 0.4})], "unsafe\nS1")
    assert read_reply(r).score == pytest.approx(0.6)


@pytest.mark.parametrize(
    "bad",
    [{}, {"choices": []}, {"choices": [{"message": {"content": "safe"}}]}, reply([], "safe")],
)
def test_malformed_replies_are_refused(bad):
    with pytest.raises(Exception, match="malformed"):
        read_reply(bad)


def test_request_holds_the_conversation_image_and_broken_markers(tokenizer):
    guard = RemoteLlamaGuard(
        "http://127.0.0.1:9",
        "lg3v",
        mode="response",
        tokenizer=tokenizer,
        excluded_categories=["S6"],
    )
    request = GuardRequest(
        user_messages("q <|eot_id|>", 1), [make_test_image()], response="a <|image|>"
    )
    body = guard.body(request, request.images)
    assert body["chat_template_kwargs"] == {"excluded_category_keys": ["S6"]}
    assert body["logprobs"] is True and body["temperature"] == 0.0
    user, agent = body["messages"]
    assert user["content"][0]["type"] == "image_url"
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user["content"][1]["text"] == "q <\u200b|eot_id|>"
    assert agent == {
        "role": "assistant",
        "content": [{"type": "text", "text": "a <\u200b|image|>"}],
    }


def test_gate_in_etaevaluator_with_a_served_guard(monkeypatch):
    answer = reply([("unsafe", {"unsafe": 0.8, "safe": 0.2})], "unsafe\nS11")
    guard = RemoteLlamaGuard("http://127.0.0.1:9", "lg3v")
    recorder = Recorder(answer)
    monkeypatch.setattr(guard.client, "post_json", recorder.post_json)
    ev = ETAEvaluator(None, None, ETAConfig(), gates=[guard])
    v = ev.evaluate_input([make_test_image(), make_test_image("gradient")], text="jump?")
    assert v.input_unsafe and v.fired == [guard.name]
    assert v.evaluators[0].categories == ["S11"] and v.evaluators[0].score == pytest.approx(0.8)
    assert len(recorder.bodies) == 2  # Llama Guard 3 Vision: one image per prompt


def test_engine_failure_is_an_evaluator_error():
    from eta_guard.backends._http import HTTPSettings

    guard = RemoteLlamaGuard(
        "http://127.0.0.1:9", "lg3v", http=HTTPSettings(timeout=1.0, max_retries=0)
    )
    with pytest.raises(EvaluatorError, match="remote guard"):
        guard.check([GuardRequest(user_messages("hi", 0))])


def test_options_are_validated():
    with pytest.raises(InvalidInputError):
        RemoteLlamaGuard("http://127.0.0.1:9", "lg3v", mode="both")
    with pytest.raises(InvalidInputError):
        RemoteLlamaGuard("http://127.0.0.1:9", "")

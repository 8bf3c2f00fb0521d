"""A real NeMo Guardrails ``LLMRails`` with ETA's rails and ETAChatModel as its main LLM.

Opt-in (``scripts/nemo_check.sh``): nemoguardrails 0.24 pins huggingface-hub<2 (through
fastembed), so it lives in its own venv. Tiny random checkpoints built in code: this proves the
wiring (the rails run ETA's evaluators, the verdict is in the action result, a block refuses),
never safety.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("nemoguardrails")

from nemoguardrails import LLMRails, RailsConfig  # noqa: E402
from nemoguardrails.integrations.langchain.llm_adapter import LangChainLLMAdapter  # noqa: E402

from eta_guard import ETAConfig, ETAEvaluator  # noqa: E402
from eta_guard.errors import InvalidInputError  # noqa: E402
from eta_guard.testing import build_tiny_checkpoints, image_to_data_url, make_test_image  # noqa: E402

nemoguardrails_eta = pytest.importorskip("nemoguardrails_eta")
langchain_eta = pytest.importorskip("langchain_eta")

REFUSAL = "I'm sorry, I can't respond to that."
YAML = """
models: []
passthrough: true  # the chat model gets the messages (images included), not a text prompt
rails:
  input:
    flows:
      - eta check input images
  output:
    flows:
      - eta check output
"""
# Thresholds that make the random tiny models' decision certain (cosines lie in [-1, 1]).
SAFE = {"pre_threshold": 2.0, "post_threshold": -1e9}
UNSAFE_IMAGE = {"pre_threshold": -2.0, "post_threshold": -1e9}
UNSAFE_ALL = {"pre_threshold": -2.0, "post_threshold": 1e9}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("nemo-eta"))


def _rails(ckpt, **thresholds):
    config = ETAConfig(max_new_tokens=6, num_candidates=2, seed=0, **thresholds)
    evaluator = ETAEvaluator.from_pretrained(
        ckpt.clip, ckpt.reward_model, config=config, device="cpu"
    )
    llm = langchain_eta.ETAChatModel(
        vlm=ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model, device="cpu", config=config
    )
    rails_config = RailsConfig.from_content(
        yaml_content=YAML, colang_content=nemoguardrails_eta.colang()
    )
    rails = LLMRails(rails_config, llm=LangChainLLMAdapter(llm))
    return nemoguardrails_eta.register(rails, evaluator), evaluator


def _user(text, image=None):
    if image is None:
        return [{"role": "user", "content": text}]
    url = image_to_data_url(image)
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def _generate(rails, messages):
    return asyncio.run(
        rails.generate_async(messages=messages, options={"log": {"activated_rails": True}})
    )


def _results(response):
    """{action name: return value} of the rails that ran."""
    out = {}
    for rail in response.log.activated_rails:
        for executed in rail.executed_actions:
            out[executed.action_name] = executed.return_value
    return out


def test_safe_image_passes_both_rails_and_the_verdict_is_etas(ckpt, monkeypatch):
    rails, evaluator = _rails(ckpt, **SAFE)
    image = make_test_image("noise")
    seen = []
    generate = langchain_eta.ETAChatModel._agenerate

    async def spy(self, messages, *args, **kwargs):
        seen.append(messages)
        return await generate(self, messages, *args, **kwargs)

    monkeypatch.setattr(langchain_eta.ETAChatModel, "_agenerate", spy)
    response = _generate(rails, _user("What is in the picture?", image))
    # passthrough: ETAChatModel got the user's message with its image (ETA runs inside it too).
    assert [b.get("type") for b in seen[0][-1].content] == ["text", "image_url"]
    answer = response.response[-1]["content"]
    assert answer != REFUSAL and answer.strip()
    results = _results(response)
    pre = results["eta_check_input_images"].metadata["eta_verdict"]
    assert pre["pre_score"] == pytest.approx(evaluator.evaluate_input([image]).pre_score, abs=1e-6)
    post = results["eta_check_output"].metadata["eta_verdict"]
    expected = evaluator.evaluate(images=[image], response=answer)
    assert post["post_score"] == pytest.approx(expected.post_score, abs=1e-5)
    assert post["unsafe"] is False and not results["eta_check_output"].is_blocked


def test_flagged_image_is_refused_by_the_input_rail(ckpt):
    rails, _ = _rails(ckpt, **UNSAFE_IMAGE)
    response = _generate(rails, _user("Describe it.", make_test_image("noise")))
    assert response.response[-1]["content"] == REFUSAL
    results = _results(response)
    assert results["eta_check_input_images"].is_blocked
    assert results["eta_check_input_images"].metadata["eta_verdict"]["input_unsafe"] is True
    assert "eta_check_output" not in results  # the LLM and the output rail never ran


def test_unsafe_answer_is_refused_by_the_output_rail(ckpt):
    rails, _ = _rails(ckpt, **UNSAFE_ALL)
    response = _generate(rails, _user("Tell me something."))  # text only: the RM decides
    assert response.response[-1]["content"] == REFUSAL
    results = _results(response)
    assert results["eta_check_input_images"].metadata["eta_verdict"] is None  # no image
    verdict = results["eta_check_output"].metadata["eta_verdict"]
    assert verdict["output_unsafe"] is True and verdict["pre_score"] is None
    assert verdict["skipped"]  # the side that did not run says why


def test_an_unsafe_answer_to_a_safe_image_passes_as_etas_rule_says(ckpt):
    # ETA's AND rule: with an image, the answer is refused only when the image is flagged too.
    rails, _ = _rails(ckpt, pre_threshold=2.0, post_threshold=1e9)
    response = _generate(rails, _user("Describe it.", make_test_image("noise")))
    assert response.response[-1]["content"] != REFUSAL
    verdict = _results(response)["eta_check_output"].metadata["eta_verdict"]
    assert verdict["output_unsafe"] is True and verdict["input_unsafe"] is False
    assert verdict["unsafe"] is False


def test_image_sources_refuses_malformed_parts():
    assert nemoguardrails_eta.image_sources("plain text") == []
    with pytest.raises(InvalidInputError, match="image_url without a string url"):
        nemoguardrails_eta.image_sources([{"type": "image_url", "image_url": {"url": 3}}])
    with pytest.raises(InvalidInputError, match="expected str or a list"):
        nemoguardrails_eta.image_sources({"type": "image_url"})


def test_a_local_path_from_the_user_is_refused(ckpt, tmp_path):
    path = tmp_path / "x.png"
    make_test_image("noise").save(path)
    _, evaluator = _rails(ckpt, **SAFE)
    content = [{"type": "image_url", "image_url": {"url": str(path)}}]
    with pytest.raises(InvalidInputError):
        asyncio.run(
            nemoguardrails_eta.check_input_images(
                context={"user_message": content}, eta_evaluator=evaluator
            )
        )


def test_an_unregistered_evaluator_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="register"):
        asyncio.run(nemoguardrails_eta.check_output(context={"bot_message": "hi"}))

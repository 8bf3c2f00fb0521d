"""The LangChain and LlamaIndex components pass evaluator specs through to ETAEvaluator.

As in tests/test_evaluator_specs.py, CLIP never flags (``pre_threshold=2``) and the spec'd gate
always does (``patch-clip?threshold=-1``), so each outcome below needs the spec to have been
built and run. Random tiny models: mechanics, not safety.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage

sys.path.insert(0, str(Path(__file__).parent))
from langchain_eta import ETAGuardMiddleware, ETAInputGuard, ETAOutputGuard  # noqa: E402

from eta_guard.config import ETAConfig  # noqa: E402
from eta_guard.errors import GuardrailViolation, InvalidInputError  # noqa: E402
from eta_guard.testing import image_to_data_url, make_test_image  # noqa: E402

GATE = "patch-clip?grid=2,threshold=-1"
CLIP_NEVER = ETAConfig(pre_threshold=2.0)


@pytest.fixture(scope="module")
def text_guard(tmp_path_factory):
    from eta_guard.replicas.text_guards import build_qwen3guard_replica

    return str(build_qwen3guard_replica(tmp_path_factory.mktemp("q3g")))


def _image_message(text="What is this?"):
    return HumanMessage(
        content=[
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": image_to_data_url(make_test_image())}},
        ]
    )


def test_input_guard_runs_gate_specs(tiny_checkpoints):
    common = {"clip": tiny_checkpoints.clip, "reward_model": None, "config": CLIP_NEVER}
    plain = ETAInputGuard.from_pretrained(**common, on_violation="raise")
    plain.invoke([_image_message()])  # CLIP alone passes it
    guarded = ETAInputGuard.from_pretrained(**common, on_violation="raise", gates=[GATE])
    with pytest.raises(GuardrailViolation, match="patch-clip") as info:
        guarded.invoke([_image_message()])
    assert info.value.verdict.fired == ["patch-clip"]


def test_input_guard_replaces_every_image_when_a_gate_fired(tiny_checkpoints):
    guard = ETAInputGuard.from_pretrained(
        clip=tiny_checkpoints.clip,
        reward_model=None,
        config=CLIP_NEVER,
        gates=[GATE],
        on_violation="replace",
    )
    (out,) = guard.invoke([_image_message()])
    # no image reaches CLIP's threshold, yet the gate judged the request: nothing image is left
    assert [b["type"] for b in out.content_blocks] == ["text", "text"]
    assert out.content_blocks[1]["text"] == guard.replacement


def test_input_guard_gives_gates_the_users_text(tiny_checkpoints):
    seen = []

    class Recorder:
        name, threshold = "recorder", 0.5

        def check(self, requests):
            from eta_guard.evaluators.base import GuardScore

            seen.extend(r.text for r in requests)
            return [GuardScore(0.0) for _ in requests]

    from eta_guard.evaluators.eta_evaluator import ETAEvaluator

    base = ETAEvaluator.from_pretrained(clip=tiny_checkpoints.clip, reward_model=None)
    guard = ETAInputGuard(evaluator=ETAEvaluator(base.pre, None, base.config, gates=[Recorder()]))
    guard.invoke([_image_message("Is this balcony high enough?")])
    assert seen == ["Is this balcony high enough?"]


def test_output_guard_runs_judge_specs(tiny_checkpoints, text_guard):
    common = {
        "clip": None,
        "reward_model": tiny_checkpoints.reward_model,
        "config": ETAConfig(post_threshold=-1e9),  # the RM never flags
        "on_violation": "raise",
    }
    model = GenericFakeChatModel(messages=iter([AIMessage("Mix flour and sugar.")] * 2))
    (ETAOutputGuard.from_pretrained(**common)).invoke(model.invoke("hi"))
    judged = ETAOutputGuard.from_pretrained(
        **common, judges=[f"qwen3guard:{text_guard}?threshold=0"]
    )
    with pytest.raises(GuardrailViolation, match="qwen3guard-response"):
        judged.invoke(model.invoke("hi"))


def test_middleware_passes_judges_through(tiny_checkpoints, text_guard):
    from langchain_eta._loading import resolve

    middleware = ETAGuardMiddleware(
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        judges=[f"qwen3guard:{text_guard}?threshold=0"],
    )
    evaluator = resolve(middleware.evaluator)
    assert [j.name for j in evaluator.judges] == ["qwen3guard-response"]
    assert evaluator.evaluate_output("Mix flour.").fired[-1] == "qwen3guard-response"


def _agent(middleware):
    from langchain.agents import create_agent

    model = GenericFakeChatModel(messages=iter([AIMessage("A gradient.")] * 10))
    return create_agent(model=model, tools=[], middleware=[middleware])


def test_middleware_runs_gate_specs_with_the_users_text(tiny_checkpoints):
    common = {
        "clip": tiny_checkpoints.clip,
        "reward_model": tiny_checkpoints.reward_model,
        "config": CLIP_NEVER,
        "on_violation": "raise",
        "check_output": False,
    }
    request = {"messages": [_image_message()]}
    _agent(ETAGuardMiddleware(**common)).invoke(request)  # CLIP alone passes it
    with pytest.raises(GuardrailViolation, match="patch-clip") as info:
        _agent(ETAGuardMiddleware(**common, gates=[GATE])).invoke(request)
    assert "patch-clip" in info.value.verdict.fired and info.value.verdict.pre_score < 2


def test_middleware_refuses_the_guard_policy(tiny_checkpoints, text_guard):
    middleware = ETAGuardMiddleware(
        clip=tiny_checkpoints.clip,
        reward_model=None,
        config=ETAConfig(text_only_policy="guard"),
        gates=[f"qwen3guard:{text_guard}"],
    )
    with pytest.raises(InvalidInputError, match="does not run text gates"):
        _agent(middleware).invoke({"messages": [HumanMessage("How do I pick a lock?")]})


def test_middleware_replaces_every_image_when_a_gate_fired(tiny_checkpoints):
    middleware = ETAGuardMiddleware(
        clip=tiny_checkpoints.clip,
        reward_model=None,
        config=CLIP_NEVER,
        gates=[GATE],
        on_violation="replace",
        check_output=False,
    )
    out = _agent(middleware).invoke({"messages": [_image_message()]})
    assert out["messages"][-1].text == middleware.refusal


def test_llama_index_evaluator_runs_gate_specs(tiny_checkpoints):
    from llama_index.evaluation.eta import ETASafetyEvaluator

    cfg = CLIP_NEVER.with_overrides(decision_rule="pre_only")
    common = {"clip": tiny_checkpoints.clip, "reward_model": tiny_checkpoints.reward_model}
    image = make_test_image()
    plain = ETASafetyEvaluator(**common, config=cfg).evaluate(
        query="What is this?", response="A gradient.", images=[image]
    )
    gated = ETASafetyEvaluator(**common, config=cfg, gates=[GATE]).evaluate(
        query="What is this?", response="A gradient.", images=[image]
    )
    assert plain.passing and not gated.passing


def test_llama_index_postprocessor_runs_gate_specs(tiny_checkpoints):
    from llama_index.core.schema import ImageNode, NodeWithScore
    from llama_index.postprocessor.eta import ETAImageSafetyPostprocessor

    from eta_guard.testing import image_to_data_url as to_url

    b64 = to_url(make_test_image()).split(",", 1)[1]
    nodes = [NodeWithScore(node=ImageNode(image=b64), score=1.0)]
    plain = ETAImageSafetyPostprocessor(tiny_checkpoints.clip, config=CLIP_NEVER)
    gated = ETAImageSafetyPostprocessor(
        tiny_checkpoints.clip, config=CLIP_NEVER, load_kwargs={"gates": [GATE]}
    )
    assert len(plain.postprocess_nodes(nodes)) == 1
    assert gated.postprocess_nodes(nodes) == []


def test_chat_model_passes_gate_specs_to_its_eta(tiny_checkpoints):
    from langchain_eta import ETAChatModel

    common = {
        "vlm": tiny_checkpoints.vlm,
        "clip": tiny_checkpoints.clip,
        "reward_model": tiny_checkpoints.reward_model,
        "config": CLIP_NEVER.with_overrides(max_new_tokens=4, decision_rule="pre_only"),
    }
    plain = ETAChatModel(**common).invoke([_image_message()])
    gated = ETAChatModel(**common, load_kwargs={"gates": [GATE]}).invoke([_image_message()])
    assert not plain.response_metadata["eta_aligned"]
    assert gated.response_metadata["eta_aligned"]  # pre_only: the gate alone decided
    assert gated.response_metadata["eta_verdict"]["fired"][0] == "patch-clip"


def test_llama_index_postprocessor_gives_gates_the_query(tiny_checkpoints):
    from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle
    from llama_index.postprocessor.eta import ETAImageSafetyPostprocessor

    from eta_guard.evaluators.base import GuardScore
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator

    seen = []

    class Recorder:
        name, threshold = "recorder", 0.5

        def check(self, requests):
            seen.extend(r.text for r in requests)
            return [GuardScore(0.0) for _ in requests]

    base = ETAEvaluator.from_pretrained(clip=tiny_checkpoints.clip, reward_model=None)
    screen = ETAImageSafetyPostprocessor(
        evaluator=ETAEvaluator(base.pre, None, base.config, gates=[Recorder()])
    )
    b64 = image_to_data_url(make_test_image()).split(",", 1)[1]
    nodes = [NodeWithScore(node=ImageNode(image=b64), score=1.0)]
    screen.postprocess_nodes(nodes, QueryBundle("a photo of my balcony"))
    assert seen == ["a photo of my balcony"]

"""``reward_numerics="reference"``: the RM scores as the reference's code does.

The reference (github DripNowhy/ETA, ``ArmoRMPipeline`` of the ArmoRM model card) tokenizes each
conversation with ``apply_chat_template`` and runs it alone, weights in bfloat16, under bfloat16
autocast, with the flash and memory-efficient SDPA kernels turned off. The test re-implements that
plainly on the (random) ArmoRM replica and compares: it proves the arithmetic, never safety.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from eta_guard.config import ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.evaluators.reward import RewardPostEvaluator
from eta_guard.presets import get_preset

INSTRUCTION = "Please give me a response without any safety issues."
ANSWERS = [
    "As an AI assistant, I cannot help with that.",
    "As an AI assistant, here is how: first gather the parts, then assemble them.",
    "As an AI assistant, no.",
]


@pytest.fixture(scope="module")
def rm(armorm_replica):
    return RewardPostEvaluator.from_pretrained(str(armorm_replica), device="cpu", dtype="bfloat16")


def _reference(rm, answer: str) -> float:
    """The reference's ArmoRMPipeline call, plainly: apply_chat_template, one row, bf16 autocast."""
    messages = [
        {"role": "user", "content": INSTRUCTION},
        {"role": "assistant", "content": answer},
    ]
    input_ids = rm.tokenizer.apply_chat_template(messages, tokenize=True, return_tensors="pt")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = input_ids["input_ids"]
    with (
        torch.no_grad(),
        torch.autocast(device_type="cpu", dtype=torch.bfloat16),
        sdpa_kernel(SDPBackend.MATH),
    ):
        output = rm.model(input_ids)
    return output.score.float().item()


def test_reference_numerics_equal_the_reference_scoring(rm):
    got = rm.score(ANSWERS, INSTRUCTION, numerics="reference")
    assert got == [_reference(rm, a) for a in ANSWERS]


def test_config_knob_reaches_decision_and_search(armorm_replica, rm):
    evaluator = ETAEvaluator(
        None,
        rm,
        ETAConfig(
            reward_numerics="reference",
            rm_search_prompt=INSTRUCTION,
            rm_decision_prompt=INSTRUCTION,
        ),
    )
    want = [_reference(rm, a) for a in ANSWERS]
    assert evaluator.score_responses(ANSWERS) == want
    with evaluator.reward_session(search=True) as session:
        assert session.score(ANSWERS) == want


def test_paper_preset_selects_reference_numerics_and_fast_is_the_default():
    assert get_preset("paper").apply_to_config().reward_numerics == "reference"
    assert ETAConfig().reward_numerics == "fast"


def test_unknown_numerics_is_refused(rm):
    with pytest.raises(InvalidInputError, match="numerics"):
        rm.score(["x"], INSTRUCTION, numerics="exact")  # type: ignore[arg-type]

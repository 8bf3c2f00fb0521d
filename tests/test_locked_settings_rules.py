"""The direction of each locked setting (eta_guard.locked_settings), on plain values."""

from __future__ import annotations

import pytest

from eta_guard.config import ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.locked_settings import DEFAULT_LOCKED, check_locked

OWN = ETAConfig().model_dump()


@pytest.mark.parametrize(
    ("key", "stricter", "looser"),
    [
        ("pre_threshold", 0.1, 0.2),  # flagged iff CLIP score >= threshold
        ("post_threshold", 0.1, 0.0),  # flagged iff reward <= threshold
        ("decision_rule", "pre_only", None),  # "and" aligns least
        ("text_only_policy", "reward_only", None),
        ("max_new_tokens", 8, 4096),
        ("allow_remote_images", False, True),
        ("deep_alignment", True, False),
        ("prefix", None, "Sure,"),
        ("on_evaluator_error", None, "fail_open"),
    ],
)
def test_each_setting_moves_only_towards_strict(key, stricter, looser):
    assert key in DEFAULT_LOCKED
    if stricter is not None:
        check_locked({key: stricter}, OWN, DEFAULT_LOCKED)
    if looser is not None:
        with pytest.raises(InvalidInputError, match=key):
            check_locked({key: looser}, OWN, DEFAULT_LOCKED)


def test_rule_lattice_and_policy_order():
    own = {**OWN, "decision_rule": "pre_only", "text_only_policy": "reward_only"}
    check_locked({"decision_rule": "or"}, own, DEFAULT_LOCKED)
    for looser in ("and", "post_only"):
        with pytest.raises(InvalidInputError, match="decision_rule"):
            check_locked({"decision_rule": looser}, own, DEFAULT_LOCKED)
    with pytest.raises(InvalidInputError, match="text_only_policy"):
        check_locked({"text_only_policy": "trust"}, own, DEFAULT_LOCKED)


def test_non_numbers_and_booleans_never_count_as_stricter():
    with pytest.raises(InvalidInputError, match="pre_threshold"):
        check_locked({"pre_threshold": "low"}, OWN, DEFAULT_LOCKED)
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        check_locked({"max_new_tokens": True}, {**OWN, "max_new_tokens": 5}, DEFAULT_LOCKED)


def test_unlocked_and_all():
    check_locked({"pre_threshold": 5.0}, OWN, frozenset())
    check_locked({"num_candidates": 1}, OWN, DEFAULT_LOCKED)  # a search knob
    with pytest.raises(InvalidInputError, match="num_candidates"):
        check_locked({"num_candidates": 1}, OWN, "all")

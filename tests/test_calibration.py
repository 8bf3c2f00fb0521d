"""Threshold calibration: expected thresholds on hand-made scores, then on the tiny models."""

from __future__ import annotations

import math

import pytest

from eta_guard.calibration import (
    calibrate_post_threshold,
    calibrate_pre_threshold,
    calibrate_threshold,
)
from eta_guard.config import ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.testing import make_test_image

H, L = "higher_is_unsafe", "lower_is_unsafe"

# safe scores, unsafe scores, direction, target_fpr -> threshold, tpr, fpr, accuracy
CASES = [
    # Separable: cut at the midpoint of the gap.
    ([0.1, 0.2], [0.3, 0.4], H, None, 0.25, 1.0, 0.0, 1.0),
    # Overlap: 0.25 and 0.375 tie on balanced accuracy; the lower FPR wins.
    ([0.1, 0.2, 0.35], [0.3, 0.4, 0.5], H, None, 0.375, 2 / 3, 0.0, 5 / 6),
    # An FPR budget buys TPR: the highest TPR with FPR <= 0.5.
    ([0.1, 0.2, 0.35], [0.3, 0.4, 0.5], H, 0.5, 0.25, 1.0, 1 / 3, 5 / 6),
    ([0.1, 0.2, 0.35], [0.3, 0.4, 0.5], H, 0.0, 0.375, 2 / 3, 0.0, 5 / 6),
    # Reward model: low is unsafe.
    ([0.5, 0.2], [-0.1, 0.0], L, None, 0.1, 1.0, 0.0, 1.0),
    ([0.5, 0.2, -0.05], [-0.1, 0.0], L, None, 0.1, 1.0, 1 / 3, 0.8),
    ([0.5, 0.2, -0.05], [-0.1, 0.0], L, 0.0, -0.075, 0.5, 0.0, 0.8),
    # No signal: flagging nothing (FPR 0) beats flagging everything.
    ([0.2], [0.2], H, None, math.nextafter(0.2, math.inf), 0.0, 0.0, 0.5),
    ([0.9], [0.1], H, None, math.nextafter(0.9, math.inf), 0.0, 0.0, 0.5),
    ([0.1], [0.9], L, None, math.nextafter(0.1, -math.inf), 0.0, 0.0, 0.5),
]


@pytest.mark.parametrize(
    ("safe", "unsafe", "direction", "target_fpr", "threshold", "tpr", "fpr", "accuracy"), CASES
)
def test_expected_thresholds(safe, unsafe, direction, target_fpr, threshold, tpr, fpr, accuracy):
    report = calibrate_threshold(safe, unsafe, direction=direction, target_fpr=target_fpr)
    assert report.threshold == pytest.approx(threshold, abs=1e-12)
    assert (report.tpr, report.fpr, report.accuracy) == pytest.approx((tpr, fpr, accuracy))
    assert report.balanced_accuracy == pytest.approx((tpr + 1 - fpr) / 2)
    assert report.safe_scores == safe and report.unsafe_scores == unsafe
    assert report.target_fpr == target_fpr


def test_threshold_reproduces_the_reported_rates():
    safe = [0.01, 0.05, 0.12, 0.14, 0.2, 0.09]
    unsafe = [0.15, 0.3, 0.11, 0.25, 0.18]
    report = calibrate_threshold(safe, unsafe, direction=H)
    flagged_unsafe = sum(s >= report.threshold for s in unsafe) / len(unsafe)
    flagged_safe = sum(s >= report.threshold for s in safe) / len(safe)
    assert (flagged_unsafe, flagged_safe) == pytest.approx((report.tpr, report.fpr))
    # No other cut does better on balanced accuracy.
    for t in sorted(safe + unsafe):
        tpr = sum(s >= t for s in unsafe) / len(unsafe)
        fpr = sum(s >= t for s in safe) / len(safe)
        assert (tpr + 1 - fpr) / 2 <= report.balanced_accuracy + 1e-12


def test_report_applies_to_the_config():
    pre = calibrate_threshold([0.1], [0.3], direction=H, side="pre")
    post = calibrate_threshold([0.5], [-0.5], direction=L, side="post")
    base = ETAConfig(num_candidates=3)
    config = post.apply(pre.apply(base))
    assert config.pre_threshold == pytest.approx(0.2) and config.post_threshold == pytest.approx(
        0.0
    )
    assert config.num_candidates == 3
    assert pre.config_overrides == {"pre_threshold": pre.threshold}
    assert ETAConfig().with_overrides(**post.config_overrides).post_threshold == post.threshold
    with pytest.raises(InvalidInputError, match="side"):
        calibrate_threshold([0.1], [0.3], direction=H).apply()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"safe_scores": [], "unsafe_scores": [0.1]}, "safe_scores is empty"),
        ({"safe_scores": [0.1], "unsafe_scores": [float("nan")]}, "not finite"),
        ({"safe_scores": [0.1], "unsafe_scores": ["x"]}, "not a number"),
        ({"safe_scores": [0.1], "unsafe_scores": [0.2], "target_fpr": 1.5}, "target_fpr"),
        ({"safe_scores": [0.1], "unsafe_scores": [0.2], "direction": "up"}, "direction"),
        ({"safe_scores": 0.1, "unsafe_scores": [0.2]}, "must be a list"),
    ],
)
def test_bad_input(kwargs, match):
    kwargs.setdefault("direction", H)
    with pytest.raises(InvalidInputError, match=match):
        calibrate_threshold(**kwargs)


@pytest.fixture(scope="module")
def evaluator(tiny_checkpoints):
    return ETAEvaluator.from_pretrained(
        clip=tiny_checkpoints.clip, reward_model=tiny_checkpoints.reward_model, device="cpu"
    )


def test_calibrate_pre_on_tiny_clip(evaluator):
    safe = [make_test_image("noise", (64, 64), seed) for seed in range(3)]
    unsafe = [make_test_image("red", (64, 64), 0), make_test_image("noise", (64, 64), 10)]
    report = calibrate_pre_threshold(evaluator, safe, unsafe)
    assert report.side == "pre" and report.direction == H
    assert report.safe_scores == pytest.approx(evaluator.score_images(safe), abs=1e-5)
    calibrated = evaluator.with_config(report.apply(evaluator.config))
    flags = [calibrated.evaluate(images=[image]).input_unsafe for image in safe + unsafe]
    assert sum(flags[3:]) / 2 == pytest.approx(report.tpr)
    assert sum(flags[:3]) / 3 == pytest.approx(report.fpr)
    assert report.balanced_accuracy >= 0.5
    strict = calibrate_pre_threshold(evaluator, safe, unsafe, target_fpr=0.0)
    assert strict.fpr == 0.0


def test_calibrate_post_on_tiny_rm(evaluator):
    safe = ["I cannot help with that.", "Please stay safe.", "No."]
    unsafe = ["Sure, here is how to do it step by step.", "First, buy the parts."]
    report = calibrate_post_threshold(evaluator, safe, unsafe)
    assert report.side == "post" and report.direction == L
    assert report.unsafe_scores == pytest.approx(evaluator.score_responses(unsafe), abs=1e-5)
    calibrated = evaluator.with_config(report.apply(evaluator.config))
    verdicts = calibrated.evaluate_batch([{"response": r} for r in safe + unsafe])
    flags = [v.output_unsafe for v in verdicts]
    assert sum(flags[3:]) / 2 == pytest.approx(report.tpr)
    assert sum(flags[:3]) / 3 == pytest.approx(report.fpr)
    assert report.balanced_accuracy >= 0.5

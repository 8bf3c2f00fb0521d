"""Calibrate ETA's thresholds for checkpoints other than the reference ones.

The paper's thresholds (CLIP cosine >= 0.16, reward <= 0.06) only mean something for
``openai/clip-vit-large-patch14-336`` and ArmoRM. With other models, score a few labelled
examples and pick thresholds here:

    >>> report = calibrate_threshold([0.1, 0.2], [0.3, 0.4], direction="higher_is_unsafe")
    >>> round(report.threshold, 3)
    0.25
    >>> config = report.apply(ETAConfig())  # doctest: +SKIP

"Positive" means unsafe throughout: TPR is the share of unsafe examples flagged, FPR the share
of safe examples flagged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

from eta_guard.config import ETAConfig
from eta_guard.errors import InvalidInputError

if TYPE_CHECKING:
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator

Direction = Literal["higher_is_unsafe", "lower_is_unsafe"]


@dataclass(frozen=True)
class CalibrationReport:
    """A chosen threshold and how it separates the labelled scores.

    Attributes:
        side: ``"pre"`` (CLIP, ``pre_threshold``), ``"post"`` (RM, ``post_threshold``) or ``None``.
        direction: ``"higher_is_unsafe"`` (flag iff score >= threshold) or ``"lower_is_unsafe"``
            (flag iff score <= threshold).
        threshold: The chosen threshold.
        safe_scores: Scores of the safe examples, in input order.
        unsafe_scores: Scores of the unsafe examples, in input order.
        accuracy: Share of all examples classified right at ``threshold``.
        balanced_accuracy: ``(TPR + TNR) / 2`` at ``threshold``.
        tpr: Share of unsafe examples flagged.
        fpr: Share of safe examples flagged.
        target_fpr: The FPR bound used, or ``None`` (balanced accuracy was maximised).
    """

    side: Literal["pre", "post"] | None
    direction: Direction
    threshold: float
    safe_scores: list[float]
    unsafe_scores: list[float]
    accuracy: float
    balanced_accuracy: float
    tpr: float
    fpr: float
    target_fpr: float | None = None

    @property
    def config_overrides(self) -> dict[str, float]:
        """``{"pre_threshold": t}`` or ``{"post_threshold": t}`` for ``ETAConfig.with_overrides``."""
        if self.side is None:
            raise InvalidInputError(
                "this report is not tied to an evaluator side; use calibrate_pre_threshold / "
                "calibrate_post_threshold, or set the threshold by hand"
            )
        return {f"{self.side}_threshold": self.threshold}

    def apply(self, config: ETAConfig | None = None) -> ETAConfig:
        """A copy of ``config`` (default: ``ETAConfig()``) with the calibrated threshold."""
        return (config or ETAConfig()).with_overrides(**self.config_overrides)


def calibrate_threshold(
    safe_scores: Sequence[float],
    unsafe_scores: Sequence[float],
    *,
    direction: Direction,
    target_fpr: float | None = None,
    side: Literal["pre", "post"] | None = None,
) -> CalibrationReport:
    """Pick a threshold from labelled scores.

    Candidates cut between adjacent distinct scores (at the midpoint, for margin), plus the two
    extremes that flag everything or nothing. By default the candidate with the highest
    balanced accuracy wins (ties: lower FPR, then higher TPR, then the lower threshold). With
    ``target_fpr``, the candidate with the highest TPR whose FPR is at most ``target_fpr`` wins
    (ties: lower FPR, then the lower threshold).

    Args:
        safe_scores: Scores of examples that should pass.
        unsafe_scores: Scores of examples that should be flagged.
        direction: ``"higher_is_unsafe"`` (CLIP) or ``"lower_is_unsafe"`` (reward model).
        target_fpr: Largest acceptable share of safe examples flagged, in ``[0, 1]``.
        side: Which config field the report applies to.

    Raises:
        InvalidInputError: Empty or non-finite scores, a bad direction or target_fpr.
    """
    safe = _check_scores(safe_scores, "safe_scores")
    unsafe = _check_scores(unsafe_scores, "unsafe_scores")
    if direction not in ("higher_is_unsafe", "lower_is_unsafe"):
        raise InvalidInputError(
            f"direction={direction!r}; use 'higher_is_unsafe' or 'lower_is_unsafe'"
        )
    if target_fpr is not None and not (0.0 <= target_fpr <= 1.0):
        raise InvalidInputError(f"target_fpr={target_fpr!r} must be in [0, 1] or None")
    best: tuple[tuple[Any, ...], float, _Rates] | None = None
    for threshold in _candidates(safe + unsafe, direction):
        rates = _rates(safe, unsafe, threshold, direction)
        if target_fpr is None:
            key: tuple[Any, ...] = (rates.balanced, -rates.fpr, rates.tpr, -threshold)
        elif rates.fpr <= target_fpr:
            key = (rates.tpr, -rates.fpr, -threshold)
        else:
            continue
        if best is None or key > best[0]:
            best = (key, threshold, rates)
    assert best is not None  # the flag-nothing candidate always has FPR 0
    _, threshold, rates = best
    return CalibrationReport(
        side=side,
        direction=direction,
        threshold=threshold,
        safe_scores=safe,
        unsafe_scores=unsafe,
        accuracy=float(rates.accuracy),
        balanced_accuracy=float(rates.balanced),
        tpr=float(rates.tpr),
        fpr=float(rates.fpr),
        target_fpr=target_fpr,
    )


def calibrate_pre_threshold(
    evaluator: ETAEvaluator,
    safe_images: Sequence[Any],
    unsafe_images: Sequence[Any],
    *,
    target_fpr: float | None = None,
) -> CalibrationReport:
    """Score labelled images with the evaluator's CLIP and pick ``pre_threshold``.

    Args:
        evaluator: An :class:`~eta_guard.ETAEvaluator` with a CLIP model.
        safe_images: Images (any source ``eta_guard.media`` accepts) that should pass.
        unsafe_images: Images that should be flagged.
        target_fpr: See :func:`calibrate_threshold`.
    """
    safe_list, unsafe_list = (
        _as_list(safe_images, "safe_images"),
        _as_list(unsafe_images, "unsafe_images"),
    )
    scores = evaluator.score_images(safe_list + unsafe_list)  # one batched forward
    return calibrate_threshold(
        scores[: len(safe_list)],
        scores[len(safe_list) :],
        direction="higher_is_unsafe",
        target_fpr=target_fpr,
        side="pre",
    )


def calibrate_post_threshold(
    evaluator: ETAEvaluator,
    safe_responses: Sequence[str],
    unsafe_responses: Sequence[str],
    *,
    target_fpr: float | None = None,
) -> CalibrationReport:
    """Score labelled responses with the evaluator's reward model and pick ``post_threshold``.

    Responses are scored with ``config.rm_decision_prompt``, as :meth:`ETAEvaluator.evaluate` does.

    Args:
        evaluator: An :class:`~eta_guard.ETAEvaluator` with a reward model.
        safe_responses: Responses that should pass.
        unsafe_responses: Responses that should be flagged.
        target_fpr: See :func:`calibrate_threshold`.
    """
    safe_list = _as_list(safe_responses, "safe_responses")
    unsafe_list = _as_list(unsafe_responses, "unsafe_responses")
    scores = evaluator.score_responses(safe_list + unsafe_list)
    return calibrate_threshold(
        scores[: len(safe_list)],
        scores[len(safe_list) :],
        direction="lower_is_unsafe",
        target_fpr=target_fpr,
        side="post",
    )


@dataclass(frozen=True)
class _Rates:
    # Exact fractions, so that equal rates tie exactly and the documented tie-break decides.
    tpr: Fraction
    fpr: Fraction
    accuracy: Fraction

    @property
    def balanced(self) -> Fraction:
        return (self.tpr + 1 - self.fpr) / 2


def _flags(score: float, threshold: float, direction: Direction) -> bool:
    return score >= threshold if direction == "higher_is_unsafe" else score <= threshold


def _rates(
    safe: list[float], unsafe: list[float], threshold: float, direction: Direction
) -> _Rates:
    true_pos = sum(_flags(s, threshold, direction) for s in unsafe)
    false_pos = sum(_flags(s, threshold, direction) for s in safe)
    correct = true_pos + len(safe) - false_pos
    return _Rates(
        tpr=Fraction(true_pos, len(unsafe)),
        fpr=Fraction(false_pos, len(safe)),
        accuracy=Fraction(correct, len(safe) + len(unsafe)),
    )


def _candidates(scores: list[float], direction: Direction) -> list[float]:
    """Every distinct way to split the sorted scores, ascending."""
    values = sorted(set(scores))
    middles = [(a + b) / 2.0 for a, b in itertools.pairwise(values)]
    if direction == "higher_is_unsafe":  # flag iff score >= t
        flag_all, flag_none = values[0], math.nextafter(values[-1], math.inf)
        return [flag_all, *middles, flag_none]
    flag_none, flag_all = math.nextafter(values[0], -math.inf), values[-1]  # flag iff score <= t
    return [flag_none, *middles, flag_all]


def _check_scores(scores: Sequence[float], name: str) -> list[float]:
    values = _as_list(scores, name)
    out = []
    for i, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"{name}[{i}]={value!r} is not a number") from e
        if not math.isfinite(number):
            raise InvalidInputError(f"{name}[{i}]={value!r} is not finite")
        out.append(number)
    return out


def _as_list(items: Sequence[Any], name: str) -> list[Any]:
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise InvalidInputError(f"{name} must be a list, got {type(items).__name__}")
    values = list(items)
    if not values:
        raise InvalidInputError(
            f"{name} is empty; calibration needs at least one example of each class"
        )
    return values

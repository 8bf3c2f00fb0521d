"""What callers get back: :class:`SafetyVerdict` (evaluation) and :class:`ETAResult` (generation)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: How the two sides' flags decide ``unsafe`` (``ETAConfig.decision_rule``).
DecisionRule = Literal["and", "or", "pre_only", "post_only"]
Side = Literal["pre", "post"]


class EvaluatorScore(BaseModel):
    """What one evaluator said about one request (CLIP, the RM, a guard model...)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The evaluator's name (checkpoint or endpoint and kind).")
    side: Side = Field(description="'pre' (gate, before generation) or 'post' (judge).")
    score: float | None = Field(default=None, description="Its score; None when it failed.")
    threshold: float
    unsafe_when: Literal[">=", "<="] = Field(
        default=">=",
        description="Unsafe iff score >= threshold (CLIP, guards) or <= (reward models).",
    )
    unsafe: bool = Field(description="Its flag (set by the failure policy when it failed).")
    categories: list[str] = Field(
        default_factory=list, description="Hazard categories it named (e.g. Llama Guard's S1..S14)."
    )
    error: str | None = Field(default=None, description="Why it could not score, if it failed.")


class SafetyVerdict(BaseModel):
    """The outcome of ETA's evaluators for one request.

    ``pre_score`` is the largest CLIP cosine over the images, ``post_score`` the reward of the
    response; either is ``None`` when that side was not evaluated, and ``skipped`` then says why.
    ``unsafe`` follows ``rule`` (ETA's default ``"and"``): with both sides evaluated it is the AND
    of the two flags; with one side it is that side's flag; with none it is ``False``. ``"or"``:
    any flag; ``"pre_only"`` / ``"post_only"``: that side's flag alone. ``evaluators`` lists every
    evaluator that ran (CLIP and the RM included) with its score, threshold and categories, and
    ``fired`` the names of those that flagged the request; a side is flagged when any of its
    evaluators is.
    """

    model_config = ConfigDict(frozen=True)

    pre_score: float | None = None
    post_score: float | None = None
    image_scores: list[float] = Field(default_factory=list, description="CLIP cosine per image.")
    input_unsafe: bool | None = None
    output_unsafe: bool | None = None
    unsafe: bool = False
    pre_threshold: float
    post_threshold: float
    skipped: dict[str, str] = Field(
        default_factory=dict, description="Checks that did not run ('pre'/'post') and why."
    )
    errors: dict[str, str] = Field(
        default_factory=dict, description="Checks that failed ('pre'/'post') and the error."
    )
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per check.")
    post_windows: int | None = Field(
        None,
        description="Windows the response was scored in by the reward model (1 when it fits the "
        "RM's context; more for a longer answer, whose lowest window reward is post_score).",
    )
    evaluators: list[EvaluatorScore] = Field(
        default_factory=list, description="Each evaluator that ran, both sides, in order."
    )
    fired: list[str] = Field(
        default_factory=list, description="Names of the evaluators that flagged the request."
    )
    rule: DecisionRule = "and"

    @classmethod
    def combine(
        cls,
        *,
        pre_threshold: float,
        post_threshold: float,
        pre_score: float | None = None,
        post_score: float | None = None,
        image_scores: list[float] | None = None,
        input_unsafe: bool | None = None,
        output_unsafe: bool | None = None,
        skipped: dict[str, str] | None = None,
        errors: dict[str, str] | None = None,
        timings: dict[str, float] | None = None,
        post_windows: int | None = None,
        evaluators: list[EvaluatorScore] | None = None,
        rule: DecisionRule = "and",
    ) -> SafetyVerdict:
        """Build a verdict, deriving flags from scores and ``unsafe`` from ``rule``.

        A flag passed explicitly (e.g. by a fail-closed policy after an error) wins over the score.
        ``evaluators`` of a side other than CLIP / the RM (named by ``pre_score`` /
        ``post_score``) add their flags to that side's: any one flagging flags the side.
        """
        if input_unsafe is None and pre_score is not None:
            input_unsafe = pre_score >= pre_threshold
        if output_unsafe is None and post_score is not None:
            output_unsafe = post_score <= post_threshold
        entries = list(evaluators or [])
        input_unsafe = _side_flag(input_unsafe, entries, "pre")
        output_unsafe = _side_flag(output_unsafe, entries, "post")
        return cls(
            pre_score=pre_score,
            post_score=post_score,
            image_scores=list(image_scores or []),
            input_unsafe=input_unsafe,
            output_unsafe=output_unsafe,
            unsafe=decide(rule, input_unsafe, output_unsafe),
            pre_threshold=pre_threshold,
            post_threshold=post_threshold,
            skipped=dict(skipped or {}),
            errors=dict(errors or {}),
            timings=dict(timings or {}),
            post_windows=post_windows,
            evaluators=entries,
            fired=[e.name for e in entries if e.unsafe],
            rule=rule,
        )

    def merge(self, other: SafetyVerdict) -> SafetyVerdict:
        """Combine an input-side verdict with an output-side verdict (``other`` wins on overlaps)."""
        pick = lambda a, b: b if b is not None else a  # noqa: E731
        errors = {**self.errors, **other.errors}
        scores = {
            "pre": pick(self.pre_score, other.pre_score),
            "post": pick(self.post_score, other.post_score),
        }
        return SafetyVerdict.combine(
            pre_threshold=self.pre_threshold,
            post_threshold=other.post_threshold,
            pre_score=pick(self.pre_score, other.pre_score),
            post_score=pick(self.post_score, other.post_score),
            image_scores=other.image_scores or self.image_scores,
            input_unsafe=pick(self.input_unsafe, other.input_unsafe),
            output_unsafe=pick(self.output_unsafe, other.output_unsafe),
            # A side that has a score ran, and one that has an error ran and failed: neither
            # was skipped, whatever the other verdict (which did not look at it) says.
            skipped={
                k: v
                for k, v in {**self.skipped, **other.skipped}.items()
                if scores.get(k) is None and k not in errors
            },
            errors=errors,
            timings={**self.timings, **other.timings},
            post_windows=pick(self.post_windows, other.post_windows),
            # each side's entries come from the verdict that evaluated that side
            evaluators=[
                *(e for e in self.evaluators if e.side not in {o.side for o in other.evaluators}),
                *other.evaluators,
            ],
            rule=other.rule,
        )


def decide(rule: DecisionRule, pre: bool | None, post: bool | None) -> bool:
    """Whether to align, given each side's flag (``None``: that side was not evaluated)."""
    if rule == "pre_only":
        return bool(pre)
    if rule == "post_only":
        return bool(post)
    flags = [f for f in (pre, post) if f is not None]
    if rule == "or":
        return any(flags)
    return bool(flags) and all(flags)


def _side_flag(flag: bool | None, entries: list[EvaluatorScore], side: str) -> bool | None:
    """``flag`` ORed with the flags of the side's entries (None when nothing evaluated it)."""
    flags = [e.unsafe for e in entries if e.side == side]
    if not flags:
        return flag
    return bool(flag) or any(flags)


class CandidateTrace(BaseModel):
    """One best-of-N candidate sentence and its scores."""

    text: str
    reward: float
    clip: float | None = Field(None, description="CLIP cosine of the sentence vs the image(s).")
    score: float = Field(description="reward + (alpha / i) * clip, or reward alone.")
    ended: bool = Field(description="The candidate ended the answer (EOS).")
    num_tokens: int


class SentenceTrace(BaseModel):
    """One step of the sentence-level best-of-N search."""

    index: int = Field(description="1-based sentence index i.")
    candidates: list[CandidateTrace]
    chosen: int = Field(description="Index of the kept candidate.")


class TokenUsage(BaseModel):
    """Token counts of the returned answer (not of the discarded candidates)."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    #: Tokens decoded in total, vanilla answer and every best-of-N candidate included.
    decoded_tokens: int = 0


class ETAResult(BaseModel):
    """The answer of :meth:`eta_guard.ETA.generate` and everything that decided it."""

    text: str
    verdict: SafetyVerdict
    aligned: bool = Field(description="True when the answer was re-decoded with ETA's alignment.")
    vanilla_text: str | None = Field(
        None, description="The backbone's own answer when it was replaced by an aligned one."
    )
    trace: list[SentenceTrace] = Field(default_factory=list)
    usage: TokenUsage = Field(default_factory=TokenUsage)
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    finish_reason: Literal["stop", "length"] = "stop"
    model_name: str = ""


class ETAStreamChunk(BaseModel):
    """A piece of streamed text; the last chunk of a stream carries the full :class:`ETAResult`."""

    text: str
    result: ETAResult | None = None

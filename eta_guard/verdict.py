"""What callers get back: :class:`SafetyVerdict` (evaluation) and :class:`ETAResult` (generation)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SafetyVerdict(BaseModel):
    """The outcome of ETA's evaluators for one request.

    ``pre_score`` is the largest CLIP cosine over the images, ``post_score`` the reward of the
    response; either is ``None`` when that side was not evaluated, and ``skipped`` then says why.
    ``unsafe`` follows ETA's rule: with both sides evaluated it is the AND of the two flags; with
    one side it is that side's flag; with none it is ``False``.
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
    ) -> SafetyVerdict:
        """Build a verdict, deriving flags from scores and ``unsafe`` from ETA's AND rule.

        A flag passed explicitly (e.g. by a fail-closed policy after an error) wins over the score.
        """
        if input_unsafe is None and pre_score is not None:
            input_unsafe = pre_score >= pre_threshold
        if output_unsafe is None and post_score is not None:
            output_unsafe = post_score <= post_threshold
        flags = [f for f in (input_unsafe, output_unsafe) if f is not None]
        return cls(
            pre_score=pre_score,
            post_score=post_score,
            image_scores=list(image_scores or []),
            input_unsafe=input_unsafe,
            output_unsafe=output_unsafe,
            unsafe=bool(flags) and all(flags),
            pre_threshold=pre_threshold,
            post_threshold=post_threshold,
            skipped=dict(skipped or {}),
            errors=dict(errors or {}),
            timings=dict(timings or {}),
            post_windows=post_windows,
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
        )


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

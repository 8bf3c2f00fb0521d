"""ETA's decision between the stages of a request, shared by every generator backend (torch-free).

After the pre-generation check (CLIP, plus any gate), :func:`vanilla_only_reason` says whether
the answer can be returned as decoded (and why); after the post-generation check (the reward
model, plus any judge), the merged verdict's ``unsafe`` says whether to align, by
``ETAConfig.decision_rule`` (:func:`eta_guard.verdict.decide`); :func:`request_result` packs what
the request decided and produced.
"""

from __future__ import annotations

import time
from typing import Any

from eta_guard.config import ETAConfig
from eta_guard.verdict import ETAResult, SafetyVerdict, SentenceTrace, TokenUsage


def vanilla_only_reason(has_images: bool, pre: SafetyVerdict, cfg: ETAConfig) -> str | None:
    """Why the answer needs no reward-model check (stream it as decoded), or None if it may be aligned."""
    if not has_images:
        if cfg.text_only_policy == "reward_only":
            return None
        if cfg.text_only_policy == "trust":
            return "text-only request and text_only_policy='trust'"
        # "guard": the text gates stand where CLIP stands for images; the same rule follows.
    if cfg.decision_rule in ("or", "post_only"):
        return None  # the output side decides even when the input passed
    if pre.input_unsafe:
        return None
    if "pre" in pre.errors:
        return "the pre-generation check failed and on_evaluator_error='fail_open' let it pass"
    if any(e.side == "pre" and e.name != "clip" for e in pre.evaluators):
        return (
            "the request passed the pre-generation checks ("
            + ", ".join(e.name for e in pre.evaluators if e.side == "pre")
            + ")"
        )
    return "the image(s) passed the CLIP check" if has_images else "the text gates passed it"


def skipped(cfg: ETAConfig, side: str, reason: str) -> SafetyVerdict:
    """A verdict recording that ``side`` ("pre" or "post") did not run, and why."""
    return SafetyVerdict.combine(
        pre_threshold=cfg.pre_threshold,
        post_threshold=cfg.post_threshold,
        skipped={side: reason},
        rule=cfg.decision_rule,
    )


def request_result(
    *,
    text: str,
    verdict: SafetyVerdict,
    prompt_tokens: int,
    output_tokens: int,
    decoded_tokens: int,
    finish_reason: Any,
    timings: dict[str, float],
    start: float,
    model_name: str,
    vanilla_text: str | None = None,
    trace: list[SentenceTrace] | None = None,
) -> ETAResult:
    """The :class:`ETAResult` of one request; aligned iff ``vanilla_text`` is given.

    ``timings["total"]`` is set to the time since ``start`` (``time.perf_counter()``).
    """
    timings["total"] = time.perf_counter() - start
    return ETAResult(
        text=text,
        verdict=verdict,
        aligned=vanilla_text is not None,
        vanilla_text=vanilla_text,
        trace=trace or [],
        usage=TokenUsage(
            input_tokens=prompt_tokens,
            output_tokens=output_tokens,
            total_tokens=prompt_tokens + output_tokens,
            decoded_tokens=decoded_tokens,
        ),
        timings=timings,
        finish_reason=finish_reason,
        model_name=model_name,
    )

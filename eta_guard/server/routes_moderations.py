"""``POST /v1/moderations``: ETA's evaluators in OpenAI's moderation shape.

Images go to the CLIP check, text to the reward model (scored in ETA's safety format, as if it
were an assistant's answer). ``flagged`` follows ETA's rule: with both an image and text, both
must be unsafe (the AND the paper calibrated); with one of them, that one decides.

Categories: ETA does not classify by topic, so instead of OpenAI's topic names the result holds
``unsafe`` (the decision), ``unsafe/image`` and ``unsafe/text`` (each check's own flag). Their
``category_scores`` are "higher = worse" numbers in (0, 1): a logistic of the margin past the
threshold, ``1 / (1 + exp(-m / s))`` with ``m = clip - pre_threshold`` for images and
``m = post_threshold - reward`` for text (the reward is higher = safer, hence the sign) and
``s = ServerSettings.moderation_score_scale``; 0.5 is exactly the threshold, so ``score >= 0.5``
iff that check flags. The raw scores and thresholds are in the ``eta`` extension of each result.

Gates and judges (``--gate`` / ``--post-judge`` specs, e.g. a Llama Guard) add their own entries:
``unsafe/<name>`` (that evaluator's flag) and ``<name>/<category>`` for each category it named
(``llama-guard-vision/S11``, ``shieldgemma2/dangerous``), with ``category_scores`` mapped so that
0.5 is again the evaluator's threshold (a probability ``p`` with threshold ``t``: ``p / 2t``
below it, ``1/2 + (p - t) / 2(1 - t)`` above, ``p`` itself when ``t = 0.5``; a patch-CLIP cosine as
CLIP's). Gates read the input's text with its images (a text-only input, under
``text_only_policy="guard"``, goes to the text gates); judges read the text as the answer. An
evaluator that failed is reported by its flag under the failure policy (score 1 or 0).
``unsafe``'s score combines the sides by the decision rule (``and``: the weaker side).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from eta_guard.evaluators.patch_clip import PatchCLIPGate
from eta_guard.server.auth import check_api_key
from eta_guard.server.disconnect import watch_disconnect
from eta_guard.server.errors import from_exception, request_id_of
from eta_guard.server.inputs import ModerationItem, moderation_items
from eta_guard.server.openai_format import new_id, verdict_extension
from eta_guard.server.schemas import ModerationRequest
from eta_guard.verdict import SafetyVerdict

router = APIRouter()


@router.post("/v1/moderations", dependencies=[Depends(check_api_key)])
async def moderations(body: ModerationRequest, request: Request) -> Response:
    """Moderate text and/or images with CLIP and the reward model (no generation)."""
    state = request.app.state.eta
    state.require_ready()
    state.check_model(body.model)
    evaluator = state.evaluator
    items = moderation_items(
        body.input,
        allow_remote=state.config().allow_remote_images,
        max_items=state.settings.max_moderation_inputs,
    )

    # Gates read the input's text beside its images (or alone, as text guards).
    with_text = bool(evaluator.gates)
    batch = [
        {"images": item.images or None, "response": item.text}
        | ({"text": item.text} if with_text and item.text is not None else {})
        for item in items
    ]

    async def run(cancel: Any) -> AsyncIterator[list[SafetyVerdict]]:
        # One CLIP and one RM forward for all inputs, on the models' thread (which owns torch's
        # pool, eta_guard.model_thread); they share it with concurrent requests' scorings.
        yield await evaluator.aevaluate_batch(batch)

    job = state.scheduler.submit(
        run, timeout_s=state.settings.request_timeout_s, route="moderations"
    )
    verdicts: list[SafetyVerdict] | None = None
    watcher = watch_disconnect(request, job)
    try:
        while True:
            event = await job.next(0.5)
            if watcher.done():
                return Response(status_code=499)
            if event is None:
                continue
            kind, value = event
            if kind == "item":
                verdicts = value
            elif kind == "error":
                raise from_exception(value, request_id_of(request))
            else:
                break
    finally:
        watcher.cancel()
        job.close()
    assert verdicts is not None
    scale = state.settings.moderation_score_scale
    cosines = {g.name for g in evaluator.gates if isinstance(g, PatchCLIPGate)}
    results = [_result(item, v, scale, cosines) for item, v in zip(items, verdicts, strict=True)]
    for v in verdicts:
        state.metrics.verdicts.labels("moderations", "unsafe" if v.unsafe else "safe").inc()
    request.state.log_extra = {"flagged": sum(r["flagged"] for r in results)}
    return JSONResponse(
        {"id": new_id("modr"), "model": state.settings.served_model_name, "results": results}
    )


def _result(
    item: ModerationItem, verdict: SafetyVerdict, scale: float, cosines: set[str]
) -> dict[str, Any]:
    categories: dict[str, bool] = {"unsafe": verdict.unsafe}
    scores: dict[str, float] = {}
    applied: dict[str, list[str]] = {"unsafe": []}
    sides: dict[str, list[float]] = {"pre": [], "post": []}
    own = {e.name: e.unsafe for e in verdict.evaluators if e.name in ("clip", "reward_model")}
    if verdict.pre_score is not None:  # CLIP's own flag (the side's may be a gate's)
        categories["unsafe/image"] = own.get("clip", bool(verdict.input_unsafe))
        scores["unsafe/image"] = _squash(verdict.pre_score - verdict.pre_threshold, scale)
        applied["unsafe/image"] = ["image"]
        applied["unsafe"].append("image")
        sides["pre"].append(scores["unsafe/image"])
    if verdict.post_score is not None:
        categories["unsafe/text"] = own.get("reward_model", bool(verdict.output_unsafe))
        scores["unsafe/text"] = _squash(verdict.post_threshold - verdict.post_score, scale)
        applied["unsafe/text"] = ["text"]
        applied["unsafe"].append("text")
        sides["post"].append(scores["unsafe/text"])
    for entry in verdict.evaluators:
        if entry.name in ("clip", "reward_model"):
            continue
        if entry.score is None:  # failed: its flag under the failure policy
            value = 1.0 if entry.unsafe else 0.0
        elif entry.name in cosines:
            value = _squash(entry.score - entry.threshold, scale)
        else:
            value = _at_half(entry.score, entry.threshold)
        types = ["image", "text"] if entry.side == "pre" and item.images else ["text"]
        if entry.side == "pre" and not item.text:
            types = ["image"]
        for key in (f"unsafe/{entry.name}", *(f"{entry.name}/{c}" for c in entry.categories)):
            categories[key] = categories.get(key, False) or entry.unsafe
            scores[key] = max(scores.get(key, 0.0), value)
            applied[key] = types
        applied["unsafe"] = list(dict.fromkeys([*applied["unsafe"], *types]))
        sides[entry.side].append(value)
    scores["unsafe"] = _rule_score(verdict.rule, sides)
    return {
        "flagged": verdict.unsafe,
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": applied,
        "eta": verdict_extension(verdict),
    }


def _rule_score(rule: str, sides: dict[str, list[float]]) -> float:
    """The decision's score: each side's strongest evaluator, combined as the rule combines flags
    (``and``: as strong as the weakest evaluated side)."""
    best = {side: max(values) for side, values in sides.items() if values}
    if rule == "pre_only":
        return best.get("pre", 0.0)
    if rule == "post_only":
        return best.get("post", 0.0)
    if not best:
        return 0.0
    return max(best.values()) if rule == "or" else min(best.values())


def _at_half(p: float, t: float) -> float:
    """A probability ``p`` mapped so that its threshold ``t`` lands on 0.5 (monotone, in [0, 1])."""
    if t <= 0.0:
        return 0.5 + 0.5 * p
    if p < t:
        return 0.5 * p / t
    if t >= 1.0:
        return 1.0
    return 0.5 + 0.5 * (p - t) / (1.0 - t)


def _squash(margin: float, scale: float) -> float:
    z = max(-60.0, min(60.0, margin / scale))
    return 1.0 / (1.0 + math.exp(-z))

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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from eta_guard.model_thread import model_thread
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

    batch = [{"images": item.images or None, "response": item.text} for item in items]

    def run(cancel: Any) -> Iterator[list[SafetyVerdict]]:
        # One CLIP and one RM forward for all inputs, on the thread that owns torch's pool
        # (eta_guard.model_thread), not on this job's own thread.
        yield model_thread().call(evaluator.evaluate_batch, batch)

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
    results = [_result(item, v, scale) for item, v in zip(items, verdicts, strict=True)]
    for v in verdicts:
        state.metrics.verdicts.labels("moderations", "unsafe" if v.unsafe else "safe").inc()
    request.state.log_extra = {"flagged": sum(r["flagged"] for r in results)}
    return JSONResponse(
        {"id": new_id("modr"), "model": state.settings.served_model_name, "results": results}
    )


def _result(item: ModerationItem, verdict: SafetyVerdict, scale: float) -> dict[str, Any]:
    categories: dict[str, bool] = {"unsafe": verdict.unsafe}
    scores: dict[str, float] = {}
    applied: dict[str, list[str]] = {"unsafe": []}
    if verdict.pre_score is not None:
        categories["unsafe/image"] = bool(verdict.input_unsafe)
        scores["unsafe/image"] = _squash(verdict.pre_score - verdict.pre_threshold, scale)
        applied["unsafe/image"] = ["image"]
        applied["unsafe"].append("image")
    if verdict.post_score is not None:
        categories["unsafe/text"] = bool(verdict.output_unsafe)
        scores["unsafe/text"] = _squash(verdict.post_threshold - verdict.post_score, scale)
        applied["unsafe/text"] = ["text"]
        applied["unsafe"].append("text")
    flagged_scores = [scores[k] for k in ("unsafe/image", "unsafe/text") if k in scores]
    # The AND rule: the decision is as strong as its weakest flagged side.
    scores["unsafe"] = min(flagged_scores) if flagged_scores else 0.0
    return {
        "flagged": verdict.unsafe,
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": applied,
        "eta": verdict_extension(verdict),
    }


def _squash(margin: float, scale: float) -> float:
    z = max(-60.0, min(60.0, margin / scale))
    return 1.0 / (1.0 + math.exp(-z))

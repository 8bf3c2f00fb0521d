"""Check every image of a LangChain conversation once, and forward exactly what was scored.

Used by ``ETAGuardMiddleware``: each image is decoded once, scored with CLIP, and replaced by
the metadata-free PNG of the scored pixels (:mod:`eta_guard.scored_images`). Scores are cached
by the content key of that PNG, so on later turns the images already in the history (now our
PNGs) are recognised by a hash of their bytes: neither decoded nor scored again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage

from eta_guard.errors import InvalidInputError
from eta_guard.image_score_cache import ImageScoreCache
from eta_guard.limits import RequestLimits
from eta_guard.scored_images import ScoredImage, content_key, load_scored_image, scored_options
from eta_guard.verdict import SafetyVerdict
from langchain_eta._messages import forwarded_block, image_sources, replace_blocks


@dataclass
class ImageCheck:
    """The images of one message list, checked.

    Attributes:
        positions: ``(message index, block index)`` of every image, in order.
        scores: CLIP score per image (``None`` where scoring failed under a fail-open/closed
            policy).
        rewrites: Blocks to put in place of images that were not yet the forwarded PNG.
        verdict: The input-side verdict over all images (``None`` when there are none).
        scored_now: How many images needed a CLIP forward (the rest came from the cache).
        gate_fired: A gate of the evaluator flagged the images with the conversation's text.
    """

    positions: list[tuple[int, int]] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    rewrites: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    verdict: SafetyVerdict | None = None
    scored_now: int = 0
    gate_fired: bool = False

    def forwarded(self, messages: Sequence[BaseMessage]) -> list[BaseMessage]:
        """``messages`` with every image as the PNG that was scored."""
        return replace_blocks(messages, self.rewrites)

    def flagged(self) -> set[tuple[int, int]]:
        """Positions of images at or above the threshold (all of them when scores are missing)."""
        verdict = self.verdict
        if verdict is None:
            return set()
        if any(s is None for s in self.scores) or self.gate_fired:
            return set(self.positions)  # a gate judged the images with the text, not one alone
        return {
            p
            for p, s in zip(self.positions, self.scores, strict=True)
            if s is not None and s >= verdict.pre_threshold
        }


def check_images(
    messages: Sequence[BaseMessage],
    evaluator: Any,
    cache: ImageScoreCache,
    *,
    allow_local_files: bool,
) -> ImageCheck:
    """Decode, normalise and score every image of ``messages`` (cached scores reused).

    Raises:
        InvalidInputError: An image is refused (bad data, local file, animated, ...).
        EvaluatorError: CLIP failed under ``on_evaluator_error="raise"``.
    """
    if evaluator.config.text_only_policy == "guard":
        # Its rule is per side ("each") or the answer's with the images' ("eta"): there is no
        # place for a text-only gate, and skipping one silently would pass what it guards.
        raise InvalidInputError(
            "ETAGuardMiddleware does not run text gates: text_only_policy='guard' is refused "
            "here; use ETAChatModel / ETA for it, or text_only_policy='reward_only' / 'trust'"
        )
    found = image_sources(messages, allow_local_files=allow_local_files)
    check = ImageCheck(positions=[(i, j) for i, j, _ in found])
    if not found:
        return check
    config = evaluator.config
    options = scored_options(config, allow_local_files=allow_local_files)
    keys: list[str | None] = []
    known: dict[str, float] = {}
    for _, _, source in found:  # first pass: which images are already known, by content
        key = content_key(source)
        cached = None if key is None else cache.get(key)
        if key is not None and cached is not None:  # our own PNG, scored before: done
            known[key] = cached
            keys.append(key)
        else:
            keys.append(None)
    # The request limits apply to what must be decoded; known images cost a hash only.
    limits = RequestLimits.from_config(config)
    limits.check_image_count(sum(k is None for k in keys))
    pending: dict[str, ScoredImage] = {}
    with limits.pixel_budget():
        for n, (i, j, source) in enumerate(found):
            if keys[n] is not None:
                continue
            try:
                image = load_scored_image(source, **options)
            except InvalidInputError as e:
                raise InvalidInputError(f"messages[{i}] image: {e}") from e
            if content_key(source) != image.key:
                check.rewrites[(i, j)] = forwarded_block(
                    image.base64, messages[i].content_blocks[j]
                )
            keys[n] = image.key
            cached = cache.get(image.key)
            if cached is not None:
                known[image.key] = cached
            else:
                pending.setdefault(image.key, image)
    fresh = _score(evaluator, list(pending.values())) if pending else None
    if fresh is not None and not fresh.errors and len(fresh.image_scores) == len(pending):
        known.update(zip(pending, fresh.image_scores, strict=True))
        for key in pending:
            cache.put(key, known[key])
    check.scored_now = len(pending)
    check.scores = [known.get(k) if k is not None else None for k in keys]
    check.verdict = _verdict(config, check.scores, fresh)
    if getattr(evaluator, "gates", None):
        _run_gates(check, messages, evaluator, found, keys, pending, options)
    return check


def _run_gates(
    check: ImageCheck,
    messages: Sequence[BaseMessage],
    evaluator: Any,
    found: list[tuple[int, int, str]],
    keys: list[str | None],
    pending: dict[str, ScoredImage],
    options: dict[str, Any],
) -> None:
    """The evaluator's gates on every image with the human text, added to ``check.verdict``.

    Not cached: a gate's answer depends on the text as well as the images. Images known from
    the cache (our PNGs) are decoded for it, under the request's limits.
    """
    limits = RequestLimits.from_config(evaluator.config)
    limits.check_image_count(len(found))
    images = []
    with limits.pixel_budget():
        for n, (i, _, source) in enumerate(found):
            key = keys[n]
            if key is not None and key in pending:
                images.append(pending[key].image)
                continue
            try:
                images.append(load_scored_image(source, **options).image)
            except InvalidInputError as e:
                raise InvalidInputError(f"messages[{i}] image: {e}") from e
    gates = evaluator.evaluate_gates(images, text=user_text(messages))
    check.gate_fired = any(
        e.side == "pre" and e.unsafe for e in gates.evaluators if e.name != "clip"
    )
    clip = check.verdict
    assert clip is not None
    check.verdict = SafetyVerdict.combine(
        pre_threshold=clip.pre_threshold,
        post_threshold=clip.post_threshold,
        pre_score=clip.pre_score,
        image_scores=clip.image_scores,
        input_unsafe=clip.input_unsafe,
        errors={**clip.errors, **gates.errors},
        timings={**clip.timings, **gates.timings},
        evaluators=[*clip.evaluators, *gates.evaluators],
        rule=gates.rule,
    )


def user_text(messages: Sequence[BaseMessage]) -> str | None:
    """The text of the human messages, in order: what gates read beside the images."""
    texts = [
        str(block.get("text", ""))
        for message in messages
        if message.type == "human"
        for block in message.content_blocks
        if block.get("type") == "text"
    ]
    return "\n\n".join(t for t in texts if t) or None


def _score(evaluator: Any, images: list[ScoredImage]) -> SafetyVerdict:
    return evaluator.evaluate_input([image.image for image in images])


def _verdict(config: Any, scores: list[float | None], fresh: SafetyVerdict | None) -> SafetyVerdict:
    """The input verdict over all images: the largest score decides, as in the engine.

    When the new images could not be scored (fail-open/closed policy), the policy's flag is
    kept, and any known score at or above the threshold still flags the input.
    """
    known = [s for s in scores if s is not None]
    common = {"pre_threshold": config.pre_threshold, "post_threshold": config.post_threshold}
    if fresh is not None and (fresh.errors or len(known) < len(scores)):
        known_unsafe = any(s >= config.pre_threshold for s in known)
        return SafetyVerdict.combine(
            **common,
            pre_score=max(known) if known else None,
            input_unsafe=bool(fresh.input_unsafe) or known_unsafe,
            errors=fresh.errors,
            timings=fresh.timings,
        )
    return SafetyVerdict.combine(
        **common,
        pre_score=max(known),
        image_scores=known,
        timings=fresh.timings if fresh is not None else {},
    )

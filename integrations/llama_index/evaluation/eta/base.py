"""``ETASafetyEvaluator``: ETA's verdict as a LlamaIndex ``EvaluationResult``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.response.schema import Response
from llama_index.core.bridge.pydantic import Field
from llama_index.core.evaluation.base import BaseEvaluator, EvaluationResult
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.schema import ImageDocument, ImageNode
from llama_index.llms.eta._loading import (
    Lazy,
    evaluator_source,
    lazy_evaluator,
    local_files_allowed,
)
from llama_index.llms.eta._messages import image_node_source, is_image_node

from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL, ETAConfig
from eta_guard.errors import InvalidInputError


class ETAEvaluationResult(EvaluationResult):
    """An ``EvaluationResult`` that also carries ETA's full verdict (as a dict)."""

    verdict: dict[str, Any] | None = Field(None, description="SafetyVerdict.model_dump().")


class ETASafetyEvaluator(BaseEvaluator):
    """LlamaIndex evaluator that judges a response (and the images behind it) with ETA.

    CLIP scores the images, the reward model scores the response in ETA's safety format, and
    ETA's rule decides (both given: unsafe only if both are; one given: that side decides).
    ``passing`` is ``not verdict.unsafe``; ``score`` is 1.0 when passing and 0.0 otherwise;
    ``feedback`` explains the scores against their thresholds; ``result.verdict`` is the whole
    ``SafetyVerdict``. The query and contexts are not used: ETA judges images and answers. When
    an evaluator failed (under ``on_evaluator_error="fail_open"/"fail_closed"``) the result is
    marked ``invalid_result``.

    Images come from ``image_paths=[...]``, ``images=[...]`` (paths, bytes, base64, data URLs,
    ``ImageBlock``s, ``ImageNode``s) or, in :meth:`evaluate_response`, from the response's
    ``ImageNode`` sources.

    Setup:
        .. code-block:: bash

            pip install "eta-guard[llama-index]"

    Instantiate (offline, on tiny random checkpoints):
        .. code-block:: python

            from eta_guard.testing import build_tiny_checkpoints
            from llama_index.evaluation.eta import ETASafetyEvaluator

            ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
            evaluator = ETASafetyEvaluator(clip=ckpt.clip, reward_model=ckpt.reward_model)
            # or share weights: ETASafetyEvaluator(evaluator=llm)

    Evaluate:
        .. code-block:: python

            from eta_guard.testing import make_test_image

            make_test_image("red").save("/tmp/eta-red.png")
            result = evaluator.evaluate(
                query="What is this?", response="A red square.", image_paths=["/tmp/eta-red.png"]
            )
            result.passing, result.score, result.feedback

    Batch:
        .. code-block:: python

            from llama_index.core.evaluation import BatchEvalRunner

            runner = BatchEvalRunner({"safety": evaluator}, workers=2)
            results = await runner.aevaluate_response_strs(
                queries=["q1", "q2"], response_strs=["a1", "a2"],
                image_paths=[["/tmp/eta-red.png"], []],
            )
    """

    def __init__(
        self,
        clip: str | None = DEFAULT_CLIP,
        reward_model: str | None = DEFAULT_REWARD_MODEL,
        *,
        evaluator: Any = None,
        config: ETAConfig | None = None,
        device: str | None = None,
        use_source_images: bool = True,
        allow_local_image_files: bool | None = None,
        **load_kwargs: Any,
    ) -> None:
        """Pass model ids/paths (``clip``, ``reward_model``) or a ready ``evaluator``
        (ETAEvaluator / ETA / ETAMultiModalLLM); ``config`` overrides its thresholds.
        ``clip=None`` or ``reward_model=None`` loads one side only. ``allow_local_image_files``
        (default: on, as ``image_paths`` are the developer's files, unless ``config`` sets it
        off) reads local paths; turn it off when the images to judge come from users."""
        defaults = clip == DEFAULT_CLIP and reward_model == DEFAULT_REWARD_MODEL
        if evaluator is not None and (not defaults or load_kwargs or device is not None):
            raise InvalidInputError(
                "pass model ids (clip=, reward_model=, device=, ...) or evaluator=..., not both"
            )
        self._config = config
        self._use_source_images = use_source_images
        self._allow_local_image_files = allow_local_image_files
        if evaluator is not None:
            self._evaluator = evaluator_source(evaluator, where="ETASafetyEvaluator(evaluator=...)")
        else:
            self._evaluator: Lazy[Any] = lazy_evaluator(
                clip=clip,
                reward_model=reward_model,
                config=config,
                device=device,
                **load_kwargs,
            )

    def _get_prompts(self) -> PromptDictType:
        return {}

    def _update_prompts(self, prompts_dict: PromptDictType) -> None:
        """ETA has no LLM prompts to update."""

    def _evaluator_now(self) -> Any:
        evaluator = self._evaluator.get()
        return evaluator if self._config is None else evaluator.with_config(self._config)

    async def aevaluate(
        self,
        query: str | None = None,
        response: str | None = None,
        contexts: Sequence[str] | None = None,
        image_paths: Sequence[Any] | None = None,
        images: Sequence[Any] | None = None,
        sleep_time_in_seconds: int = 0,
        **kwargs: Any,
    ) -> EvaluationResult:
        """Judge ``response`` and the images (``image_paths`` and/or ``images``) with ETA."""
        await asyncio.sleep(sleep_time_in_seconds)
        sources = image_sources([*_image_list(image_paths, "image_paths"), *_image_list(images)])
        if response is not None and not isinstance(response, str):
            raise InvalidInputError(f"response must be a str, got {type(response).__qualname__}")
        evaluator = await asyncio.to_thread(self._evaluator_now)
        loaded = None
        if sources:
            local = local_files_allowed(
                self._allow_local_image_files, evaluator.config, default=True
            )
            loaded = await asyncio.to_thread(load_images, sources, evaluator.config, local)
        verdict = await evaluator.aevaluate(images=loaded, response=response, text=query)
        return to_evaluation_result(verdict, query=query, response=response, contexts=contexts)

    async def aevaluate_response(
        self, query: str | None = None, response: Response | None = None, **kwargs: Any
    ) -> EvaluationResult:
        """As in LlamaIndex, plus the response's ``ImageNode`` sources as images (unless
        ``image_paths``/``images`` are given or ``use_source_images=False``)."""
        if response is not None and not isinstance(response, Response):
            raise InvalidInputError(
                f"response must be a llama_index Response, got {type(response).__qualname__}; "
                "use evaluate(response=<str>) for a plain answer"
            )
        if (
            self._use_source_images
            and response is not None
            and not kwargs.get("image_paths")
            and not kwargs.get("images")
        ):
            kwargs["images"] = [n.node for n in response.source_nodes if is_image_node(n.node)]
        return await super().aevaluate_response(query=query, response=response, **kwargs)

    def evaluate_response(
        self, query: str | None = None, response: Response | None = None, **kwargs: Any
    ) -> EvaluationResult:
        from llama_index.core.async_utils import asyncio_run

        return asyncio_run(self.aevaluate_response(query=query, response=response, **kwargs))


def _image_list(items: Any, name: str = "images") -> list[Any]:
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        raise InvalidInputError(f"{name} must be a list, got {type(items).__qualname__}")
    return list(items)


def image_sources(items: Sequence[Any]) -> list[Any]:
    """Engine image sources for ``items`` (ImageNodes/ImageBlocks converted, others as is)."""
    from llama_index.core.base.llms.types import ImageBlock

    return [
        image_node_source(i) if isinstance(i, (ImageNode, ImageDocument, ImageBlock)) else i
        for i in items
    ]


def load_images(sources: list[Any], config: ETAConfig, allow_local_files: bool) -> list[Any]:
    """Decode ``sources`` with the engine's checks and this evaluator's local-file policy.

    Animated images are refused, as by every adapter (a model may have seen any frame).
    """
    from eta_guard.limits import RequestLimits
    from eta_guard.media import image_options
    from eta_guard.scored_images import load_still_image

    options = {**image_options(config), "allow_local_files": allow_local_files}
    limits = RequestLimits.from_config(config)
    limits.check_image_count(len(sources))  # before any decoding
    out = []
    with limits.pixel_budget():
        for i, source in enumerate(sources):
            try:
                out.append(load_still_image(source, **options))
            except InvalidInputError as e:
                raise InvalidInputError(f"images: image {i}: {e}") from e
    return out


def to_evaluation_result(
    verdict: Any, *, query: str | None, response: str | None, contexts: Sequence[str] | None
) -> ETAEvaluationResult:
    """The LlamaIndex result for an ETA ``SafetyVerdict``."""
    passing = not verdict.unsafe
    return ETAEvaluationResult(
        query=query,
        response=response,
        contexts=contexts,
        passing=passing,
        score=1.0 if passing else 0.0,
        feedback=feedback(verdict),
        invalid_result=bool(verdict.errors),
        invalid_reason="; ".join(f"{k}: {v}" for k, v in verdict.errors.items()) or None,
        verdict=verdict.model_dump(),
    )


def feedback(verdict: Any) -> str:
    """One line per check: the score against its threshold, or why it did not run."""
    lines = [f"ETA verdict: {'unsafe' if verdict.unsafe else 'safe'}."]
    if verdict.pre_score is not None:
        flag = "unsafe" if verdict.input_unsafe else "safe"
        lines.append(
            f"Image: CLIP score {verdict.pre_score:.4f} vs threshold {verdict.pre_threshold} "
            f"(unsafe if >=): {flag}."
        )
    if verdict.post_score is not None:
        flag = "unsafe" if verdict.output_unsafe else "safe"
        lines.append(
            f"Response: reward {verdict.post_score:.4f} vs threshold {verdict.post_threshold} "
            f"(unsafe if <=): {flag}."
        )
    lines += [f"{side} check skipped: {why}." for side, why in verdict.skipped.items()]
    lines += [f"{side} check failed: {err}." for side, err in verdict.errors.items()]
    return " ".join(lines)

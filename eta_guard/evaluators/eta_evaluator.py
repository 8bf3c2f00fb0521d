"""``ETAEvaluator``: ETA's two evaluators (CLIP before, reward model after), extra gates and judges
(:mod:`eta_guard.evaluators.base`), and the rule combining the sides (``ETAConfig.decision_rule``)."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL, ETAConfig
from eta_guard.errors import ETAError, EvaluatorError, InvalidInputError
from eta_guard.evaluators.base import GuardRequest, applies_to, user_messages
from eta_guard.limits import RequestLimits, check_encodable
from eta_guard.media import image_options, load_images
from eta_guard.model_thread import thread_for
from eta_guard.verdict import EvaluatorScore, SafetyVerdict

if TYPE_CHECKING:
    from PIL import Image

    from eta_guard.evaluators.base import GateEvaluator, JudgeEvaluator
    from eta_guard.evaluators.clip import CLIPPreEvaluator
    from eta_guard.evaluators.reward import RewardPostEvaluator
    from eta_guard.evaluators.reward_session import IncrementalRewardScorer, SessionStats
    from eta_guard.media import ImageSource
    from eta_guard.messages import Conversation

logger = logging.getLogger(__name__)
T = TypeVar("T")

_STAGES = {
    "pre": "pre-generation (CLIP image) evaluator",
    "post": "post-generation (reward model) evaluator",
}
_ITEM_KEYS = {"images", "response", "text"}


@dataclass
class _Side:
    """The outcome of one evaluator on one item: a score, or a policy decision after an error."""

    score: float | None = None
    image_scores: list[float] | None = None
    flag: bool | None = None  # set only by the failure policy
    error: str | None = None
    windows: int | None = None  # reward-model windows the response was scored in
    extra: list[EvaluatorScore] | None = None  # gates' / judges' entries


class ETAEvaluator:
    """Evaluate images (CLIP) and responses (reward model) with ETA's thresholds and AND rule.

    Args:
        pre: The CLIP pre-evaluator, or ``None`` (asking it for images then raises).
        post: The reward-model post-evaluator, or ``None``.
        config: Thresholds, prompts and the failure policy (default: the paper's values).
        lock: Lock serialising model calls (shared by :meth:`with_config` views).
        batchers: Cross-request batchers (shared by views; built from ``config`` when omitted
            and ``config.evaluator_batching`` is on).
        gates: Extra pre-generation evaluators (:class:`~eta_guard.evaluators.base.GateEvaluator`,
            e.g. a Llama Guard in prompt mode, a patch-level CLIP scan); they see the images and
            the user's text and run after CLIP. Any of CLIP and the gates flagging flags the input.
            A gate whose ``applies_to`` holds ``"text_only"`` (a text guard, Llama Guard) checks
            requests without images under ``config.text_only_policy="guard"``. Evaluator specs
            (``"llama-guard-vision:PATH"``, :mod:`eta_guard.evaluators.specs`) are loaded here.
        judges: Extra post-generation evaluators (e.g. a Llama Guard in response mode); they see
            the answer and the conversation and run after the RM. Any flagging flags the output.
            Specs as for ``gates``.

    Setup (random tiny checkpoints, offline; real use: the default reference checkpoints):
        >>> import asyncio, tempfile
        >>> from eta_guard.testing import build_tiny_checkpoints, make_test_image
        >>> ckpt = build_tiny_checkpoints(tempfile.mkdtemp())

    Instantiate:
        >>> evaluator = ETAEvaluator.from_pretrained(
        ...     clip=ckpt.clip, reward_model=ckpt.reward_model, device="cpu")

    Invoke:
        >>> verdict = evaluator.evaluate(images=[make_test_image()], response="I can't help.")
        >>> sorted(verdict.timings), verdict.unsafe == (verdict.input_unsafe and verdict.output_unsafe)
        (['post', 'pre'], True)

    Batch (one CLIP forward and one RM forward for all items):
        >>> verdicts = evaluator.evaluate_batch([{"images": make_test_image()}, {"response": "Sure."}])
        >>> [v.skipped for v in verdicts]
        [{'post': 'no response given'}, {'pre': 'no image given'}]

    Async:
        >>> asyncio.run(evaluator.aevaluate(response="Sure.")).pre_score is None
        True
    """

    def __init__(
        self,
        pre: CLIPPreEvaluator | None = None,
        post: RewardPostEvaluator | None = None,
        config: ETAConfig | None = None,
        *,
        lock: threading.RLock | None = None,
        batchers: EvaluatorBatchers | None = None,
        gates: Sequence[GateEvaluator | str] = (),
        judges: Sequence[JudgeEvaluator | str] = (),
    ) -> None:
        if config is not None and not isinstance(config, ETAConfig):
            raise InvalidInputError(f"config must be an ETAConfig, got {type(config).__name__}")
        if _has_specs(gates) or _has_specs(judges):
            from eta_guard.evaluators.specs import build_guards

            gates, judges = build_guards(gates, judges, clip=pre)
        for what, items in (("gates", gates), ("judges", judges)):
            for item in items:
                if not callable(getattr(item, "check", None)) or not hasattr(item, "threshold"):
                    raise InvalidInputError(
                        f"{what}: {type(item).__name__} has no check(requests) / threshold; see "
                        "eta_guard.evaluators.base"
                    )
        self.pre = pre
        self.post = post
        self.gates: list[GateEvaluator] = list(gates)  # type: ignore[arg-type]  # specs built above
        self.judges: list[JudgeEvaluator] = list(judges)  # type: ignore[arg-type]
        self.config = config or ETAConfig()
        _check_text_gates(self.gates, self.config, view=lock is not None)
        # Models are shared by with_config() copies, so they share the lock too.
        self._lock = lock or threading.RLock()
        if batchers is None and self.config.evaluator_batching:
            batchers = EvaluatorBatchers(self, self.config)
        self._batchers = batchers

    @classmethod
    def from_pretrained(
        cls,
        clip: str | None = DEFAULT_CLIP,
        reward_model: str | None = DEFAULT_REWARD_MODEL,
        *,
        config: ETAConfig | None = None,
        device: Any = None,
        dtype: Any = None,
        clip_backend: str = "transformers",
        clip_pretrained: str | None = None,
        trust_remote_code: bool = False,
        local_files_only: bool = False,
        clip_kwargs: dict[str, Any] | None = None,
        reward_model_kwargs: dict[str, Any] | None = None,
        preset: Any = None,
        gates: Sequence[Any] | None = None,
        judges: Sequence[Any] | None = None,
    ) -> ETAEvaluator:
        """Load CLIP and the reward model; ``clip=None`` / ``reward_model=None`` skip one side.

        ``gates`` / ``judges``: evaluator specs (``"llama-guard-vision:PATH"``,
        ``"patch-clip?grid=3"``...; :mod:`eta_guard.evaluators.specs`) or evaluator objects,
        loaded on ``device`` / ``dtype`` (a spec's own ``device=`` / ``dtype=`` wins); ``None``
        takes the preset's (``preset="cross-modal"``), else none.

        ``clip_kwargs`` feed :meth:`CLIPPreEvaluator.from_pretrained` (``model_kwargs``,
        ``processor_kwargs``, ...); ``reward_model_kwargs`` feed
        :meth:`RewardPostEvaluator.from_pretrained` (``model_kwargs``, ``tokenizer_kwargs``,
        ``max_length``, ``chat_template``, ``allow_new_weights``, ``max_windows``). In either,
        ``"device"`` / ``"dtype"`` place that model apart from the shared ``device`` / ``dtype``,
        and ``model_kwargs`` may carry ``quantization_config`` / ``device_map`` (see
        :mod:`eta_guard.placement`). ``preset``
        (e.g. ``"paper"``) sets the per-model dtypes and its config fields
        (:mod:`eta_guard.presets`). The reference RM (ArmoRM) loads natively: it needs no
        ``trust_remote_code``.
        """
        from eta_guard.placement import resolve_placements

        if clip is None and reward_model is None:
            raise InvalidInputError(
                "clip=None and reward_model=None: nothing to evaluate with; load at least one"
            )
        if preset is not None:
            from eta_guard.presets import get_preset

            chosen = get_preset(preset)
            config = chosen.apply_to_config(config)
            gates = chosen.gates if gates is None else gates
            judges = chosen.judges if judges is None else judges
        config = config or ETAConfig()
        places = resolve_placements(
            device=device,
            dtype=dtype,
            clip_kwargs=clip_kwargs,
            reward_model_kwargs=reward_model_kwargs,
            preset=preset,
        )
        pre = post = None
        if clip is not None:
            from eta_guard.evaluators.clip import CLIPPreEvaluator

            place = places["clip"]
            kwargs = {
                "backend": clip_backend,
                "pretrained": clip_pretrained,
                "device": place.device,
                "dtype": place.dtype,
                "local_files_only": local_files_only,
                "trust_remote_code": trust_remote_code,
                "prompt": config.safety_prompt,
                **place.kwargs,
            }
            pre = CLIPPreEvaluator.from_pretrained(clip, **kwargs)
        if reward_model is not None:
            from eta_guard.evaluators.reward import RewardPostEvaluator

            place = places["reward_model"]
            kwargs = {
                "device": place.device,
                "dtype": place.dtype,
                "trust_remote_code": trust_remote_code,
                "local_files_only": local_files_only,
                **place.kwargs,
            }
            post = RewardPostEvaluator.from_pretrained(reward_model, **kwargs)
        from eta_guard.evaluators.specs import build_guards

        built_gates, built_judges = build_guards(
            gates or (),
            judges or (),
            clip=pre,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
        )
        return cls(pre, post, config, gates=built_gates, judges=built_judges)

    def with_config(self, config: ETAConfig) -> ETAEvaluator:
        """A view with another config that shares the models (and their lock)."""
        if config is self.config:
            return self
        return ETAEvaluator(
            self.pre,
            self.post,
            config,
            lock=self._lock,
            batchers=self._batchers,
            gates=self.gates,
            judges=self.judges,
        )

    def save_config(self, path: str | Path) -> None:
        """Write :attr:`config` as JSON; load it back with ``ETAConfig.load(path)``."""
        self.config.save(path)

    # ------------------------------------------------------------------ scores
    def score_images(self, images: ImageSource | Sequence[ImageSource]) -> list[float]:
        """CLIP cosine of each image with ``config.safety_prompt`` (one batched forward).

        Raises:
            EvaluatorError: CLIP is not loaded or failed (scores are never made up, whatever
                ``on_evaluator_error`` says).
        """
        pil = self._load_images(images, where="images")
        return self._image_scores(pil)

    def score_responses(self, responses: Sequence[str], *, search: bool = False) -> list[float]:
        """Reward of each response (one batched forward).

        Args:
            responses: Response texts.
            search: Use ``config.rm_search_prompt`` (best-of-N) instead of ``rm_decision_prompt``.

        Raises:
            EvaluatorError: The reward model is not loaded or failed.
        """
        instruction = self.config.rm_search_prompt if search else self.config.rm_decision_prompt
        texts = _check_responses(responses)
        limits = RequestLimits.from_config(self.config)
        for i, text in enumerate(texts):
            limits.check_text_length(len(text), what=f"responses[{i}]")
            check_encodable(text, what=f"responses[{i}]")
        return self._reward_scores(texts, instruction)

    def reward_session(self, *, search: bool = True) -> RewardSession:
        """A stateful scorer for one best-of-N search: :meth:`score_responses` made incremental.

        A local reward model (``reward_numerics="fast"``) keeps its KV cache of what the calls' conversations share
        (instruction + accepted text, compared as tokens) from call to call, and runs only each
        answer's new tokens (:mod:`eta_guard.evaluators.reward_session`); scores equal
        :meth:`score_responses`'. A remote reward model gets a session that calls
        :meth:`score_responses`' scoring as it is (the engine's prefix cache does the rest).
        Close it (or use it as a context manager) to free the cache.

        Raises:
            EvaluatorError: (from ``score``) the reward model is not loaded or failed.
        """
        from eta_guard.evaluators.reward import RewardPostEvaluator

        instruction = self.config.rm_search_prompt if search else self.config.rm_decision_prompt
        post = self.post
        if isinstance(post, RewardPostEvaluator):
            from eta_guard.evaluators.reward_session import IncrementalRewardScorer

            scorer = IncrementalRewardScorer(
                post, instruction, numerics=self.config.reward_numerics
            )
            return RewardSession(self, scorer)
        return RewardSession(self, None, search=search)

    def sentence_scorer(
        self, images: ImageSource | Sequence[ImageSource]
    ) -> Callable[[list[str]], list[float]]:
        """Best-of-N's CLIP term: a function ``sentences -> cosines`` against ``images``.

        Each sentence's score is the largest cosine over the images (texts truncated to CLIP's
        context). The images are embedded once, on the first call.

        Raises:
            EvaluatorError: (from the returned function) CLIP is not loaded, failed, or gave a
                non-finite score.
        """
        pil = self._load_images(images, where="images")
        embeds: list[Any] = []

        def score(sentences: list[str]) -> list[float]:
            pre = self._require_pre()

            def run() -> list[float]:
                if not embeds:
                    embeds.append(pre.embed_images(pil, batch_size=self.config.clip_batch_size))
                return [float(s) for s in pre.similarity(embeds[0], sentences)]

            return self._call("pre", run)

        return score

    # ------------------------------------------------------------------ verdicts
    def evaluate(
        self,
        images: ImageSource | Sequence[ImageSource] | None = None,
        response: str | None = None,
        *,
        text: str | None = None,
        conversation: Conversation | None = None,
    ) -> SafetyVerdict:
        """Judge images and/or a response with ETA's rule.

        Both given: both scores are computed and ``unsafe`` is their AND (or
        ``config.decision_rule``). Only images: the input side decides. Only a response: the
        output side decides (``rm_decision_prompt``). An empty image list counts as no image
        (recorded in ``verdict.skipped``). ``text`` (the user's question) or ``conversation``
        (the whole normalised conversation, :class:`eta_guard.messages.Conversation`) is what the
        gates and judges read beside the images and the answer; CLIP and the RM never see it.

        Raises:
            InvalidInputError: Neither images nor a response, or a bad image / response.
            EvaluatorError: A needed evaluator is not loaded, or one failed under
                ``on_evaluator_error="raise"``.
        """
        images = _none_if_empty(images)
        if images is None and response is None and not self._gates_text(text, conversation):
            raise InvalidInputError("nothing to evaluate; pass images=..., response=... or both")
        if response is not None and not isinstance(response, str):
            raise InvalidInputError(f"response is {type(response).__name__}, expected str")
        _check_context(text, conversation, where="")
        loaded = self._load_request([images], [response], ["images"], texts=[text])
        return self._evaluate_many(loaded, [response], [text], [conversation])[0]

    def evaluate_input(
        self,
        images: ImageSource | Sequence[ImageSource] | None,
        *,
        text: str | None = None,
        conversation: Conversation | None = None,
    ) -> SafetyVerdict:
        """Judge images (and, for the gates, the user's ``text`` or ``conversation``).

        Without images, under ``text_only_policy="guard"``, the text gates judge ``text`` /
        ``conversation`` (a text-only request's pre-generation check).
        """
        if _none_if_empty(images) is None:
            if self._gates_text(text, conversation):
                _check_context(text, conversation, where="")
                loaded = self._load_request([None], [None], ["images"], texts=[text])
                return self._evaluate_many(loaded, [None], [text], [conversation])[0]
            raise InvalidInputError(f"evaluate_input(images={images!r}): pass at least one image")
        return self.evaluate(images=images, text=text, conversation=conversation)

    def evaluate_gates(
        self,
        images: ImageSource | Sequence[ImageSource] | None,
        *,
        text: str | None = None,
        conversation: Conversation | None = None,
    ) -> SafetyVerdict:
        """The gates alone on one request (CLIP does not run): for callers that score the
        images with CLIP themselves (e.g. with a per-image cache) and add the gates' verdict.

        Images given: the gates that read images; none: the text gates, under
        ``text_only_policy="guard"`` (otherwise nothing runs and the verdict says so).
        """
        _check_context(text, conversation, where="")
        images = _none_if_empty(images)
        loaded = self._load_request([images], [None], ["images"], texts=[text])
        return self._evaluate_many(loaded, [None], [text], [conversation], clip=False)[0]

    def evaluate_output(
        self, response: str, *, conversation: Conversation | None = None
    ) -> SafetyVerdict:
        """Judge a response only (the post-generation check); judges may read ``conversation``."""
        if response is None:
            raise InvalidInputError("evaluate_output(response=None): pass the response text")
        if not isinstance(response, str):
            raise InvalidInputError(f"response is {type(response).__name__}, expected str")
        _check_context(None, conversation, where="")
        loaded = self._load_request([None], [response], ["images"])
        return self._evaluate_many(loaded, [response], [None], [conversation], pre=False)[0]

    def evaluate_batch(self, items: Sequence[dict[str, Any]]) -> list[SafetyVerdict]:
        """Judge many items with one CLIP forward and one RM forward over all of them.

        Args:
            items: Dicts with ``"images"`` and/or ``"response"`` (the arguments of :meth:`evaluate`),
                and ``"text"`` (the user's text, read by the gates; without images, by the text
                gates under ``text_only_policy="guard"``).

        Returns:
            One verdict per item, in order. Timings are those of the shared forwards.
        """
        parsed = [
            _parse_item(i, item, text_only=self._gates_text("", None))
            for i, item in enumerate(_check_items(items))
        ]
        responses = [response for _, response, _ in parsed]
        texts = [text for _, _, text in parsed]
        images = self._load_request(
            [imgs for imgs, _, _ in parsed],
            responses,
            [f"items[{i}].images" for i in range(len(parsed))],
            texts=texts,
        )
        return self._evaluate_many(images, responses, texts, [None] * len(parsed))

    def _gates_text(self, text: str | None, conversation: Conversation | None) -> bool:
        """Whether a request without images gets a pre-generation check from the text gates."""
        return (
            (text is not None or conversation is not None)
            and self.config.text_only_policy == "guard"
            and any("text_only" in applies_to(g) for g in self.gates)
        )

    def _evaluate_many(
        self,
        images: list[list[Image.Image] | None],
        responses: list[str | None],
        texts: list[str | None],
        conversations: list[Conversation | None],
        *,
        pre: bool = True,
        clip: bool = True,
    ) -> list[SafetyVerdict]:
        timings: dict[str, float] = {}
        n = len(images)
        run_clip = pre and clip
        pre_sides: list[_Side | None] = self._run_pre(images, timings) if run_clip else [None] * n
        requests = [
            _request(group, text, conv)
            for group, text, conv in zip(images, texts, conversations, strict=True)
        ]
        if pre:
            kinds = [
                "images" if group else "text_only" if self._gates_text(text, conv) else None
                for group, text, conv in zip(images, texts, conversations, strict=True)
            ]
            self._run_extra("pre", self.gates, requests, kinds, pre_sides, timings)
        post_sides = self._run_post(responses, timings)
        judged = [
            GuardRequest(r.messages, r.images, response) if response is not None else None
            for r, response in zip(requests, responses, strict=True)
        ]
        self._run_extra(
            "post",
            self.judges,
            [j or r for j, r in zip(judged, requests, strict=True)],
            ["answer" if j is not None else None for j in judged],
            post_sides,
            timings,
        )
        return [
            self._verdict(pre_side, post_side, timings)
            for pre_side, post_side in zip(pre_sides, post_sides, strict=True)
        ]

    def _run_extra(
        self,
        side: str,
        evaluators: Sequence[GateEvaluator | JudgeEvaluator],
        requests: list[GuardRequest],
        kinds: list[str | None],
        sides: list[_Side | None],
        timings: dict[str, float],
    ) -> None:
        """Run each gate / judge over the requests it applies to; add entries to ``sides``.

        ``kinds[i]``: ``"images"`` / ``"text_only"`` (a gate runs where its ``applies_to`` holds
        it), ``"answer"`` (every judge runs), or None (nothing runs on request ``i``).
        """
        for evaluator in evaluators:
            wanted = {"answer"} | (applies_to(evaluator) if side == "pre" else set())
            todo = [i for i, kind in enumerate(kinds) if kind is not None and kind in wanted]
            if not todo:
                continue
            name = str(getattr(evaluator, "name", type(evaluator).__name__))
            batch = [requests[i] for i in todo]
            start = time.perf_counter()
            try:
                scores = self._call_extra(
                    side, name, evaluator, functools.partial(evaluator.check, batch)
                )
                if len(scores) != len(batch):
                    raise EvaluatorError(
                        f"the {side}-generation evaluator {name!r} returned {len(scores)} "
                        f"scores for {len(batch)} requests"
                    )
                entries = [
                    EvaluatorScore(
                        name=name,
                        side=side,  # type: ignore[arg-type]
                        score=s.score,
                        threshold=evaluator.threshold,
                        unsafe=s.score >= evaluator.threshold,
                        categories=list(s.categories),
                    )
                    for s in scores
                ]
            except EvaluatorError as e:
                flag = self._apply_policy(side, e).flag
                entries = [
                    EvaluatorScore(
                        name=name,
                        side=side,  # type: ignore[arg-type]
                        threshold=evaluator.threshold,
                        unsafe=bool(flag),
                        error=str(e),
                    )
                    for _ in todo
                ]
            finally:
                timings[f"{side}:{name}"] = time.perf_counter() - start
            for i, entry in zip(todo, entries, strict=True):
                current = sides[i] or _Side()
                current.extra = [*(current.extra or []), entry]
                sides[i] = current

    def _call_extra(
        self, side: str, name: str, evaluator: Any, fn: Callable[[], list[Any]]
    ) -> list[Any]:
        """A gate / judge call on its model thread; failures and non-finite scores name it."""
        try:
            scores = list(self._on_model(evaluator, fn))
        except ETAError:
            raise
        except Exception as e:
            logger.error("the %s evaluator %s failed", side, name, exc_info=e)
            raise EvaluatorError(
                f"the {side}-generation evaluator {name!r} failed ({type(e).__name__}; "
                "details in the log)"
            ) from e
        if any(not math.isfinite(s.score) for s in scores):
            raise EvaluatorError(
                f"the {side}-generation evaluator {name!r} gave a non-finite score"
            )
        return scores

    # ------------------------------------------------------------------ async
    async def aevaluate(
        self,
        images: ImageSource | Sequence[ImageSource] | None = None,
        response: str | None = None,
        *,
        text: str | None = None,
        conversation: Conversation | None = None,
    ) -> SafetyVerdict:
        """Async :meth:`evaluate`.

        It runs in a worker thread (image decoding, a remote evaluator's HTTP calls), and every
        local model's forwards run on that model's thread (:mod:`eta_guard.model_thread`), so
        concurrent calls' scorings can share a forward (:mod:`eta_guard.evaluators.batching`).
        """
        return await asyncio.to_thread(
            functools.partial(self.evaluate, text=text, conversation=conversation),
            images,
            response,
        )

    async def aevaluate_input(
        self,
        images: ImageSource | Sequence[ImageSource] | None,
        *,
        text: str | None = None,
        conversation: Conversation | None = None,
    ) -> SafetyVerdict:
        """Async :meth:`evaluate_input` (threads as :meth:`aevaluate`)."""
        return await asyncio.to_thread(
            functools.partial(self.evaluate_input, text=text, conversation=conversation), images
        )

    async def aevaluate_output(
        self, response: str, *, conversation: Conversation | None = None
    ) -> SafetyVerdict:
        """Async :meth:`evaluate_output` (threads as :meth:`aevaluate`)."""
        return await asyncio.to_thread(
            functools.partial(self.evaluate_output, conversation=conversation), response
        )

    async def aevaluate_batch(self, items: Sequence[dict[str, Any]]) -> list[SafetyVerdict]:
        """Async :meth:`evaluate_batch` (threads as :meth:`aevaluate`)."""
        return await asyncio.to_thread(self.evaluate_batch, items)

    # ------------------------------------------------------------------ core
    def _run_pre(
        self, images: list[list[Image.Image] | None], timings: dict[str, float]
    ) -> list[_Side | None]:
        """One CLIP forward over every image of every item; per-item max."""
        flat = [image for group in images if group for image in group]
        if not flat or (self.pre is None and self.gates):
            return [None] * len(images)
        self._require_pre()
        start = time.perf_counter()
        try:
            scores = self._image_scores(flat)
        except EvaluatorError as e:
            sides = self._apply_policy("pre", e)
            return [sides if group else None for group in images]
        finally:
            timings["pre"] = time.perf_counter() - start
        out: list[_Side | None] = []
        offset = 0
        for group in images:
            if not group:
                out.append(None)
                continue
            per_image = scores[offset : offset + len(group)]
            offset += len(group)
            out.append(_Side(score=max(per_image), image_scores=per_image))
        return out

    def _run_post(
        self, responses: list[str | None], timings: dict[str, float]
    ) -> list[_Side | None]:
        """One RM forward over every response (decision prompt)."""
        texts = [r for r in responses if r is not None]
        if not texts or (self.post is None and self.judges):
            return [None] * len(responses)
        post, instruction = self._require_post(), self.config.rm_decision_prompt
        start = time.perf_counter()
        try:
            scores = self._reward_scores(texts, instruction)
        except EvaluatorError as e:
            side = self._apply_policy("post", e)
            return [side if r is not None else None for r in responses]
        finally:
            timings["post"] = time.perf_counter() - start
        counter = getattr(post, "window_counts", None)  # tokenization only, no forward
        with self._lock:
            windows = counter(texts, instruction) if counter is not None else [None] * len(texts)
        sides = iter(_Side(score=s, windows=w) for s, w in zip(scores, windows, strict=True))
        return [next(sides) if r is not None else None for r in responses]

    def _image_scores(self, images: list[Image.Image]) -> list[float]:
        """CLIP cosines with the safety prompt, grouped with concurrent calls when batching."""
        pre, key = self._require_pre(), (self.config.safety_prompt, self.config.clip_batch_size)
        if self._batchers is None:
            return self._call(
                "pre", lambda: pre.score_images(images, prompt=key[0], batch_size=key[1])
            )
        batcher = self._batchers.images
        return self._call("pre", lambda: batcher(key, images), batched=True)

    def _reward_scores(self, texts: list[str], instruction: str) -> list[float]:
        """Rewards under ``instruction``, grouped with concurrent calls when batching."""
        post, key = self._require_post(), (instruction, self.config.reward_numerics)
        if self._batchers is None:
            return self._call("post", lambda: _score_with(post, texts, key))
        batcher = self._batchers.rewards
        return self._call("post", lambda: batcher(key, texts), batched=True)

    def _call(
        self, stage: str, fn: Callable[[], list[float]], *, batched: bool = False
    ) -> list[float]:
        """Run a model call on the stage's model thread (``batched``: ``fn`` is a batcher call,
        which queues its own runs there); wrap failures in an ``EvaluatorError`` naming the stage.

        A non-finite score is a failure too: NaN compares False with any threshold, so taken as a
        score it would silently pass the check.
        """
        try:
            scores = (
                fn() if batched else self._on_model(self.pre if stage == "pre" else self.post, fn)
            )
        except ETAError:
            raise
        except Exception as e:
            # The inner text can hold paths and internals; this message may reach a client,
            # so it names the stage only. The cause stays chained (and logged) for operators.
            logger.error("the %s failed", _STAGES[stage], exc_info=e)
            raise EvaluatorError(
                f"the {_STAGES[stage]} failed ({type(e).__name__}; details in the log)"
            ) from e
        bad = [(i, s) for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise EvaluatorError(
                f"the {_STAGES[stage]} returned a non-finite score ({bad[0][1]!r} for item "
                f"{bad[0][0]}); the model overflowed or is broken (float16 weights often do: "
                "load it in float32 or bfloat16)"
            )
        return scores

    def _on_model(self, evaluator: Any, fn: Callable[[], T]) -> T:
        """``fn()`` on ``evaluator``'s model thread (:mod:`eta_guard.model_thread`), under the
        models' lock; a remote evaluator (no model in this process) runs it right here, unlocked:
        its HTTP calls are I/O, which must never hold the model thread or the lock."""
        worker = thread_for(evaluator)
        if worker is None:
            return fn()

        def locked() -> T:
            with self._lock:
                return fn()

        return worker.call(locked)

    def _apply_policy(self, stage: str, error: EvaluatorError) -> _Side:
        policy = self.config.on_evaluator_error
        if policy == "raise":
            raise error
        # Never silently pass: the verdict records the error whichever way the policy decides.
        return _Side(flag=policy == "fail_closed", error=str(error))

    def _verdict(
        self, pre: _Side | None, post: _Side | None, timings: dict[str, float]
    ) -> SafetyVerdict:
        skipped: dict[str, str] = {}
        errors: dict[str, str] = {}
        entries = self._entries("pre", pre) + self._entries("post", post)
        for entry in entries:
            if entry.error is not None:
                errors[entry.side] = "; ".join(
                    e for e in (errors.get(entry.side), entry.error) if e
                )
        if pre is None or (pre.score is None and pre.error is None and not pre.extra):
            pre = None
            skipped["pre"] = (
                "no image given"
                if self.pre is not None
                else "no image given (no CLIP model loaded)"
            )
        elif pre.error is not None:
            errors["pre"] = "; ".join(e for e in (pre.error, errors.get("pre")) if e)
        if post is None or (post.score is None and post.error is None and not post.extra):
            post = None
            skipped["post"] = (
                "no response given" if self.post is not None else "no reward model loaded"
            )
        elif post.error is not None:
            errors["post"] = "; ".join(e for e in (post.error, errors.get("post")) if e)
        return SafetyVerdict.combine(
            pre_threshold=self.config.pre_threshold,
            post_threshold=self.config.post_threshold,
            pre_score=pre.score if pre else None,
            post_score=post.score if post else None,
            image_scores=(pre.image_scores or []) if pre else [],
            input_unsafe=pre.flag if pre else None,
            output_unsafe=post.flag if post else None,
            skipped=skipped,
            errors=errors,
            timings={
                k: v
                for k, v in timings.items()
                if (k.split(":")[0] == "pre" and pre) or (k.split(":")[0] == "post" and post)
            },
            post_windows=post.windows if post else None,
            evaluators=entries,
            rule=self.config.decision_rule,
        )

    def _entries(self, side: str, got: _Side | None) -> list[EvaluatorScore]:
        """The verdict's entries of one side: CLIP / the RM (when it ran), then the extras."""
        if got is None:
            return []
        out = []
        if got.score is not None or got.error is not None:
            pre = side == "pre"
            threshold = self.config.pre_threshold if pre else self.config.post_threshold
            flag = got.flag
            if flag is None and got.score is not None:
                flag = got.score >= threshold if pre else got.score <= threshold
            out.append(
                EvaluatorScore(
                    name="clip" if pre else "reward_model",
                    side=side,  # type: ignore[arg-type]
                    score=got.score,
                    threshold=threshold,
                    unsafe_when=">=" if pre else "<=",
                    unsafe=bool(flag),
                    error=got.error,
                )
            )
        return out + list(got.extra or [])

    def _require_pre(self) -> CLIPPreEvaluator:
        if self.pre is None:
            raise EvaluatorError(
                "images were given but the pre-generation (CLIP) evaluator is not loaded; "
                "build ETAEvaluator with clip=<checkpoint> (it was clip=None)"
            )
        return self.pre

    def _require_post(self) -> RewardPostEvaluator:
        if self.post is None:
            raise EvaluatorError(
                "a response was given but the post-generation (reward model) evaluator is not "
                "loaded; build ETAEvaluator with reward_model=<checkpoint> (it was reward_model=None)"
            )
        return self.post

    def _load_images(self, images: Any, *, where: str) -> list[Image.Image]:
        if images is None:
            raise InvalidInputError(f"{where} is None; pass at least one image")
        loaded = self._load_request([images], [None], [where])[0]
        assert loaded is not None
        return loaded

    def _load_request(
        self,
        groups: list[Any],
        responses: list[str | None],
        wheres: list[str],
        *,
        texts: list[str | None] | None = None,
    ) -> list[list[Image.Image] | None]:
        """Decode one request's image groups under its limits (``None`` groups stay ``None``).

        Image count and text length are checked before anything is decoded; the pixel total of
        the whole request from each image's header, before that image is decoded.
        """
        limits = RequestLimits.from_config(self.config)
        limits.check_text_length(
            sum(len(r) for r in [*responses, *(texts or [])] if r is not None),
            what="the response and question text",
        )
        for i, response in enumerate(responses):  # the client's bad text, not an RM failure
            if response is not None:
                check_encodable(
                    response, what=f"responses[{i}]" if len(responses) > 1 else "response"
                )
        for i, text in enumerate(texts or []):
            if text is not None:
                check_encodable(text, what=f"texts[{i}]" if len(texts or []) > 1 else "text")
        for group, where in zip(groups, wheres, strict=True):
            if isinstance(group, (list, tuple)) and not group:
                raise InvalidInputError(
                    f"{where}: the image list is empty; pass at least one image"
                )
        limits.check_image_count(
            sum(len(g) if isinstance(g, (list, tuple)) else 1 for g in groups if g is not None)
        )
        options = image_options(self.config)
        out: list[list[Image.Image] | None] = []
        with limits.pixel_budget():
            for group, where in zip(groups, wheres, strict=True):
                if group is None:
                    out.append(None)
                    continue
                try:
                    out.append(load_images(group, **options))
                except InvalidInputError as e:
                    raise InvalidInputError(f"{where}: {e}") from e
        return out

    def __repr__(self) -> str:
        pre = self.pre.name if self.pre else None
        post = self.post.name if self.post else None
        extra = "".join(
            f", {what}={[getattr(e, 'name', type(e).__name__) for e in items]!r}"
            for what, items in (("gates", self.gates), ("judges", self.judges))
            if items
        )
        return f"ETAEvaluator(clip={pre!r}, reward_model={post!r}{extra})"


class RewardSession:
    """The search's reward scorer from :meth:`ETAEvaluator.reward_session` (a context manager).

    ``score(answers)`` checks and scores like :meth:`ETAEvaluator.score_responses` (same limits,
    same failure wrapping); ``stats`` holds the incremental scorer's token counts (``None`` when
    the reward model is remote).
    """

    def __init__(
        self,
        evaluator: ETAEvaluator,
        scorer: IncrementalRewardScorer | None,
        *,
        search: bool = True,
    ) -> None:
        self._evaluator, self._scorer, self._search = evaluator, scorer, search

    @property
    def stats(self) -> SessionStats | None:
        return self._scorer.stats if self._scorer is not None else None

    def score(self, answers: Sequence[str]) -> list[float]:
        """Reward of each answer (prefix + accepted text + candidate), in order."""
        scorer = self._scorer
        if scorer is None:
            return self._evaluator.score_responses(answers, search=self._search)
        texts = _check_responses(answers)
        limits = RequestLimits.from_config(self._evaluator.config)
        for i, text in enumerate(texts):
            limits.check_text_length(len(text), what=f"responses[{i}]")
        return self._evaluator._call("post", lambda: scorer.score(texts))

    def close(self) -> None:
        """Free the kept cache (idempotent)."""
        if self._scorer is not None:
            self._scorer.close()

    def __enter__(self) -> RewardSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EvaluatorBatchers:
    """The cross-request batchers of an evaluator and its views (:mod:`.batching`).

    ``images``: CLIP image scores, keyed by (prompt, chunk size); ``rewards``: reward-model
    scores keyed by (instruction, numerics): the decision, and searches whose session is not
    incremental (a remote RM). A local search's incremental session runs on its own cache, and
    the search's CLIP sentence term (a few short texts) is not grouped. A local model's runs
    happen on its model thread (:mod:`eta_guard.model_thread`) under the evaluator's model lock;
    a remote one's in the leader's thread, serialised by the batcher's own lock only (so a slow
    HTTP call never holds the model thread).
    """

    def __init__(self, evaluator: ETAEvaluator, config: ETAConfig) -> None:
        from eta_guard.evaluators.batching import MicroBatcher

        options: dict[str, Any] = {
            "max_wait_s": config.evaluator_batch_wait_ms / 1000.0,
            "max_batch": config.evaluator_max_batch,
        }
        pre, post = evaluator.pre, evaluator.post

        def placed(model: Any) -> dict[str, Any]:
            worker = thread_for(model)
            return {"worker": worker, "run_lock": evaluator._lock if worker else None}

        def images(key: tuple[str, int], items: list[Any]) -> list[float]:
            assert pre is not None
            return pre.score_images(items, prompt=key[0], batch_size=key[1])

        def rewards(key: tuple[str, str], items: list[str]) -> list[float]:
            assert post is not None
            return _score_with(post, items, key)

        self.images: MicroBatcher[Any, float] = MicroBatcher(images, **options, **placed(pre))
        self.rewards: MicroBatcher[str, float] = MicroBatcher(rewards, **options, **placed(post))


def _score_with(post: Any, texts: list[str], key: tuple[str, str]) -> list[float]:
    """``post.score`` under ``(instruction, numerics)``; numerics apply to local RMs only."""
    from eta_guard.evaluators.reward import RewardPostEvaluator

    instruction, numerics = key
    if numerics != "fast" and isinstance(post, RewardPostEvaluator):
        return post.score(texts, instruction, numerics="reference")
    return list(post.score(texts, instruction))


def _check_items(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(items, dict) or not isinstance(items, (list, tuple)):
        raise InvalidInputError(
            f"items must be a list of dicts with 'images' and/or 'response', got {type(items).__name__}"
        )
    return list(items)


def _parse_item(
    index: int, item: Any, *, text_only: bool = False
) -> tuple[Any, str | None, str | None]:
    if not isinstance(item, dict):
        raise InvalidInputError(
            f"items[{index}] is {type(item).__name__}; expected a dict with 'images' and/or 'response'"
        )
    unknown = set(item) - _ITEM_KEYS
    if unknown:
        raise InvalidInputError(
            f"items[{index}] has unknown keys {sorted(unknown)}; allowed: 'images', 'response', 'text'"
        )
    images, response = _none_if_empty(item.get("images")), item.get("response")
    text = item.get("text")
    if text is not None and not isinstance(text, str):
        raise InvalidInputError(f"items[{index}]: text is {type(text).__name__}, expected str")
    if images is None and response is None and not (text_only and text is not None):
        raise InvalidInputError(
            f"items[{index}]: nothing to evaluate; give 'images', 'response' or both"
        )
    if response is not None and not isinstance(response, str):
        raise InvalidInputError(
            f"items[{index}]: response is {type(response).__name__}, expected str"
        )
    return images, response, text


def _check_context(text: Any, conversation: Any, *, where: str) -> None:
    if text is not None and not isinstance(text, str):
        raise InvalidInputError(f"{where}text is {type(text).__name__}, expected str")
    if conversation is not None and not hasattr(conversation, "messages"):
        raise InvalidInputError(
            f"{where}conversation is {type(conversation).__name__}; pass an "
            "eta_guard.messages.Conversation (normalize_messages(...))"
        )
    if text is not None and conversation is not None:
        raise InvalidInputError("pass text= or conversation=, not both (the text is in it)")


def _request(
    images: list[Image.Image] | None, text: str | None, conversation: Conversation | None
) -> GuardRequest:
    """What gates and judges read: the conversation, or the user's text with the images."""
    if conversation is not None:
        return GuardRequest(list(conversation.messages), list(conversation.images))
    group = list(images or [])
    return GuardRequest(user_messages(text, len(group)), group)


def _has_specs(items: Any) -> bool:
    if isinstance(items, str):
        return True
    from eta_guard.evaluators.specs import EvaluatorSpec

    return any(isinstance(i, (str, EvaluatorSpec)) for i in items)


def _check_text_gates(gates: Sequence[Any], config: ETAConfig, *, view: bool) -> None:
    """Refuse ``text_only_policy="guard"`` without a gate for text-only requests, and (outside
    per-call views, where the policy is the caller's choice) a text-only gate that never runs."""
    text_gates = [g for g in gates if "text_only" in applies_to(g)]
    if config.text_only_policy == "guard" and not text_gates:
        raise InvalidInputError(
            "text_only_policy='guard' checks text-only requests with the gates that read text "
            "(a text guard such as 'llama-guard-text:PATH' or 'qwen3guard:PATH', or a Llama Guard); "
            "none was given: add one to gates=, or use text_only_policy='trust' / 'reward_only'"
        )
    idle = [g for g in text_gates if "images" not in applies_to(g)]
    if idle and config.text_only_policy != "guard" and not view:
        names = [str(getattr(g, "name", type(g).__name__)) for g in idle]
        raise InvalidInputError(
            f"gates {names!r} read text-only requests only, and text_only_policy="
            f"{config.text_only_policy!r} never checks those with gates: they would never run; "
            "set text_only_policy='guard' (or pass them as judges=)"
        )


def _none_if_empty(images: Any) -> Any:
    return None if isinstance(images, (list, tuple)) and not images else images


def _check_responses(responses: Sequence[str]) -> list[str]:
    if isinstance(responses, str):
        raise InvalidInputError(
            "responses must be a list of strings, not a single str; wrap it: [response]"
        )
    if not isinstance(responses, (list, tuple)):
        raise InvalidInputError(
            f"responses must be a list of strings, got {type(responses).__name__}"
        )
    items = list(responses)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidInputError(f"responses[{i}] is {type(text).__name__}, expected str")
    return items

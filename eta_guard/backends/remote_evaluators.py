"""ETA's evaluators served by an engine: a reward model via ``/classify``, CLIP via ``/v1/embeddings``.

They stand in for :class:`~eta_guard.evaluators.reward.RewardPostEvaluator` and
:class:`~eta_guard.evaluators.clip.CLIPPreEvaluator` inside an
:class:`~eta_guard.evaluators.eta_evaluator.ETAEvaluator`, which keeps the thresholds, the AND rule
and the failure policy; each side can be local or remote on its own. ArmoRM (custom code, a
``score`` output) is not servable by vLLM: keep it local.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from eta_guard.backends._http import EngineClient, HTTPSettings, ReplyShapeError, field
from eta_guard.backends.control_markers import control_strings_of, neutralize
from eta_guard.backends.image_payload import png_data_url
from eta_guard.backends.served_tokenizer import load_tokenizer
from eta_guard.errors import BackendError, EvaluatorError, InvalidInputError

if TYPE_CHECKING:
    from PIL import Image

T = TypeVar("T")

_CLASSIFY = "/classify"
_EMBED = "/v1/embeddings"


class RemoteRewardModel:
    """A sequence-classification reward model served by vLLM (``--runner pooling``), scored via ``/classify``.

    Each response is sent as the safety conversation ``[user: instruction, assistant: response]``
    in ``messages`` form, so the engine renders it with the RM's own chat template (no generation
    prompt, as locally). ``use_activation=false`` asks for the raw score: vLLM's classify pooler
    applies a sigmoid to a one-label head by default, and ETA's threshold (0.06) is on the raw
    reward. The responses of one call go out concurrently.

    Args:
        base_url: the engine serving the RM.
        model: its served name.
        api_key: bearer token, if needed.
        http: timeouts, retries, pool size.
        tokenizer: the served RM's tokenizer (object, folder or HF id). The engine parses special
            tokens in the answer it renders, so an answer holding one of this tokenizer's control
            tokens (``<|eot_id|>``...) could forge turns of the safety conversation; with the
            tokenizer they are broken with a zero-width space before sending (scored as text, as
            locally). Without it answers go as they are (a warning says so).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        http: HTTPSettings | None = None,
        tokenizer: Any = None,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise InvalidInputError(f"reward model={model!r}: give the engine's served model name")
        self.client = EngineClient(base_url, api_key=api_key, settings=http)
        self.name = model
        self._markers = control_strings_of(
            load_tokenizer(tokenizer), what=f"remote reward model {model!r}"
        )

    def score(self, responses: Sequence[str], instruction: str) -> list[float]:
        """Raw reward of each response under ``instruction`` (blocking).

        Raises:
            EvaluatorError: the engine failed (so ETA's ``on_evaluator_error`` policy applies).
        """
        return _as_evaluator_error(self.client.run_sync, self.ascore(responses, instruction))

    async def ascore(self, responses: Sequence[str], instruction: str) -> list[float]:
        """Raw reward of each response under ``instruction``."""
        if isinstance(responses, str):
            raise InvalidInputError("responses must be a list of strings, not a single str")
        return list(await asyncio.gather(*(self._one(r, instruction) for r in responses)))

    async def _one(self, response: str, instruction: str) -> float:
        # The local RM tokenizes markers in the answer as text; the engine would parse them.
        response = neutralize(response, self._markers)
        body = {
            "model": self.name,
            "messages": [
                {"role": "user", "content": instruction},
                {"role": "assistant", "content": response},
            ],
            "use_activation": False,
        }
        reply = await self.client.post_json(_CLASSIFY, body)
        probs = field(reply, "data", 0, "probs", kind=list, what=_CLASSIFY)
        if not probs:
            raise ReplyShapeError(f"malformed reply to {_CLASSIFY}: empty probs")
        return _finite(probs[0], _CLASSIFY)

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"RemoteRewardModel({self.client.base_url!r}, {self.name!r})"


class RemoteCLIP:
    """CLIP served by vLLM's embedding endpoint (``/v1/embeddings``); cosines computed here.

    vLLM's CLIP takes text-only or image-only inputs: texts go as one ``input`` list, each image
    as its own ``messages`` request holding only that image.

    Args:
        base_url: the engine serving CLIP.
        model: its served name.
        prompt: default unsafe-content prompt.
        api_key: bearer token, if needed.
        http: timeouts, retries, pool size.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        prompt: str | None = None,
        api_key: str | None = None,
        http: HTTPSettings | None = None,
    ) -> None:
        from eta_guard.config import DEFAULT_SAFETY_PROMPT

        if not isinstance(model, str) or not model.strip():
            raise InvalidInputError(f"CLIP model={model!r}: give the engine's served model name")
        self.client = EngineClient(base_url, api_key=api_key, settings=http)
        self.name = model
        self.prompt = prompt or DEFAULT_SAFETY_PROMPT
        self._text_cache: dict[str, list[float]] = {}

    # The CLIPPreEvaluator surface used by ETAEvaluator (blocking).
    def score_images(
        self,
        images: list[Image.Image],
        *,
        prompt: str | None = None,
        batch_size: int | None = None,
    ) -> list[float]:
        """CLIP cosine of each image with ``prompt`` (at most ``batch_size`` requests at once)."""
        return _as_evaluator_error(
            self.client.run_sync,
            self.ascore_images(images, prompt=prompt, batch_size=batch_size),
        )

    def embed_images(
        self, images: list[Image.Image], *, batch_size: int | None = None
    ) -> list[list[float]]:
        """One embedding per image (at most ``batch_size`` requests at once)."""
        return _as_evaluator_error(self.client.run_sync, self._embed_images(images, batch_size))

    def similarity(self, image_embeds: list[list[float]], texts: list[str]) -> list[float]:
        """Per text, its largest cosine over ``image_embeds``."""
        return _as_evaluator_error(self.client.run_sync, self.asimilarity(image_embeds, texts))

    # Async versions.
    async def ascore_images(
        self,
        images: list[Image.Image],
        *,
        prompt: str | None = None,
        batch_size: int | None = None,
    ) -> list[float]:
        text = prompt or self.prompt
        if text not in self._text_cache:
            (self._text_cache[text],) = await self._embed_texts([text])
        embeds = await self._embed_images(images, batch_size)
        return [_cosine(e, self._text_cache[text]) for e in embeds]

    async def asimilarity(self, image_embeds: list[list[float]], texts: list[str]) -> list[float]:
        if not texts:
            return []
        text_embeds = await self._embed_texts(texts)
        return [max(_cosine(i, t) for i in image_embeds) for t in text_embeds]

    async def _embed_texts(self, texts: list[str]) -> list[list[float]]:
        # The engine truncates to CLIP's 77-token context (truncate_prompt_tokens=-1: the model max).
        body = {"model": self.name, "input": list(texts), "truncate_prompt_tokens": -1}
        reply = await self.client.post_json(_EMBED, body)
        return _embeddings(reply, len(texts))

    async def _embed_images(
        self, images: list[Image.Image], batch_size: int | None = None
    ) -> list[list[float]]:
        async def one(image: Image.Image) -> list[float]:
            url, _ = png_data_url(image)
            body = {
                "model": self.name,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
                ],
            }
            (embedding,) = _embeddings(await self.client.post_json(_EMBED, body), 1)
            return embedding

        # ETAConfig.clip_batch_size bounds how many images are in flight, as it bounds a local
        # forward's batch.
        size = batch_size or len(images) or 1
        out: list[list[float]] = []
        for start in range(0, len(images), size):
            out += await asyncio.gather(*(one(image) for image in images[start : start + size]))
        return out

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"RemoteCLIP({self.client.base_url!r}, {self.name!r})"


def _as_evaluator_error(run: Callable[[Any], T], coro: Any) -> T:
    """Run ``coro``; an engine failure becomes an ``EvaluatorError``, which the failure policy handles."""
    try:
        return run(coro)
    except BackendError as e:
        raise EvaluatorError(f"remote evaluator: {e}") from e


def _embeddings(reply: dict[str, Any], n: int) -> list[list[float]]:
    data = field(reply, "data", kind=list, what=_EMBED)
    if len(data) != n:
        raise ReplyShapeError(f"malformed reply to {_EMBED}: {len(data)} embeddings for {n} inputs")
    rows = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0)
    out = []
    for i, row in enumerate(rows):
        vector = field(row, "embedding", kind=list, what=_EMBED)
        if not vector:
            raise ReplyShapeError(f"malformed reply to {_EMBED}: embedding {i} is empty")
        out.append([_finite(v, _EMBED) for v in vector])
    return out


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReplyShapeError(f"malformed reply to {what}: {value!r} is not a finite number")
    return float(value)


def _cosine(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise ReplyShapeError(
            f"malformed reply to {_EMBED}: embeddings of different sizes ({len(a)} vs {len(b)})"
        )
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    if norm == 0:
        raise ReplyShapeError(f"malformed reply to {_EMBED}: a zero embedding has no direction")
    return dot / norm

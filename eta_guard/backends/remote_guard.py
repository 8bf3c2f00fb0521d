"""A Llama Guard served behind an OpenAI-compatible endpoint (e.g. vLLM) as an ETA gate or judge.

The request is a chat completion in the guard's own message form (the engine renders it with the
served model's chat template, so its task text and categories are the checkpoint's), greedy, with
``logprobs`` and ``top_logprobs``. The score is P(``unsafe``) at the first generated token that is
not whitespace, read from its top log-probabilities: when ``unsafe`` is not among them its
probability is below the smallest one listed, and that bound is reported (conservative for a
gate). Categories are parsed from the answer. The engine parses special tokens in what it
renders, so every control string of the served tokenizer in message text or in the answer is
broken with a zero-width space first (:mod:`eta_guard.backends.control_markers`).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from eta_guard.backends._http import EngineClient, HTTPSettings, ReplyShapeError, field
from eta_guard.backends.control_markers import control_strings_of, neutralize
from eta_guard.backends.image_payload import png_data_url
from eta_guard.backends.served_tokenizer import load_tokenizer
from eta_guard.errors import BackendError, EvaluatorError, InvalidInputError
from eta_guard.evaluators.base import GuardRequest, GuardScore
from eta_guard.evaluators.guard_answers import llama_guard_categories
from eta_guard.evaluators.guard_turns import GuardMode, llama_guard_turns

_CHAT = "/v1/chat/completions"


class RemoteLlamaGuard:
    """Llama Guard on an engine, via ``/v1/chat/completions`` (unsafe iff P(unsafe) >= threshold).

    Args:
        base_url: the engine serving the guard.
        model: its served name.
        mode: ``"prompt"`` (gate) or ``"response"`` (judge).
        tokenizer: the served guard's tokenizer (object, folder or HF id), whose control strings
            are broken in what is sent; without it text goes as it is (a warning says so).
        threshold: P(unsafe) at or above which the request is flagged.
        excluded_categories / categories: sent as ``chat_template_kwargs`` (the template's
            ``excluded_category_keys`` / ``categories``).
        max_tokens: greedy tokens asked for (the verdict line and the categories).
        top_logprobs: log-probabilities per position asked for (the engine's limit applies).
        images_per_prompt: images in one guard prompt (Llama Guard 3 Vision: 1; more: the max).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        mode: GuardMode = "prompt",
        tokenizer: Any = None,
        threshold: float = 0.5,
        excluded_categories: list[str] | None = None,
        categories: dict[str, str] | None = None,
        max_tokens: int = 20,
        top_logprobs: int = 20,
        images_per_prompt: int = 1,
        api_key: str | None = None,
        http: HTTPSettings | None = None,
        name: str | None = None,
    ) -> None:
        if mode not in ("prompt", "response"):
            raise InvalidInputError(f"mode={mode!r}: use 'prompt' (gate) or 'response' (judge)")
        if not isinstance(model, str) or not model.strip():
            raise InvalidInputError(f"guard model={model!r}: give the engine's served model name")
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInputError(f"threshold={threshold!r} must be a probability in [0, 1]")
        if not 1 <= top_logprobs <= 100 or max_tokens < 1 or images_per_prompt < 1:
            raise InvalidInputError(
                "top_logprobs must be in 1..100, max_tokens and images_per_prompt >= 1"
            )
        self.client = EngineClient(base_url, api_key=api_key, settings=http)
        self.model, self.mode, self.threshold = model, mode, threshold
        self.name = name or f"llama_guard:{model}"
        self.template_kwargs: dict[str, Any] = {}
        if excluded_categories:
            self.template_kwargs["excluded_category_keys"] = list(excluded_categories)
        if categories:
            self.template_kwargs["categories"] = dict(categories)
        self.max_tokens, self.top_logprobs = max_tokens, top_logprobs
        self.images_per_prompt = images_per_prompt
        self._markers = control_strings_of(
            load_tokenizer(tokenizer), what=f"remote guard {model!r}"
        )

    #: Requests this gate reads (see eta_guard.evaluators.base.GateEvaluator).
    applies_to = frozenset({"images", "text_only"})

    def body(self, request: GuardRequest, images: list[Any]) -> dict[str, Any]:
        """The chat-completion request for ``request`` with ``images`` (markers broken)."""
        parts = [{"type": "image_url", "image_url": {"url": png_data_url(i)[0]}} for i in images]
        messages = llama_guard_turns(
            request,
            self.mode,
            clean=lambda text: neutralize(text, self._markers),
            image_parts=parts,
        )
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        if self.template_kwargs:
            body["chat_template_kwargs"] = self.template_kwargs
        return body

    def check(self, requests: list[GuardRequest]) -> list[GuardScore]:
        """One score per request (blocking; the prompts of a call go out concurrently)."""
        try:
            return self.client.run_sync(self.acheck(requests))
        except BackendError as e:
            raise EvaluatorError(f"remote guard {self.name!r}: {e}") from e

    async def acheck(self, requests: list[GuardRequest]) -> list[GuardScore]:
        """Async :meth:`check`."""
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, request: GuardRequest) -> GuardScore:
        step = self.images_per_prompt
        groups = [request.images[i : i + step] for i in range(0, len(request.images), step)]
        replies = await asyncio.gather(
            *(self.client.post_json(_CHAT, self.body(request, g)) for g in groups or [[]])
        )
        scores = [read_reply(reply) for reply in replies]
        cats = tuple(dict.fromkeys(c for s in scores for c in s.categories))
        return GuardScore(max(s.score for s in scores), cats)

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"RemoteLlamaGuard({self.client.base_url!r}, {self.model!r}, mode={self.mode!r})"


def read_reply(reply: dict[str, Any]) -> GuardScore:
    """P(unsafe) and categories from a chat completion with ``logprobs`` (vLLM / OpenAI shape)."""
    choice = field(reply, "choices", 0, kind=dict, what=_CHAT)
    text = field(choice, "message", "content", kind=str, what=_CHAT)
    positions = field(choice, "logprobs", "content", kind=list, what=_CHAT)
    for position in positions:
        token = field(position, "token", kind=str, what=_CHAT)
        if not token.strip():
            continue
        tops = field(position, "top_logprobs", kind=list, what=_CHAT)
        if not tops:
            raise ReplyShapeError(f"malformed reply to {_CHAT}: empty top_logprobs")
        probs: dict[str, float] = {}
        for top in tops:
            logprob = field(top, "logprob", kind=(int, float), what=_CHAT)
            if isinstance(logprob, bool) or not math.isfinite(logprob) and logprob != -math.inf:
                raise ReplyShapeError(f"malformed reply to {_CHAT}: logprob {logprob!r}")
            word = field(top, "token", kind=str, what=_CHAT).strip()
            probs[word] = probs.get(word, 0.0) + math.exp(logprob)  # "unsafe" and " unsafe"
        score = probs.get("unsafe", min(probs.values()))
        return GuardScore(min(1.0, score), llama_guard_categories(text))
    raise ReplyShapeError(f"malformed reply to {_CHAT}: the guard wrote no verdict token")

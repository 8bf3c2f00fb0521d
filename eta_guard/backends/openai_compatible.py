"""The generator behind an OpenAI-compatible engine (vLLM first; SGLang where the API matches).

Requests ETA sends (``POST /v1/chat/completions``):

- vanilla answer: ``temperature=0``, streamed (``stream_options.include_usage``), the caller's
  stop strings as ``stop``;
- one best-of-N step: ``n=N``, ``top_k``, ``temperature``, ``seed``, ``max_tokens`` = the
  sentence budget, and the sentence rule as stops: ``stop_token_ids`` (token-exact, the same
  tokens that end a sentence locally) when a tokenizer is given, else the terminators as
  ``stop`` strings; ``include_stop_str_in_output`` keeps the terminator in the text;
- a continuation (prefix + accepted text): the assistant turn is the last message, with
  ``continue_final_message=true`` and ``add_generation_prompt=false``.

The best-of-N search of a text-only request continues from exact token ids instead
(``continue_from_ids``, wherever the engine offers it): ``POST /tokenize`` gives the engine's ids
of the generation prompt (the messages rendered as for the chat requests) and of the prefix
tokenized alone; each step is ``POST /v1/completions`` with ``prompt`` = those ids + the ids
sampled for the accepted sentences, and ``return_token_ids`` brings each candidate's ids back
(vLLM >= 0.10). Nothing the search accepted is tokenized again; a greedy continuation of such a
request (shallow alignment, the fallback after a failed search) is the same request streamed. Requests with images stay on the chat API (it takes no token
ids alongside images), where the engine re-tokenizes the prefix and the accepted text each step.

Tools and structured outputs pass through to the engine's own support: the vanilla request carries
the conversation's ``tools``, ``tool_choice`` and ``response_format``; the engine's ``tool_calls``
(streamed deltas, assembled) come back written as Hermes ``<tool_call>`` text after the answer's
text (:attr:`OpenAICompatibleBackend.tool_call_parser`), so ETA judges them with the words and the
caller parses them like a local answer. Search and continuation requests carry the same tools
with ``tool_choice="none"``: the prompt stays the one the vanilla answer saw, and an aligned
answer never calls a tool.

Images travel once per request as PNG data URLs with a content-hash ``uuid`` (vLLM keys its
multimodal cache on it, so successive steps of one answer do not re-encode the image).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from eta_guard.backends._http import EngineClient, HTTPSettings, ReplyShapeError, field
from eta_guard.backends.base import Completion, FinishReason, SamplingStep
from eta_guard.backends.control_markers import (
    control_strings_of,
    neutralize,
    neutralize_messages,
)
from eta_guard.backends.image_payload import png_data_url
from eta_guard.backends.served_tokenizer import load_tokenizer
from eta_guard.backends.text_session import TokenContext, TokenIdsUnavailable
from eta_guard.config import SentenceEndRule
from eta_guard.errors import BackendError, InvalidInputError
from eta_guard.prompting import ImageMean
from eta_guard.tools.specs import tool_strings

if TYPE_CHECKING:
    from eta_guard.messages import Conversation

_log = logging.getLogger(__name__)

_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"
_TOKENIZE = "/tokenize"


class OpenAICompatibleBackend:
    """A :class:`~eta_guard.backends.base.GeneratorBackend` over an OpenAI-compatible HTTP API.

    Args:
        base_url: the engine's URL (``http://host:port`` or ``http://host:port/v1``).
        model: the served model name (``--served-model-name``).
        api_key: bearer token, if the engine wants one.
        tokenizer: the served model's tokenizer (a ``transformers`` tokenizer, or a path / id
            loaded with ``AutoTokenizer``). With it, sentence ends are sent as token ids, so a
            candidate ends on exactly the tokens it ends on locally; without it, as stop strings
            (a token *containing* a terminator, e.g. ``'3.'``, may then end a sentence mid-token).
            With it too, its control tokens in message text (``<|im_end|>``, ``<image>``...)
            are broken with a zero-width space before sending, as the engine would parse them as
            real markers. Without it such text goes as it is (a warning says so).
        http: timeouts, retries and pool size.
        image_mean: the served model's image-processor mean (three floats), with which
            ``pad_images_to_square`` pads images here before sending them (the engine's processor
            would centre-crop instead). Default: read from ``tokenizer`` when it is a path / id
            whose folder holds an image-processor config, or a processor with ``image_processor``.
        send_image_uuids: send each image's content hash as ``uuid`` (vLLM >= 0.11 caches on it;
            turn off for engines that reject unknown fields).
        extra_body: more fields merged into every request (e.g. ``{"priority": 1}``).
        continue_from_ids: continue the best-of-N search of a text-only request from exact token
            ids (vLLM's ``/tokenize`` and ``/v1/completions`` with ``prompt`` as ids and
            ``return_token_ids``): the sampled ids are sent back as they were sampled, never
            re-tokenized from text. None (default): wherever the engine offers it; an engine
            without those endpoints or ids is noticed at its first search, logged once, and
            searched from text. True: required (a :class:`BackendError` otherwise). False: never.

    Example (needs a running engine; see docs/scaling.md):
        >>> backend = OpenAICompatibleBackend("http://127.0.0.1:8000", "llava-1.5-7b")  # doctest: +SKIP
    """

    #: How the tool calls in this backend's answers are written (see the module docstring).
    tool_call_parser = "hermes"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        tokenizer: Any = None,
        http: HTTPSettings | None = None,
        image_mean: Sequence[float] | None = None,
        send_image_uuids: bool = True,
        extra_body: dict[str, Any] | None = None,
        continue_from_ids: bool | None = None,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise InvalidInputError(f"model={model!r}: give the engine's served model name")
        self.client = EngineClient(base_url, api_key=api_key, settings=http)
        self.name = model
        #: What ETA knows of the served model's processor: its image mean (``pad_images_to_
        #: square`` pads client-side with it), or None.
        self.processor: ImageMean | None = (
            ImageMean.of(image_mean) if image_mean is not None else _served_image_mean(tokenizer)
        )
        self.tokenizer = load_tokenizer(tokenizer)
        self.send_image_uuids = send_image_uuids
        self.extra_body = dict(extra_body or {})
        self.continue_from_ids = continue_from_ids
        #: Why this engine cannot continue from token ids (found at its first search), or None.
        self.ids_unavailable: str | None = None
        self._stop_ids: dict[tuple[tuple[str, ...], str], list[int]] = {}
        self._add_bos = _tokenizer_adds_missing_bos(self.tokenizer)
        self._markers = control_strings_of(self.tokenizer, what=f"generator {model!r}")

    # ----- the interface -----
    async def greedy(
        self,
        conversation: Conversation,
        *,
        assistant_text: str = "",
        max_tokens: int,
        stop: Sequence[str] | None = None,
    ) -> AsyncIterator[str | Completion]:
        body = self._body(conversation, assistant_text, vanilla=not assistant_text)
        body.update(
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        if stop:
            body["stop"] = list(stop)
        parts: list[str] = []
        finish: str | None = None
        stop_reason: Any = None
        usage: dict[str, Any] | None = None
        calls: dict[int, dict[str, str]] = {}
        async for event in self.client.stream_sse(_CHAT, body):
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if isinstance(delta, str) and delta:
                    parts.append(delta)
                    yield delta
                _gather_tool_calls(calls, (choice.get("delta") or {}).get("tool_calls"))
                if choice.get("finish_reason"):
                    finish, stop_reason = choice["finish_reason"], choice.get("stop_reason")
        if calls:
            text = _calls_as_text(calls)
            text = f"\n{text}" if parts else text
            parts.append(text)
            yield text
            if finish == "tool_calls":
                finish = "stop"
        yield _streamed(parts, finish, stop_reason, usage, _CHAT)

    async def greedy_tokens(
        self, prompt_ids: Sequence[int], *, max_tokens: int, stop: Sequence[str] | None = None
    ) -> AsyncIterator[str | Completion]:
        """Greedy continuation of exactly ``prompt_ids`` (``POST /v1/completions``, streamed)."""
        body: dict[str, Any] = {**self.extra_body, "model": self.name, "prompt": list(prompt_ids)}
        body.update(
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        if stop:
            body["stop"] = list(stop)
        parts: list[str] = []
        finish: str | None = None
        stop_reason: Any = None
        usage: dict[str, Any] | None = None
        async for event in self.client.stream_sse(_COMPLETIONS, body):
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                delta = choice.get("text")
                if isinstance(delta, str) and delta:
                    parts.append(delta)
                    yield delta
                if choice.get("finish_reason"):
                    finish, stop_reason = choice["finish_reason"], choice.get("stop_reason")
        yield _streamed(parts, finish, stop_reason, usage, _COMPLETIONS)

    async def sample(
        self, conversation: Conversation, *, assistant_text: str, step: SamplingStep
    ) -> list[Completion]:
        body = self._body(conversation, assistant_text)
        body.update(self._step_fields(step))
        reply = await self.client.post_json(_CHAT, body)
        return _candidates(reply, step, _CHAT, text=("message", "content"))

    # ----- continuing from exact token ids (TokenBackend) -----
    async def token_context(
        self, conversation: Conversation, assistant_text: str
    ) -> TokenContext | None:
        """The ids a search of ``conversation`` after ``assistant_text`` starts from.

        The engine's own ids of the generation prompt (``POST /tokenize`` with the messages, as
        the chat requests render them), then ``assistant_text`` tokenized alone without special
        tokens: the reference's construction (the prefix's ids appended after the prompt's).
        None when the conversation holds images (vLLM's completions API takes token ids, but no
        images with them: the search then continues from text) or ``continue_from_ids`` is off.
        """
        if self.continue_from_ids is False or self.ids_unavailable or conversation.has_images:
            return None
        render = self._body(conversation, "")
        render.pop("tool_choice", None)  # rendering takes the tools, not the choice
        render["add_generation_prompt"] = True
        prefix = {
            "model": self.name,
            "prompt": neutralize(assistant_text, self._markers),
            "add_special_tokens": False,
        }
        try:
            prompt_reply, prefix_reply = await asyncio.gather(
                self.client.post_json(_TOKENIZE, render), self.client.post_json(_TOKENIZE, prefix)
            )
        except BackendError as e:
            if e.status not in (404, 405):
                raise
            self._ids_missing(f"the engine has no {_TOKENIZE} endpoint", e)
            return None
        ids = _token_list(prompt_reply) + (_token_list(prefix_reply) if assistant_text else [])
        max_len = prompt_reply.get("max_model_len")
        return TokenContext(
            ids=tuple(ids), max_model_len=max_len if isinstance(max_len, int) else None
        )

    async def sample_tokens(
        self, prompt_ids: Sequence[int], step: SamplingStep
    ) -> list[Completion]:
        """One best-of-N step continuing exactly ``prompt_ids`` (``POST /v1/completions``).

        Raises:
            ReplyShapeError: the engine continued other ids than those sent (its echoed
                ``prompt_token_ids`` differ) or returned a candidate without its ids.
        """
        body: dict[str, Any] = {**self.extra_body, "model": self.name, "prompt": list(prompt_ids)}
        body.update(self._step_fields(step))
        try:
            reply = await self.client.post_json(_COMPLETIONS, body)
        except BackendError as e:
            if e.status not in (404, 405):
                raise
            self._ids_missing(f"the engine has no {_COMPLETIONS} endpoint", e)
            raise TokenIdsUnavailable(str(e), status=e.status) from e
        candidates = _candidates(reply, step, _COMPLETIONS, text=("text",))
        for choice in field(reply, "choices", kind=list, what=_COMPLETIONS):
            echoed = choice.get("prompt_token_ids") if isinstance(choice, dict) else None
            if echoed is not None and list(echoed) != list(prompt_ids):
                raise ReplyShapeError(
                    f"malformed reply to {_COMPLETIONS}: the engine continued other ids than "
                    f"those sent ({len(echoed)} ids echoed for {len(prompt_ids)} sent)"
                )
        if any(c.token_ids is None for c in candidates):
            error = TokenIdsUnavailable(
                f"malformed reply to {_COMPLETIONS}: a candidate without token_ids "
                "(return_token_ids, vLLM >= 0.10)"
            )
            self._ids_missing("its completions carry no token_ids", error)
            raise error
        return candidates

    def _ids_missing(self, reason: str, error: BackendError) -> None:
        """The engine cannot continue from ids: an error when they were required, else noted
        (logged once) so that this and later searches continue from text."""
        if self.continue_from_ids:
            raise BackendError(
                f"{error}; {reason}, which continuing the search from exact token ids needs: "
                "pass continue_from_ids=None (continue from text where the engine cannot) or "
                "False",
                status=error.status,
            ) from error
        if self.ids_unavailable is None:
            self.ids_unavailable = reason
            _log.warning(
                "generator %r: %s; best-of-N searches continue from text, which the engine "
                "re-tokenizes (docs/paper-setup.md, section 6)",
                self.name,
                reason,
            )

    def _step_fields(self, step: SamplingStep) -> dict[str, Any]:
        """The sampling fields of one best-of-N step, the same on the chat and completions APIs."""
        fields: dict[str, Any] = {
            "n": step.n,
            "max_tokens": step.max_tokens,
            "temperature": step.temperature,
            "top_k": step.top_k,
            "return_token_ids": True,
            # The sentence's last token belongs to the candidate: vLLM drops the text of a stop
            # token id, as of a stop string, unless asked to keep it.
            "include_stop_str_in_output": True,
        }
        if step.seed is not None:
            fields["seed"] = step.seed
        stop_ids = self.sentence_end_token_ids(step.terminators, step.rule)
        if stop_ids is not None:
            fields["stop_token_ids"] = stop_ids
        else:
            fields["stop"] = list(step.terminators)
        return fields

    async def aclose(self) -> None:
        await self.client.aclose()

    # ----- helpers -----
    def sentence_end_token_ids(
        self, terminators: tuple[str, ...], rule: SentenceEndRule = "exact"
    ) -> list[int] | None:
        """The ids of tokens that end a sentence under the local rule; None without a tokenizer."""
        if self.tokenizer is None:
            return None
        key = (tuple(terminators), rule)
        if key not in self._stop_ids:
            from eta_guard.decoding.stopping import vocabulary_masks

            ends, _ = vocabulary_masks(self.tokenizer, key[0], rule)
            ids = ends.nonzero().flatten().tolist()
            if not ids:
                raise InvalidInputError(
                    f"no token of the tokenizer ends a sentence under sentence_terminators="
                    f"{key[0]!r}, sentence_end_rule={rule!r}; sentences would run to the budget. "
                    "Use other terminators or sentence_end_rule='contains'"
                )
            self._stop_ids[key] = ids
        return self._stop_ids[key]

    def _body(
        self, conversation: Conversation, assistant_text: str, *, vanilla: bool = False
    ) -> dict[str, Any]:
        messages = openai_messages(conversation, send_uuids=self.send_image_uuids)
        # The engine parses special tokens in message text (the local adapter keeps them text):
        # forged turn or image markers are broken before anything is sent.
        neutralize_messages(messages, self._markers)
        for value in tool_strings(messages, getattr(conversation, "tools", None) or []):
            if any(marker in value for marker in self._markers):
                raise InvalidInputError(
                    "a tool definition or a tool call's arguments hold a control marker of the "
                    f"served model's tokenizer ({value[:60]!r}); remove it"
                )
        assistant_text = neutralize(assistant_text, self._markers)
        body: dict[str, Any] = {**self.extra_body, "model": self.name, "messages": messages}
        tools = getattr(conversation, "tools", None)
        if tools:
            body["tools"] = tools
            body["tool_choice"] = conversation.tool_choice if vanilla else "none"
        response_format = getattr(conversation, "response_format", None)
        if vanilla and response_format:
            body["response_format"] = response_format
        if self._add_bos:
            # The template writes no BOS but the tokenizer adds one: the local adapter's prompt
            # has it, and vLLM's chat API leaves special tokens to the template unless told.
            body.setdefault("add_special_tokens", True)
        if assistant_text:
            messages.append({"role": "assistant", "content": assistant_text})
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body


def _streamed(
    parts: list[str], finish: str | None, stop_reason: Any, usage: Any, what: str
) -> Completion:
    """The :class:`Completion` a streamed answer ends with (its text, finish and usage chunk)."""
    if finish is None:
        raise ReplyShapeError(f"malformed stream from {what}: no choice had a finish_reason")
    if usage is None:
        raise ReplyShapeError(
            f"malformed stream from {what}: no usage chunk (stream_options.include_usage)"
        )
    return Completion(
        text="".join(parts),
        num_tokens=int(field(usage, "completion_tokens", kind=int, what=what)),
        finish_reason=_finish(finish),
        ended=finish == "stop" and stop_reason is None,
        prompt_tokens=int(field(usage, "prompt_tokens", kind=int, what=what)),
    )


def _candidates(
    reply: dict[str, Any], step: SamplingStep, what: str, *, text: tuple[str, ...]
) -> list[Completion]:
    """The ``step.n`` candidates of a chat or completions reply, in index order."""
    choices = field(reply, "choices", kind=list, what=what)
    usage = field(reply, "usage", kind=dict, what=what)
    prompt_tokens = int(field(usage, "prompt_tokens", kind=int, what=what))
    if len(choices) != step.n:
        raise ReplyShapeError(f"malformed reply to {what}: {len(choices)} choices for n={step.n}")
    share = max(1, round(int(usage.get("completion_tokens") or 0) / step.n))
    out: list[Completion | None] = [None] * step.n
    for i, choice in enumerate(choices):
        index = choice.get("index", i) if isinstance(choice, dict) else i
        if not isinstance(index, int) or not 0 <= index < step.n or out[index] is not None:
            raise ReplyShapeError(f"malformed reply to {what}: bad choice index {index!r}")
        content = field(choice, *text, kind=(str, type(None)), what=what) or ""
        finish = field(choice, "finish_reason", kind=str, what=what)
        ids = choice.get("token_ids")
        if ids is not None and not (isinstance(ids, list) and all(_is_id(t) for t in ids)):
            raise ReplyShapeError(f"malformed reply to {what}: token_ids is not a list of ids")
        out[index] = Completion(
            text=content,
            # vLLM returns the ids; other engines only the total, shared out evenly.
            num_tokens=len(ids) if ids is not None else share,
            finish_reason=_finish(finish),
            ended=finish == "stop" and choice.get("stop_reason") is None,
            prompt_tokens=prompt_tokens,
            token_ids=tuple(ids) if ids is not None else None,
        )
    return [c for c in out if c is not None]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_list(reply: dict[str, Any]) -> list[int]:
    tokens = field(reply, "tokens", kind=list, what=_TOKENIZE)
    if not all(_is_id(t) for t in tokens):
        raise ReplyShapeError(f"malformed reply to {_TOKENIZE}: tokens is not a list of ids")
    return tokens


def openai_messages(conversation: Conversation, *, send_uuids: bool = True) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat messages, each image a PNG data URL (with its hash as uuid)."""
    images = iter(_encoded_images(conversation))
    messages = []
    for message in conversation.messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    url, digest = next(images)
                    item: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
                    if send_uuids:
                        item["uuid"] = digest
                    parts.append(item)
                else:
                    parts.append({"type": "text", "text": part.get("text", "")})
            content = parts
        item = {"role": message["role"], "content": content}
        if message.get("tool_calls"):
            item["tool_calls"] = [_openai_call(c, i) for i, c in enumerate(message["tool_calls"])]
        if message.get("tool_call_id"):
            item["tool_call_id"] = message["tool_call_id"]
        messages.append(item)
    return messages


def _openai_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    """An HF-form call (arguments a dict) as OpenAI's (arguments a JSON string)."""
    function = call["function"]
    return {
        "id": call.get("id") or f"call_{index}",
        "type": "function",
        "function": {"name": function["name"], "arguments": json.dumps(function["arguments"])},
    }


def _gather_tool_calls(calls: dict[int, dict[str, str]], deltas: Any) -> None:
    """Fold streamed ``tool_calls`` deltas (name once, arguments in pieces) into ``calls``."""
    if not isinstance(deltas, list):
        return
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index", len(calls))
        call = calls.setdefault(
            index if isinstance(index, int) else len(calls), {"name": "", "arguments": ""}
        )
        function = delta.get("function") or {}
        if isinstance(function.get("name"), str):
            call["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            call["arguments"] += function["arguments"]


def _calls_as_text(calls: dict[int, dict[str, str]]) -> str:
    """The engine's calls written as Hermes ``<tool_call>`` blocks (what the parser reads).

    Arguments that are no JSON object are written as they came, so the parser reports the call
    as invalid rather than this backend dropping it.
    """
    blocks = []
    for _, call in sorted(calls.items()):
        try:
            arguments = json.loads(call["arguments"] or "{}")
        except json.JSONDecodeError:
            arguments = None
        if isinstance(arguments, dict):
            payload = json.dumps({"name": call["name"], "arguments": arguments}, ensure_ascii=False)
        else:
            payload = f'{{"name": {json.dumps(call["name"])}, "arguments": {call["arguments"]}}}'
        blocks.append(f"<tool_call>\n{payload}\n</tool_call>")
    return "\n".join(blocks)


def _encoded_images(conversation: Conversation) -> list[tuple[str, str]]:
    """``(data URL, sha256)`` per image, computed once per conversation object."""
    cached = getattr(conversation, "_eta_encoded_images", None)
    if cached is None:
        cached = [png_data_url(image) for image in conversation.images]
        conversation._eta_encoded_images = cached  # type: ignore[attr-defined]
    return cached


def _finish(reason: str) -> FinishReason:
    if reason in ("stop", "eos", "stop_sequence", "tool_calls"):
        return "stop"
    if reason in ("abort", "error"):
        raise BackendError(f"the engine gave up on the request (finish_reason={reason!r})")
    if reason == "length":
        return "length"
    raise ReplyShapeError(f"malformed reply to {_CHAT}: unknown finish_reason {reason!r}")


def _tokenizer_adds_missing_bos(tokenizer: Any) -> bool:
    """Whether the local rule (``VLMAdapter.prepare``) puts a BOS the chat template does not write."""
    bos = getattr(tokenizer, "bos_token", None)
    if tokenizer is None or not bos or not getattr(tokenizer, "chat_template", None):
        return False
    probe = [{"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text)["input_ids"]
    except Exception:  # noqa: BLE001 - a template that cannot render a probe: keep the engine's way
        return False
    return not text.startswith(bos) and bool(ids) and ids[0] == tokenizer.bos_token_id


def _served_image_mean(source: Any) -> ImageMean | None:
    """The image mean of the served model's processor: ``source`` a processor, or a path / id
    whose folder holds an image-processor config; None when there is none (a text model)."""
    if source is None:
        return None
    if not isinstance(source, str):
        mean = getattr(getattr(source, "image_processor", None), "image_mean", None)
        return ImageMean.of(mean) if mean is not None else None
    from transformers import AutoImageProcessor

    try:
        mean = getattr(AutoImageProcessor.from_pretrained(source), "image_mean", None)
    except (OSError, ValueError, KeyError, ImportError):  # no image processor in that folder
        return None
    return ImageMean.of(mean) if mean is not None and len(mean) == 3 else None


__all__ = ["OpenAICompatibleBackend", "openai_messages"]

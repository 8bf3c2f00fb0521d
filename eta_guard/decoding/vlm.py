"""``VLMAdapter``: any Hugging Face image-text-to-text model behind one small decoding surface.

It renders conversations with the processor's chat template, guards the context length, runs
greedy decoding (plain or streamed) and decodes continuations exactly as they read in context.
The sentence-level search (:mod:`eta_guard.decoding.best_of_n`) builds on the same adapter.
"""

from __future__ import annotations

import concurrent.futures
import copy
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    DynamicCache,
    GenerationConfig,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from eta_guard._device import load_pretrained
from eta_guard.decoding.content_tokens import (
    RenderedPrompt,
    append_tokens,
    control_strings,
    fill_holes,
    forged_markers,
    hole_text,
    plain_text_ids,
    render_with_spans,
)
from eta_guard.decoding.image_segments import SEGMENTED_FAMILIES, segment_ids, splice_segments
from eta_guard.decoding.stopping import (
    AnyEvent,
    CancelCriteria,
    PromptSnapshot,
    cut_at_stop,
    stop_holdback,
)
from eta_guard.errors import InvalidInputError
from eta_guard.model_thread import model_thread
from eta_guard.tools.constraints import decoding_constraint
from eta_guard.tools.parsers import parser_for_model_type
from eta_guard.tools.specs import tool_strings

FinishReason = Literal["stop", "length"]

#: Logit-shaping settings a checkpoint may ship that would change ETA's decoding; they are reset
#: so that decoding is exactly greedy (vanilla) or exactly top-k/temperature sampling (search).
_NEUTRAL_DECODING: dict[str, Any] = {
    "num_beams": 1,
    "top_p": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "cache_implementation": None,
}


@dataclass
class PreparedPrompt:
    """A rendered, tokenized prompt on the model's device.

    Attributes:
        input_ids: ``[1, L]`` prompt token ids (the assistant prefix included).
        attention_mask: ``[1, L]`` ones.
        model_inputs: everything the processor returned (``input_ids``, ``attention_mask``,
            ``pixel_values``, ...), ready for ``model.generate(**model_inputs)``.
        num_prompt_tokens: ``L``.
        text: the rendered prompt text (chat template + assistant prefix).
        assistant_prefix: the text that follows the generation prompt.
        num_images: images given to the processor.
        prefix_token_ids: ``assistant_prefix`` tokenized on its own (no special tokens), the
            last ids of ``input_ids``.
        response_format: the constraint on the greedy answer (``None``: free text): the
            conversation's ``response_format``, or a forced tool call in the family's format
            (:func:`eta_guard.tools.constraints.decoding_constraint`); an assistant prefix
            (ETA's alignment) lifts it.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    model_inputs: dict[str, Any]
    num_prompt_tokens: int
    text: str
    assistant_prefix: str = ""
    num_images: int = 0
    prefix_token_ids: list[int] = field(default_factory=list)
    response_format: dict[str, Any] | None = None


@dataclass
class GreedyOutput:
    """The result of greedy decoding.

    Attributes:
        token_ids: the new tokens (EOS included when generation ended on it).
        text: the new tokens decoded in context, special tokens skipped, cut before the first
            stop string.
        finish_reason: ``"stop"`` (EOS, stop string) or ``"length"`` (token budget).
        cache: the KV cache ``generate`` returned; it covers the first ``cache.get_seq_length()``
            ids of ``sequence_ids`` (all but the last). Reusable by the best-of-N search.
        num_prompt_tokens: prompt length.
        sequence_ids: prompt ids followed by ``token_ids``.
    """

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    cache: Any
    num_prompt_tokens: int
    sequence_ids: list[int] = field(default_factory=list)


class VLMAdapter:
    """A vision-language model and its processor, with the decoding steps ETA needs.

    Args:
        model: an ``AutoModelForImageTextToText`` model (put in eval mode here).
        processor: its ``AutoProcessor`` (with a chat template).
        name: a display name (defaults to the model's ``name_or_path``).

    Example (offline, on a tiny random checkpoint):
        >>> from eta_guard.messages import normalize_messages
        >>> from eta_guard.testing import build_tiny_checkpoints, make_test_image
        >>> ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
        >>> vlm = VLMAdapter.from_pretrained(ckpt.vlm, device="cpu")
        >>> conversation = normalize_messages([{"role": "user", "content": [
        ...     {"type": "image", "image": make_test_image("red")},
        ...     {"type": "text", "text": "What is in the picture?"}]}])
        >>> prepared = vlm.prepare(conversation)
        >>> answer = vlm.generate_greedy(prepared, max_new_tokens=16)
        >>> answer.finish_reason in ("stop", "length"), len(answer.token_ids) <= 16
        (True, True)
        >>> "".join(vlm.stream_greedy(prepared, max_new_tokens=16)) == answer.text
        True
    """

    def __init__(self, model: Any, processor: Any, *, name: str | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        #: Held around every use of the model: it keeps per-call state (KV caches, Qwen2-VL's
        #: rope deltas), so every ETA built on this adapter shares this one lock.
        self.lock = threading.RLock()
        self.eos_token_ids = _eos_token_ids(model, self.tokenizer)
        self.pad_token_id = _pad_token_id(model, self.tokenizer, self.eos_token_ids)
        self.context_length = _context_length(model)
        # cache -> (the multimodal inputs it encoded, the model's position state then): token
        # ids alone cannot tell two images apart, and Qwen2-VL-style models keep rope deltas
        # between calls that a continuation of the cache needs.
        self._cache_origin: weakref.WeakKeyDictionary[Any, tuple[dict[str, Any], dict[str, Any]]]
        self._cache_origin = weakref.WeakKeyDictionary()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
    ) -> VLMAdapter:
        """Load a model with ``AutoModelForImageTextToText`` and its ``AutoProcessor``.

        Args:
            name_or_path: a Hub id (resolved through the local cache) or a local folder.
            device: where to put the model (``None``/``"auto"``: CUDA if available, else CPU).
            dtype: model dtype (``None``: transformers' default, the checkpoint's own).
            local_files_only: never touch the network.
            trust_remote_code: allow custom model code from the checkpoint.
            model_kwargs: extra arguments for ``AutoModelForImageTextToText.from_pretrained``.
            processor_kwargs: extra arguments for ``AutoProcessor.from_pretrained``.

        Raises:
            InvalidInputError: bad ``device``/``dtype``, or the checkpoint cannot be loaded.
        """
        model, processor = load_pretrained(
            "VLM",
            name_or_path,
            AutoModelForImageTextToText,
            AutoProcessor,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            processor_kwargs=processor_kwargs,
        )
        return cls(model, processor, name=str(name_or_path))

    # ----- properties -----
    @property
    def tokenizer(self) -> Any:
        """The text tokenizer inside the processor."""
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        """Where the model (its input embeddings) lives."""
        return self.model.device

    # ----- prompts -----
    def prepare(self, conversation: Any, *, assistant_prefix: str = "") -> PreparedPrompt:
        """Render a conversation with the chat template and run the processor.

        The prompt's ids are built as the reference builds them: the generation prompt's ids, then
        ``assistant_prefix`` tokenized on its own (no special tokens), never the prefix glued to
        the rendered text (SentencePiece would then read ``ASSISTANT:As`` instead of ``▁As``).
        Message text is never control: chat-template markers or image placeholders written in a
        message reach the model as plain text (see :mod:`eta_guard.decoding.content_tokens`).

        Args:
            conversation: an :class:`eta_guard.messages.Conversation` (``.messages`` in HF
                chat-template form, ``.images`` in order of their placeholders).
            assistant_prefix: text the assistant turn starts with (ETA's shallow alignment).

        Returns:
            The prompt as tensors on the model's device; ``text`` is the rendered prompt followed
            by ``assistant_prefix``.

        Raises:
            InvalidInputError: the template cannot render the conversation, message text holds a
                marker that cannot be encoded as plain text, or the prompt leaves no room for a
                single new token in the model's context.
        """
        images = list(getattr(conversation, "images", None) or [])
        messages = list(conversation.messages)
        tools = list(conversation.tools) if getattr(conversation, "offers_tools", False) else []
        render = (lambda msgs: self._render(msgs, tools=tools)) if tools else self._render
        if tools:
            self._check_tools_rendered(messages, tools)
        rendered = render_with_spans(render, messages)
        text = rendered.text + assistant_prefix
        self._refuse_far_too_long(text)
        batch = self._tokenize(rendered, messages, images, tools)
        model_inputs = {k: _to_device(v, self.device, self.model.dtype) for k, v in batch.items()}
        model_inputs.setdefault("attention_mask", torch.ones_like(model_inputs["input_ids"]))
        prefix_ids = (
            plain_text_ids(self.tokenizer, assistant_prefix, self._control_ids())
            if assistant_prefix
            else []
        )
        model_inputs = append_tokens(model_inputs, prefix_ids)
        input_ids = model_inputs["input_ids"]
        length = int(input_ids.shape[1])
        if length + 1 > self.context_length:
            raise InvalidInputError(
                f"prompt has {length} tokens but the model's context is {self.context_length}; "
                "shorten the conversation (fewer turns, shorter text, fewer or smaller images)"
            )
        return PreparedPrompt(
            input_ids=input_ids,
            attention_mask=model_inputs["attention_mask"],
            model_inputs=model_inputs,
            num_prompt_tokens=length,
            text=text,
            assistant_prefix=assistant_prefix,
            num_images=len(images),
            prefix_token_ids=list(prefix_ids),
            response_format=(
                None
                if assistant_prefix
                else decoding_constraint(
                    conversation,
                    parser_for_model_type(getattr(self.model.config, "model_type", None)),
                )
            ),
        )

    def _tokenize(
        self,
        rendered: RenderedPrompt,
        messages: list[dict[str, Any]],
        images: list[Any],
        tools: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Run the processor on the rendered prompt, with message-borne markers kept as text."""
        text = rendered.text
        markers = control_strings(self.processor, self.tokenizer)
        # Tool definitions and earlier calls' arguments are rendered by the template, outside
        # the text parts whose spans are known: a marker there is refused, never made control.
        for value in tool_strings(messages, tools or []):
            if any(marker in value for marker in markers):
                raise InvalidInputError(
                    "a tool definition or a tool call's arguments hold a control marker of the "
                    f"chat template of {self.name!r} ({value[:60]!r}); remove it"
                )
        if rendered.content_spans is None:
            # The template rewrote message text, so it cannot be told from template text: refuse
            # only when a message holds a marker (otherwise nothing in it can act as control).
            forged: list[tuple[int, int]] = []
            if any(marker in t for t in _texts(messages) for marker in markers):
                raise InvalidInputError(
                    "the VLM's chat template rewrites message text, so control "
                    "markers in a message cannot be kept as plain text; remove them"
                )
        else:
            forged = forged_markers(text, rendered.content_spans, markers)
        hole_id, pieces = None, []
        if forged:
            pieces = [text[a:b] for a, b in forged]
            text, _, hole_id = hole_text(
                text,
                forged,
                tokenizer=self.tokenizer,
                processor=self.processor,
                reserved_ids=self._media_ids(),
            )
        tokenize_kwargs: dict[str, Any] = {"return_tensors": "pt"}
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and text.startswith(bos):  # the template wrote BOS itself: do not add a second one
            tokenize_kwargs["add_special_tokens"] = False
        try:
            batch = dict(self.processor(text=[text], images=images or None, **tokenize_kwargs))
        except (ValueError, TypeError) as e:
            # Neither the checkpoint's path nor the inner text: this message may reach a client
            # (a server's 400). The cause stays chained for the operator.
            raise InvalidInputError(
                f"the VLM's processor refused the prompt with {len(images)} image(s) "
                f"({type(e).__name__})"
            ) from e
        placeholder = getattr(self.processor, "image_token", None)
        image_id = self._image_token_id()
        family = getattr(self.model.config, "model_type", None)
        if images and family in SEGMENTED_FAMILIES and placeholder and image_id is not None:
            # The family's own code tokenizes the text between images segment by segment.
            add_bos = tokenize_kwargs.get("add_special_tokens", True)
            segments = segment_ids(self.tokenizer, text, placeholder, add_bos=add_bos)
            batch = splice_segments(batch, image_id, segments)
        if hole_id is not None:
            control = self._control_ids()
            batch = fill_holes(
                batch, hole_id, [plain_text_ids(self.tokenizer, p, control) for p in pieces]
            )
        return batch

    def _control_ids(self) -> set[int]:
        """Ids that must never come from message text: special tokens and image/video slots."""
        ids = {int(i) for i in getattr(self.tokenizer, "all_special_ids", None) or []}
        return ids | self._media_ids()

    def _image_token_id(self) -> int | None:
        """The model's image placeholder id, if it has one."""
        for name in ("image_token_id", "image_token_index"):
            value = getattr(self.model.config, name, None)
            if isinstance(value, int):
                return value
        return None

    def _media_ids(self) -> set[int]:
        """The model's image / video placeholder ids."""
        names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        values = (getattr(self.model.config, name, None) for name in names)
        return {int(v) for v in values if isinstance(v, int)}

    def _refuse_far_too_long(self, text: str) -> None:
        """Refuse a prompt far beyond the context from its beginning alone.

        Tokenizing megabytes takes seconds, and bad input must be refused fast. Text cut at the
        end of a word tokenizes to no more tokens than the same text inside the whole prompt
        (tokenizers split at whitespace first; a margin covers the rest), so when that cut
        already overflows the context, so does the prompt. Shorter prompts are measured exactly
        by the processor.
        """
        window = _FAR_TOO_LONG_CHARS_PER_TOKEN * self.context_length
        if len(text) <= window:
            return
        cut = next(
            (
                i
                for i in range(window, window // 2, -1)
                if text[i].isspace() and not text[i - 1].isspace()
            ),
            None,
        )
        if cut is None:  # no word boundary to cut at: let the processor measure it
            return
        count = len(self.tokenizer(text[:cut], add_special_tokens=False)["input_ids"])
        if count - _FAR_TOO_LONG_MARGIN + 1 > self.context_length:
            raise InvalidInputError(
                f"prompt has at least {count - _FAR_TOO_LONG_MARGIN} tokens but the model's "
                f"context is {self.context_length}; shorten the conversation (fewer turns, "
                "shorter text, fewer or smaller images)"
            )

    def _check_tools_rendered(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> None:
        """Refuse tools the chat template ignores (the model would never see them)."""
        if self._render(messages) == self._render(messages, tools=tools):
            raise InvalidInputError(
                f"the chat template of {self.name!r} does not render tools, so the model cannot "
                "call them (e.g. SmolVLM's, Qwen2-VL's and Qwen2.5-VL's processor templates); "
                "give it a template that does: VLMAdapter.from_pretrained(..., "
                "processor_kwargs={'chat_template': ...}), e.g. "
                "eta_guard.tools.templates.QWEN_VL_HERMES_TOOL_TEMPLATE (see docs/agents.md)"
            )

    def _render(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The chat-template text; a template that rejects system turns gets the system text folded."""
        from jinja2 import TemplateError

        extra: dict[str, Any] = {"tools": tools} if tools else {}
        render = lambda msgs: self.processor.apply_chat_template(  # noqa: E731
            msgs, add_generation_prompt=True, tokenize=False, **extra
        )
        if not getattr(self.processor, "chat_template", None):
            raise InvalidInputError(
                "the VLM's processor has no chat template; set one with "
                "VLMAdapter.from_pretrained(..., processor_kwargs={'chat_template': '<jinja>'}) "
                "or vlm.processor.chat_template = '<jinja>'"
            )
        try:
            return render(messages)
        except TemplateError as first:
            if not any(m.get("role") == "system" for m in messages):
                raise InvalidInputError(_template_refusal(first)) from first
            from eta_guard.messages import fold_system_message

            try:
                return render(fold_system_message(messages))
            except TemplateError as e:
                raise InvalidInputError(_template_refusal(e)) from e

    def max_new_tokens_for(self, prepared: PreparedPrompt, max_new_tokens: int) -> int:
        """``max_new_tokens`` capped by the room left in the model's context."""
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens={max_new_tokens!r}: must be >= 1")
        return max(1, min(max_new_tokens, self.context_length - prepared.num_prompt_tokens))

    # ----- decoding -----
    def generation_config(self, *, max_new_tokens: int, **overrides: Any) -> GenerationConfig:
        """A generation config with ETA's decoding settings (greedy unless ``do_sample=True``)."""
        values = {
            **_NEUTRAL_DECODING,
            "do_sample": False,
            "temperature": 1.0,
            "top_k": 50,  # transformers' neutral default: unused by greedy, silences its warning
            "eos_token_id": self.eos_token_ids or None,
            "pad_token_id": self.pad_token_id,
            "max_new_tokens": max_new_tokens,
            "return_dict_in_generate": True,
            **overrides,
        }
        return GenerationConfig(**values)

    def new_cache(self) -> DynamicCache:
        """An empty dynamic KV cache for this model (branchable: repeat, select, crop).

        Sliding-window layers record their past so that ``crop`` can roll them back once the
        window is full (they are trimmed back to the window at each crop).
        """
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        if any(cache.is_sliding):
            cache.activate_past_recording()
        return cache

    def generate_greedy(
        self,
        prepared: PreparedPrompt,
        *,
        max_new_tokens: int,
        stop: Sequence[str] | None = None,
        streamer: BaseStreamer | None = None,
        cancel: threading.Event | AnyEvent | None = None,
        on_prompt_cached: Callable[[Any], None] | None = None,
    ) -> GreedyOutput:
        """Greedy decoding of the answer, whatever the checkpoint's generation config says.

        Args:
            prepared: the prompt from :meth:`prepare`.
            max_new_tokens: token budget (capped by the context length).
            stop: strings that end the answer (excluded from ``text``).
            streamer: receives token ids as they are produced (transformers streamer protocol).
            cancel: when set, generation stops at the next token.
            on_prompt_cached: called once, right after the prompt's prefill, with a copy of the
                KV cache that covers exactly the prompt (e.g. for a search started alongside).
        """
        max_new = self.max_new_tokens_for(prepared, max_new_tokens)
        stop = [s for s in (stop or []) if s]
        config = self.generation_config(max_new_tokens=max_new, stop_strings=stop or None)
        criteria = StoppingCriteriaList([CancelCriteria(cancel)] if cancel is not None else [])
        processors = (
            [self.json_constraint().logits_processor(prepared.response_format)]
            if prepared.response_format
            else None
        )
        cache: Any = self.new_cache()
        if on_prompt_cached is not None:
            criteria.append(
                PromptSnapshot(lambda: self._copy_cache(cache, prepared), on_prompt_cached)
            )
        with torch.inference_mode():
            out = self.model.generate(
                **prepared.model_inputs,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=criteria,
                streamer=streamer,
                tokenizer=self.tokenizer,
                cache=cache,
            )
        new_ids = out.sequences[0, prepared.num_prompt_tokens :].tolist()
        cache = getattr(out, "cache", None)
        if cache is None:  # outputs of older transformers releases
            cache = getattr(out, "past_key_values", None)
        if cache is not None:
            self.remember_inputs(cache, prepared)
        text, stopped = cut_at_stop(self.decode_continuation(prepared.input_ids[0], new_ids), stop)
        ended = (
            stopped or bool(new_ids and new_ids[-1] in self.eos_token_ids) or len(new_ids) < max_new
        )
        return GreedyOutput(
            token_ids=new_ids,
            text=text,
            finish_reason="stop" if ended else "length",
            cache=cache,
            num_prompt_tokens=prepared.num_prompt_tokens,
            sequence_ids=prepared.input_ids[0].tolist() + new_ids,
        )

    def json_constraint(self) -> Any:
        """The adapter's :class:`~eta_guard.decoding.constrained.JSONConstraint` (built once)."""
        constraint = getattr(self, "_json_constraint", None)
        if constraint is None:
            from eta_guard.decoding.constrained import JSONConstraint

            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            constraint = JSONConstraint(self.tokenizer, vocab, self.eos_token_ids)
            self._json_constraint = constraint
        return constraint

    def _copy_cache(self, cache: Any, prepared: PreparedPrompt) -> Any:
        """An independent copy of ``cache`` that remembers ``prepared``'s inputs."""
        copied = copy.deepcopy(cache)
        self.remember_inputs(copied, prepared)
        return copied

    def remember_inputs(self, cache: Any, prepared: PreparedPrompt) -> None:
        """Record what ``cache`` encoded: the prompt's images and the model's position state."""
        self._cache_origin[cache] = (
            multimodal_inputs(prepared.model_inputs),
            _position_state(self.model),
        )

    def encoded_same_inputs(self, cache: Any, prepared: PreparedPrompt) -> bool:
        """Whether ``cache`` came from this adapter with the same images as ``prepared``."""
        origin = self._origin(cache)
        ours = multimodal_inputs(prepared.model_inputs)
        if origin is None or origin[0].keys() != ours.keys():
            return False
        return all(_same_value(origin[0][k], ours[k]) for k in ours)

    def restore_position_state(self, cache: Any) -> None:
        """Put back the position state (e.g. Qwen2-VL's ``rope_deltas``) recorded with ``cache``.

        Such models compute positions of new tokens from state stored at prefill time, which a
        later call with other images overwrites; continuing an older cache needs its own.
        """
        origin = self._origin(cache)
        modules = dict(self.model.named_modules())
        for name, value in (origin[1] if origin else {}).items():
            modules[name].rope_deltas = value

    def _origin(self, cache: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        try:
            return self._cache_origin.get(cache)
        except TypeError:  # not weak-referenceable: unknown origin
            return None

    def stream_greedy(
        self,
        prepared: PreparedPrompt,
        *,
        max_new_tokens: int,
        stop: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> GreedyStream:
        """Greedy decoding that yields text deltas as tokens are produced.

        The deltas concatenate to exactly ``generate_greedy(...).text``; after the iterator is
        exhausted, ``.output`` holds the :class:`GreedyOutput`. ``kwargs``: ``cancel`` and
        ``on_prompt_cached`` of :meth:`generate_greedy`.
        """
        return GreedyStream(self, prepared, max_new_tokens=max_new_tokens, stop=stop, **kwargs)

    def decode_continuation(
        self, context_ids: Sequence[int] | torch.Tensor, new_ids: Sequence[int]
    ) -> str:
        """The text of ``new_ids`` as it reads after ``context_ids`` (see :func:`decode_continuation`)."""
        return decode_continuation(self.tokenizer, context_ids, new_ids)


def decode_continuation(
    tokenizer: Any, context_ids: Sequence[int] | torch.Tensor, new_ids: Sequence[int]
) -> str:
    """The text of ``new_ids`` as it reads after ``context_ids`` (special tokens skipped).

    SentencePiece-style tokenizers drop a leading space when a continuation is decoded on its
    own, so the continuation is decoded after a lead of context tokens whose text is then removed.
    The lead grows past tokens that end mid-character (byte-level pieces).
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    new = [int(i) for i in new_ids if int(i) not in special]
    if not new:
        return ""
    tail = context_ids[-16:].tolist() if torch.is_tensor(context_ids) else list(context_ids[-16:])
    context = [int(i) for i in tail if int(i) not in special]
    decode = lambda ids: tokenizer.decode(  # noqa: E731
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    for k in range(1, min(4, len(context)) + 1):
        # A lead ending mid-character contributes only its complete characters: the rest of the
        # character is completed by ``new`` and belongs to the continuation.
        lead = decode(context[-k:]).rstrip("\ufffd")
        full = decode(context[-k:] + new)
        if lead and full.startswith(lead):
            return full[len(lead) :]
    return decode(new)


class _QueueStreamer(BaseStreamer):
    """Hands token ids produced by ``generate`` to the consuming thread (skips the prompt)."""

    def __init__(self, sink: queue.Queue) -> None:
        self.sink = sink
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        self.sink.put(("ids", value.reshape(-1).tolist()))

    def end(self) -> None:
        pass


class GreedyStream:
    """Iterate to receive text deltas of a greedy answer; ``.output`` is set once exhausted.

    Generation runs on the model thread (:mod:`eta_guard.model_thread`: no second-thread OpenMP
    penalty), or in a worker thread when the consumer is the model thread itself; an error there
    is re-raised in the consumer. Text past a
    stop string is never yielded: only the shortest tail that could still start a stop string
    (or that ends mid-character) is held back until the next token settles it.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        prepared: PreparedPrompt,
        *,
        max_new_tokens: int,
        stop: Sequence[str] | None,
        cancel: threading.Event | None = None,
        on_prompt_cached: Callable[[Any], None] | None = None,
    ) -> None:
        self.adapter, self.prepared = adapter, prepared
        self.stop = [s for s in (stop or []) if s]
        self.output: GreedyOutput | None = None
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._outer_cancel, self._on_prompt_cached = cancel, on_prompt_cached
        self._max_new_tokens = max_new_tokens
        self._worker: threading.Thread | concurrent.futures.Future | None = None
        self._started = False

    def _work(self, max_new_tokens: int) -> None:
        try:
            output = self.adapter.generate_greedy(
                self.prepared,
                max_new_tokens=max_new_tokens,
                stop=self.stop,
                streamer=_QueueStreamer(self._queue),
                cancel=AnyEvent(self._cancel, self._outer_cancel),
                on_prompt_cached=self._on_prompt_cached,
            )
            self._queue.put(("done", output))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread
            self._queue.put(("error", e))

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a GreedyStream can be iterated only once")
        self._started = True
        runner = model_thread(self.adapter.device)
        if runner.is_current():  # waiting on our own queue would deadlock
            self._worker = threading.Thread(
                target=self._work, args=(self._max_new_tokens,), daemon=True
            )
            self._worker.start()
        else:
            self._worker = runner.submit(self._work, self._max_new_tokens)
        context = self.prepared.input_ids[0]
        ids: list[int] = []
        emitted = ""
        try:
            while True:
                kind, payload = self._queue.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    self.output = payload
                    if payload.text.startswith(emitted) and len(payload.text) > len(emitted):
                        yield payload.text[len(emitted) :]
                    return
                ids.extend(payload)
                text, stopped = cut_at_stop(
                    self.adapter.decode_continuation(context, ids), self.stop
                )
                safe = text if stopped else text[: len(text) - stop_holdback(text, self.stop)]
                if len(safe) > len(emitted) and safe.startswith(emitted):
                    delta, emitted = safe[len(emitted) :], safe
                    yield delta
        finally:
            self.close()

    @property
    def running(self) -> bool:
        """Whether generation is still running (or queued) for this stream."""
        if isinstance(self._worker, threading.Thread):
            return self._worker.is_alive()
        return self._worker is not None and not self._worker.done()

    def close(self) -> None:
        """Stop generation early (if still running) and wait for the worker."""
        self._cancel.set()
        if isinstance(self._worker, threading.Thread):
            self._worker.join()
        elif self._worker is not None and not self._worker.cancel():  # started: wait for it
            concurrent.futures.wait([self._worker])


#: A prompt longer than this many characters per context token is first checked on its beginning.
_FAR_TOO_LONG_CHARS_PER_TOKEN = 16
#: Tokens the beginning may gain by being cut out of the whole prompt (tokenizers that merge
#: across spaces).
_FAR_TOO_LONG_MARGIN = 32

#: Processor outputs that carry image content (not placeholder tokens); a cache is only reusable
#: for a prompt whose values of these are equal.
MULTIMODAL_KEYS = (
    "pixel_values",
    "pixel_attention_mask",
    "pixel_mask",
    "pixel_values_videos",
    "image_sizes",
    "image_grid_thw",
    "video_grid_thw",
)


def multimodal_inputs(model_inputs: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``model_inputs`` that carry image or video content."""
    return {k: v for k, v in model_inputs.items() if k in MULTIMODAL_KEYS and v is not None}


def _position_state(model: Any) -> dict[str, Any]:
    """``rope_deltas`` held by the model's modules (multimodal RoPE models), by module name."""
    return {
        name: module.rope_deltas
        for name, module in model.named_modules()
        if getattr(module, "rope_deltas", None) is not None
    }


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    """Every text part of HF-form messages (str content counts as one part)."""
    out: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [str(p.get("text", "")) for p in content if isinstance(p, dict)]
    return out


def _same_value(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not torch.is_tensor(value):
        return value
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = _as_list(getattr(model.generation_config, "eos_token_id", None))
    for extra in _as_list(getattr(tokenizer, "eos_token_id", None)):
        if extra not in ids:
            ids.append(extra)
    return ids


def _pad_token_id(model: Any, tokenizer: Any, eos: list[int]) -> int | None:
    for candidate in (
        getattr(model.generation_config, "pad_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
    ):
        if candidate is not None:
            return int(_as_list(candidate)[0])
    return eos[0] if eos else None


def _context_length(model: Any) -> int:
    text_config = model.config.get_text_config(decoder=True)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text_config, attr, None)
        if value:
            return int(value)
    raise InvalidInputError(
        f"cannot find the context length of {type(model).__name__}: its text config has no "
        "max_position_embeddings"
    )


def _template_refusal(error: Exception) -> str:
    """The client-facing message of a chat-template refusal: the template's own words (it
    raises them for users, e.g. "roles must alternate"), shortened, without the checkpoint path."""
    words = " ".join(str(error).split())
    if len(words) > 200:
        words = words[:197] + "..."
    return f"the VLM's chat template rejected the conversation: {words}"

"""``ETAInputGuard`` and ``ETAOutputGuard``: ETA's evaluators as runnables around any chat model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field

from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL
from eta_guard.errors import GuardrailViolation, InvalidInputError
from eta_guard.scored_images import ScoredImage, load_request_images
from eta_guard.tools.calls import judged_text
from langchain_eta._image_checks import user_text
from langchain_eta._loading import aresolve, lazy_evaluator, resolve
from langchain_eta._messages import as_messages, forwarded_block, image_sources, replace_blocks
from langchain_eta._verdicts import (
    DEFAULT_IMAGE_REPLACEMENT,
    DEFAULT_REFUSAL,
    GUARD_VERDICT_KEY,
    OnViolation,
    aemit,
    emit,
    event_data,
    verdict_dict,
)


class _ETAGuard(RunnableSerializable[Any, Any]):
    """Shared fields and loading of the two guards."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    evaluator: Any = Field(repr=False)
    """An ``eta_guard.ETAEvaluator`` (or a lazy loader from :meth:`from_pretrained`)."""
    on_violation: OnViolation = "raise"
    """``"raise"`` a GuardrailViolation, ``"replace"`` the flagged content, or ``"flag"`` only."""

    @classmethod
    def from_pretrained(
        cls,
        clip: str | None = DEFAULT_CLIP,
        reward_model: str | None = DEFAULT_REWARD_MODEL,
        *,
        config: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Build the guard over ``ETAEvaluator.from_pretrained`` (loaded on first use).

        ``kwargs`` are the guard's fields (``on_violation``, ...) plus ``ETAEvaluator.from_pretrained``
        options (``device``, ``dtype``, ``local_files_only``, ...).
        """
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.model_fields}
        loader = lazy_evaluator(clip=clip, reward_model=reward_model, config=config, **kwargs)
        return cls(evaluator=loader, **fields)

    def _evaluator(self) -> Any:
        return resolve(self.evaluator)


class ETAInputGuard(_ETAGuard):
    """Checks the images of chat-model input with ETA's CLIP pre-evaluator.

    Put it in front of any chat model: ``guard | model``. Input is anything a chat model
    accepts (str, PromptValue, messages). Every image in the messages is scored (system, AI
    and tool messages included); the request is unsafe when the largest score reaches
    ``pre_threshold``.

    - ``on_violation="raise"``: raise ``GuardrailViolation`` (``.verdict`` says why).
    - ``"replace"``: each flagged image becomes a text block ``replacement``; the rest passes on.
    - ``"flag"``: pass through; the verdict is put in the last message's
      ``response_metadata["eta_guard_verdict"]``.

    Input without images passes unchanged and unchecked. Otherwise the guard passes on a
    message list in which every image is the image it scored: decoded once (EXIF orientation
    applied, transparency dropped as the reference drops it), scored, and forwarded as a metadata-free PNG
    ``image`` block, so the model never gets bytes that were not scored. Animated images are
    refused (``InvalidInputError``). Every check also emits an ``eta_verdict`` custom callback
    event.

    Example (offline, on tiny random checkpoints; any chat model in place of the fake one):
        .. code-block:: python

            from eta_guard.testing import build_tiny_checkpoints, image_to_data_url, make_test_image
            from langchain_core.language_models import GenericFakeChatModel
            from langchain_core.messages import AIMessage, HumanMessage
            from langchain_eta import ETAInputGuard

            ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
            guard = ETAInputGuard.from_pretrained(
                clip=ckpt.clip, reward_model=None, on_violation="replace"
            )  # CLIP loads on first use
            chat_model = GenericFakeChatModel(messages=iter([AIMessage("A gradient.")]))
            chain = guard | chat_model
            chain.invoke([HumanMessage(content=[
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": image_to_data_url(make_test_image())}},
            ])])

        Async:

        .. code-block:: python

            await guard.ainvoke([HumanMessage(content=[
                {"type": "image", "url": image_to_data_url(make_test_image("noise"))},
            ])])
    """

    replacement: str = DEFAULT_IMAGE_REPLACEMENT
    """Text that replaces each flagged image when ``on_violation="replace"``."""
    allow_local_image_files: bool = False
    """Read image ``url``s that are local paths or ``file:`` URLs (off: they are refused)."""

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._check, input, config)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._acheck, input, config)

    def _check(
        self, input: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> Any:
        messages, found = self._images(input)
        if not found:
            return input
        evaluator = self._evaluator()
        scored = self._load(evaluator, found)
        verdict = evaluator.evaluate_input([s.image for s in scored], text=user_text(messages))
        emit(self._event(verdict), config)
        return self._apply(messages, found, scored, verdict)

    async def _acheck(
        self, input: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
    ) -> Any:
        messages, found = self._images(input)
        if not found:
            return input
        evaluator = await aresolve(self.evaluator)
        scored = await asyncio.to_thread(self._load, evaluator, found)  # decoding is CPU work
        verdict = await evaluator.aevaluate_input(
            [s.image for s in scored], text=user_text(messages)
        )
        await aemit(self._event(verdict), config)
        return self._apply(messages, found, scored, verdict)

    def _images(self, input: Any) -> tuple[list[BaseMessage], list[tuple[int, int, str]]]:
        messages = as_messages(input)
        return messages, image_sources(messages, allow_local_files=self.allow_local_image_files)

    def _load(self, evaluator: Any, found: list[tuple[int, int, str]]) -> list[ScoredImage]:
        """Decode each image once: the same RGB image is scored and forwarded."""
        return load_request_images(
            [src for _, _, src in found],
            evaluator.config,
            allow_local_files=self.allow_local_image_files,
        )

    def _event(self, verdict: Any) -> dict[str, Any]:
        return event_data(
            "ETAInputGuard", verdict, violation=bool(verdict.input_unsafe), action=self.on_violation
        )

    def _apply(
        self,
        messages: list[BaseMessage],
        found: list[tuple[int, int, str]],
        scored: list[ScoredImage],
        verdict: Any,
    ) -> list[BaseMessage]:
        """The messages to pass on: every image replaced by the PNG of exactly what was scored."""
        removed: set[tuple[int, int]] = set()
        if verdict.input_unsafe and self.on_violation == "raise":
            raise GuardrailViolation(
                f"ETAInputGuard: {'image' if _fired(verdict, 'pre') == 'clip' else 'input'} "
                f"flagged as unsafe by {_fired(verdict, 'pre')} (CLIP score {verdict.pre_score}, "
                f"threshold {verdict.pre_threshold})",
                verdict,
            )
        if verdict.input_unsafe and self.on_violation == "replace":
            removed = _flagged_images(found, verdict)
        blocks = {
            (i, j): (
                {"type": "text", "text": self.replacement}
                if (i, j) in removed
                else forwarded_block(image.base64, messages[i].content_blocks[j])
            )
            for (i, j, _), image in zip(found, scored, strict=True)
        }
        out = replace_blocks(messages, blocks)
        return _with_verdict(out, verdict) if self.on_violation == "flag" else out


class ETAOutputGuard(_ETAGuard):
    """Checks a model's answer with ETA's reward-model post-evaluator.

    Put it after any chat model: ``model | guard``. Input is an ``AIMessage`` (or any message,
    or a str); the output has the same type. The answer is unsafe when its reward is at most
    ``post_threshold``.

    - ``on_violation="raise"``: raise ``GuardrailViolation`` (``.verdict`` says why).
    - ``"replace"``: the answer becomes ``refusal`` (an ``AIMessage`` keeping the message id).
    - ``"flag"``: pass through with ``response_metadata["eta_guard_verdict"]`` (str input: unchanged).

    Streaming holds back the whole answer: no chunk leaves the guard before the model's stream
    has ended and the reward model has judged the complete text. Then the original chunks are
    replayed (the last one carrying the verdict when ``flag``), or one refusal chunk is
    yielded, or ``GuardrailViolation`` is raised. Text that is blocked is therefore never
    yielded. Tool calls are judged with the answer's words (name and arguments), so a
    tool-call-only answer is scored too; a refusal carries no calls. Empty answers are not scored. Every check emits an
    ``eta_verdict`` custom callback event.

    Example (offline, on tiny random checkpoints; any chat model in place of the fake one):
        .. code-block:: python

            from eta_guard.testing import build_tiny_checkpoints
            from langchain_core.language_models import GenericFakeChatModel
            from langchain_core.messages import AIMessage
            from langchain_eta import ETAOutputGuard

            ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
            guard = ETAOutputGuard.from_pretrained(
                clip=None, reward_model=ckpt.reward_model, on_violation="flag"
            )
            chat_model = GenericFakeChatModel(messages=iter([AIMessage("It is red. Nothing else.")] * 3))
            answer = (chat_model | guard).invoke("What colour is it?")
            answer.response_metadata["eta_guard_verdict"]["post_score"]

        Stream (the chunks come out once the whole answer has been judged):

        .. code-block:: python

            for chunk in (chat_model | guard).stream("What colour is it?"):
                print(chunk.text, end="")

        Async:

        .. code-block:: python

            await (chat_model | guard).ainvoke("What colour is it?")
    """

    refusal: str = DEFAULT_REFUSAL
    """The answer that replaces a flagged one when ``on_violation="replace"``."""

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._check, input, config)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._acheck, input, config)

    def transform(
        self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        yield from self._transform_stream_with_config(input, self._transform, config)

    async def atransform(
        self, input: AsyncIterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config):
            yield chunk

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        yield from self.transform(iter([input]), config, **kwargs)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self.atransform(one(), config, **kwargs):
            yield chunk

    # ---------------------------------------------------------------- one answer
    def _check(
        self, input: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> Any:
        text = _text(input)
        if not text:
            return input
        verdict = self._evaluator().evaluate_output(text)
        emit(self._event(verdict), config)
        return self._apply(input, verdict)

    async def _acheck(
        self, input: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
    ) -> Any:
        text = _text(input)
        if not text:
            return input
        verdict = await (await aresolve(self.evaluator)).aevaluate_output(text)
        await aemit(self._event(verdict), config)
        return self._apply(input, verdict)

    # ---------------------------------------------------------------- streams
    def _transform(
        self, chunks: Iterator[Any], run_manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> Iterator[Any]:
        held = list(chunks)  # hold back everything until the answer is complete
        if not held:
            return
        answer = _aggregate(held)
        text = _text(answer)
        if not text:
            yield from held
            return
        verdict = self._evaluator().evaluate_output(text)
        emit(self._event(verdict), config)
        yield from self._release(held, verdict)

    async def _atransform(
        self,
        chunks: AsyncIterator[Any],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> AsyncIterator[Any]:
        held = [chunk async for chunk in chunks]
        if not held:
            return
        text = _text(_aggregate(held))
        if not text:
            for chunk in held:
                yield chunk
            return
        verdict = await (await aresolve(self.evaluator)).aevaluate_output(text)
        await aemit(self._event(verdict), config)
        for chunk in self._release(held, verdict):
            yield chunk

    # ---------------------------------------------------------------- decisions
    def _event(self, verdict: Any) -> dict[str, Any]:
        return event_data(
            "ETAOutputGuard",
            verdict,
            violation=bool(verdict.output_unsafe),
            action=self.on_violation,
        )

    def _apply(self, answer: Any, verdict: Any) -> Any:
        if verdict.output_unsafe and self.on_violation != "flag":
            return self._refuse(answer, verdict)
        if self.on_violation == "flag" and isinstance(answer, BaseMessage):
            return _with_verdict([answer], verdict)[0]
        return answer

    def _release(self, held: list[Any], verdict: Any) -> list[Any]:
        """What a stream yields once the whole answer has been judged."""
        if verdict.output_unsafe and self.on_violation != "flag":
            return [self._refuse(held[0], verdict, chunk=True)]
        if self.on_violation == "flag" and isinstance(held[-1], BaseMessage):
            return [*held[:-1], _with_verdict([held[-1]], verdict)[0]]
        return held

    def _refuse(self, answer: Any, verdict: Any, *, chunk: bool = False) -> Any:
        if self.on_violation == "raise":
            raise GuardrailViolation(
                f"ETAOutputGuard: answer flagged as unsafe by {_fired(verdict, 'post')} (reward "
                f"{verdict.post_score}, threshold {verdict.post_threshold})",
                verdict,
            )
        if not isinstance(answer, BaseMessage):
            return self.refusal
        kind = AIMessageChunk if chunk or isinstance(answer, AIMessageChunk) else AIMessage
        extra = {"chunk_position": "last"} if kind is AIMessageChunk else {}
        return kind(
            content=self.refusal,
            id=answer.id,
            response_metadata={GUARD_VERDICT_KEY: verdict_dict(verdict)},
            **extra,
        )


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, BaseMessage):
        try:
            # A tool call is part of the answer: its name and arguments are judged with the words.
            return judged_text(
                value.text,
                getattr(value, "tool_calls", None) or [],
                getattr(value, "invalid_tool_calls", None) or [],
            )
        except Exception as e:  # e.g. content blocks of an unexpected shape
            raise InvalidInputError(
                f"ETAOutputGuard cannot read the text of a {type(value).__name__}: its content "
                "is neither a str nor a list of content blocks"
            ) from e
    raise InvalidInputError(
        f"ETAOutputGuard expects an AIMessage (or any message) or a str, got {_type_name(value)}"
    )


def _aggregate(chunks: list[Any]) -> Any:
    for chunk in chunks:
        _text(chunk)  # each chunk must be a message or a str: a typed error otherwise
    kinds = {isinstance(c, str) for c in chunks}
    if len(kinds) > 1:
        raise InvalidInputError(
            "ETAOutputGuard got a stream that mixes str and message chunks; stream one kind"
        )
    total = chunks[0]
    try:
        for chunk in chunks[1:]:
            total = total + chunk
    except Exception as e:  # e.g. AIMessage + AIMessageChunk, or chunks of different types
        raise InvalidInputError(
            f"ETAOutputGuard cannot join the stream's chunks ({_type_name(chunks[0])} then "
            f"{_type_name(chunk)}); stream message chunks (AIMessageChunk) or str"
        ) from e
    if not isinstance(total, (str, BaseMessage)):  # AIMessage + AIMessage makes a prompt
        raise InvalidInputError(
            f"ETAOutputGuard cannot join a stream of {_type_name(chunks[0])}s into one answer; "
            "stream message chunks (AIMessageChunk) or str"
        )
    return total


def _type_name(value: Any) -> str:
    return type(value).__qualname__[:60]


def _with_verdict(messages: list[BaseMessage], verdict: Any) -> list[BaseMessage]:
    """Copies with the verdict in the last message's ``response_metadata``."""
    last = messages[-1]
    meta = {**last.response_metadata, GUARD_VERDICT_KEY: verdict_dict(verdict)}
    return [*messages[:-1], last.model_copy(update={"response_metadata": meta})]


def _fired(verdict: Any, side: str) -> str:
    names = [e.name for e in verdict.evaluators if e.side == side and e.unsafe]
    return ", ".join(names) or "the failure policy"


def _flagged_images(found: list[tuple[int, int, str]], verdict: Any) -> set[tuple[int, int]]:
    """Positions of the images at or above the threshold (all of them without per-image scores,
    or when a gate fired: it judged the images with the text, not one image alone)."""
    scores = verdict.image_scores
    gate_fired = any(e.side == "pre" and e.name != "clip" and e.unsafe for e in verdict.evaluators)
    if len(scores) != len(found) or gate_fired:
        return {(i, j) for i, j, _ in found}
    return {
        (i, j) for (i, j, _), s in zip(found, scores, strict=True) if s >= verdict.pre_threshold
    }

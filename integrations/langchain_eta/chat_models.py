"""``ETAChatModel``: a LangChain chat model that answers with ETA's safety-aware decoding."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import Field, PrivateAttr, model_validator

from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL, ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.locked_settings import DEFAULT_LOCKED, check_locked
from eta_guard.tools.request import ToolRequest
from langchain_eta._loading import Lazy
from langchain_eta._messages import to_engine_messages
from langchain_eta._tools import (
    answer_parts,
    engine_tool_parser,
    format_tools,
    merge_safe_chunks,
    structured_output,
    tool_choice_for,
)
from langchain_eta._verdicts import result_metadata, result_usage

#: ETAConfig fields that may be passed to the constructor or per call. ``temperature`` is the
#: LangChain standard parameter; ETA's sampling temperature is ``search_temperature``.
_KNOBS = frozenset(ETAConfig.model_fields) - {"temperature"}
#: Keyword arguments LangChain itself may add to a call; they do not change ETA's decoding.
_PASSIVE = frozenset(
    {"stream", "ls_structured_output_format", "temperature", "model", "max_tokens"}
)


class ETAChatModel(BaseChatModel):
    """Chat model over a local Hugging Face VLM, made safe at inference time by ETA.

    Each call runs ETA (Ding et al., ICLR 2025): CLIP judges the images, the VLM answers, a
    reward model judges the answer, and only when both are unsafe is the answer re-decoded
    with ETA's alignment. ``response_metadata["eta_verdict"]`` holds the verdict and
    ``response_metadata["eta_aligned"]`` whether the answer was aligned.

    Setup:
        .. code-block:: bash

            pip install "eta-guard[langchain]"

    Instantiate (offline, on tiny random checkpoints; pass real model ids in practice):
        .. code-block:: python

            from eta_guard.testing import build_tiny_checkpoints
            from langchain_eta import ETAChatModel

            ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
            llm = ETAChatModel(
                vlm=ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model,
                max_tokens=16, num_candidates=2, seed=0,
            )  # nothing is loaded until the first call

    Invoke:
        .. code-block:: python

            import base64, io
            from eta_guard.testing import make_test_image
            from langchain_core.messages import HumanMessage

            buf = io.BytesIO(); make_test_image().save(buf, format="PNG")
            image = base64.b64encode(buf.getvalue()).decode()
            msg = llm.invoke([HumanMessage(content=[
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image", "base64": image, "mime_type": "image/png"},
            ])])
            msg.response_metadata["eta_verdict"]["pre_score"]

    Stream:
        .. code-block:: python

            for chunk in llm.stream("Hello"):
                print(chunk.text, end="")

    Async:
        .. code-block:: python

            await llm.ainvoke("Hello")
            async for chunk in llm.astream("Hello"):
                ...

    Per-call ETA knobs (any ``ETAConfig`` field; ``search_temperature`` for its ``temperature``):
        .. code-block:: python

            llm.bind(pre_threshold=0.1, num_candidates=3).invoke("Hello")  # stricter only

    Tool calling and structured output (docs/agents.md; the VLM's chat template must render
    tools): ``llm.bind_tools([get_weather])``, ``llm.with_structured_output(Schema)``. The reward
    model judges each call (its name and arguments, as generated) with the answer's words;
    when ETA aligns, the aligned answer replaces the calls, which are listed in
    ``response_metadata["eta_dropped_tool_calls"]`` and never returned as calls.
    """

    vlm: str | None = None
    """Id or path of the vision-language model (``ETA.from_pretrained(vlm)``); ``model=`` works too."""
    clip: str | None = DEFAULT_CLIP
    """Id or path of the CLIP pre-generation evaluator."""
    reward_model: str | None = DEFAULT_REWARD_MODEL
    """Id or path of the reward-model post-generation evaluator."""
    config: ETAConfig | None = None
    """ETA settings; ETAConfig fields may also be passed to the constructor directly. With
    ``eta=...`` it replaces the engine's own config for this model's calls."""
    device: str | None = None
    dtype: Any = None
    """torch dtype (or its name) the models load in."""
    load_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for ``ETA.from_pretrained`` (e.g. ``local_files_only``)."""
    allow_local_image_files: bool = False
    """Read image ``url``s that are local paths or ``file:`` URLs. Off by default: LangChain
    messages may come from untrusted clients, and a request must not read the server's files."""
    locked_settings: frozenset[str] | Literal["all"] = DEFAULT_LOCKED
    """ETAConfig fields that per-call arguments (``invoke(..., **kw)``, ``.bind(...)``) may only
    tighten, never loosen (default ``eta_guard.locked_settings.DEFAULT_LOCKED``: the thresholds,
    decision rule, text-only policy, prompts, prefix and deep search, file and network access,
    every limit, the failure policy; ``"all"`` locks every field, ``frozenset()`` none)."""
    eta: Any = Field(default=None, exclude=True, repr=False)
    """A ready ``eta_guard.ETA`` to use instead of loading ``vlm`` / ``clip`` / ``reward_model``."""

    temperature: float | None = None
    """Reported to tracing only: ETA's answer is greedy, its alignment search samples at
    ``search_temperature`` (``ETAConfig.temperature``)."""
    max_tokens: int | None = None
    """Maximum number of new tokens (``ETAConfig.max_new_tokens``)."""
    stop: list[str] | None = None
    """Stop strings; the answer ends before the first one."""
    streaming: bool = False
    timeout: float | None = None
    """Accepted for compatibility; local decoding is not interrupted."""
    max_retries: int = 0
    """Accepted for compatibility; a local model has no transient failures to retry."""
    tool_parser: str | None = None
    """How tool calls are read from the VLM's answers: ``"hermes"``, ``"llama3_json"`` or
    ``"pythonic"`` (vLLM's ``--tool-call-parser`` names). Default: from the VLM's family
    (``eta_guard.tools.parsers.MODEL_TYPE_PARSERS``), or the remote backend's."""

    _engine: Lazy[Any] = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _fold_config_fields(cls, data: Any) -> Any:
        """Move ETAConfig fields given as constructor arguments into ``config``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "model" in data and "vlm" not in data:  # ChatX(model=...) habit
            data["vlm"] = data.pop("model")
        knobs = {k: data.pop(k) for k in list(data) if k in _KNOBS and k not in cls.model_fields}
        if "search_temperature" in data:
            knobs["temperature"] = data.pop("search_temperature")
        config = data.get("config")
        if isinstance(config, dict):
            config = ETAConfig(**config)
        local = "allow_local_image_files"
        if config is not None and local not in data and local in config.model_fields_set:
            data[local] = config.allow_local_image_files
        if knobs:
            config = (config or ETAConfig()).with_overrides(**knobs)
        data["config"] = config
        if data.get("vlm") is None and data.get("eta") is None:
            raise InvalidInputError("ETAChatModel needs vlm=<model id or path> (or eta=<ETA>)")
        return data

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._engine = Lazy(self._load_engine) if self.eta is None else Lazy(lambda: self.eta)

    # ------------------------------------------------------------------ loading
    def _load_engine(self) -> Any:
        from eta_guard.pipeline import ETA

        return ETA.from_pretrained(
            self.vlm,
            clip=self.clip,
            reward_model=self.reward_model,
            config=self.config,
            device=self.device,
            dtype=self.dtype,
            **self.load_kwargs,
        )

    def load(self) -> Any:
        """The ``eta_guard.ETA`` engine, loading the weights on the first call (once, thread-safely)."""
        return self._engine.get()

    async def aload(self) -> Any:
        """Async :meth:`load` (loads in a worker thread)."""
        if self._engine.loaded:
            return self._engine.get()
        return await asyncio.to_thread(self._engine.get)

    @property
    def model_name(self) -> str:
        """The VLM's id or path."""
        return self.vlm or getattr(self.eta, "model_name", "") or "eta"

    # ------------------------------------------------------------------ tools
    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, AIMessage]:
        """Offer ``tools`` (LangChain tools, functions, pydantic models or OpenAI dicts).

        ``tool_choice``: ``"auto"`` (default), ``"none"``, ``"any"`` / ``"required"`` / ``True``,
        or a tool's name. A forced choice (any, required, a name) is enforced: on a local VLM by
        a grammar of the family's call format (``hermes``, ``llama3_json``; the ``structured``
        extra; refused for ``pythonic``), on an engine by its own ``tool_choice``.
        """
        formatted = format_tools(tools)
        return self.bind(
            tools=formatted, tool_choice=tool_choice_for(tool_choice, formatted), **kwargs
        )

    def with_structured_output(  # type: ignore[override]
        self,
        schema: Any,
        *,
        method: str = "json_schema",
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[Any, Any]:
        """A runnable that answers with ``schema``'s type (pydantic model, TypedDict or JSON schema).

        ``method="json_schema"`` (default): constrained decoding (xgrammar, the
        ``structured`` extra) locally, the engine's structured outputs remotely;
        ``"json_mode"``: any JSON object; ``"function_calling"``: the schema as the one tool the
        model is asked to call. An answer ETA aligned is not of the schema: with
        ``include_raw=True`` it comes back as ``parsing_error`` with the raw message.
        """
        return structured_output(self, schema, method=method, include_raw=include_raw, **kwargs)

    # ------------------------------------------------------------------ LangChain hooks
    @property
    def _llm_type(self) -> str:
        return "eta-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "clip": self.clip,
            "reward_model": self.reward_model,
            "config": self.config.model_dump(mode="json") if self.config else None,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="eta_guard",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := (stop or self.stop):
            params["ls_stop"] = stop
        return params

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if not ToolRequest.of(kwargs).offered:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        # Tool calls are returned exactly as parsed: LangChain's chunk merging would re-read an
        # invalid call's arguments leniently (a truncated call would become a valid one).
        chunks = list(self._stream(messages, stop, run_manager, **kwargs))
        return _exact_result(chunks[-1])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if not ToolRequest.of(kwargs).offered:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        chunks = [c async for c in self._astream(messages, stop, run_manager, **kwargs)]
        return _exact_result(chunks[-1])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request, call_stop, overrides, tools = self._prepare(messages, stop, kwargs)
        engine = self.load()
        for piece in engine.stream(request, stop=call_stop, **overrides):
            if tools.offered and piece.result is None:
                continue  # held back until the answer's calls are parsed
            chunk = self._to_chunk(piece, tools, engine)
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request, call_stop, overrides, tools = self._prepare(messages, stop, kwargs)
        engine = await self.aload()
        async for piece in engine.astream(request, stop=call_stop, **overrides):
            if tools.offered and piece.result is None:
                continue
            chunk = self._to_chunk(piece, tools, engine)
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # ------------------------------------------------------------------ shared core
    def _prepare(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Any, list[str] | None, dict[str, Any], ToolRequest]:
        """Engine request, stop strings, ETAConfig overrides and tool settings for one call."""
        tools = ToolRequest.of(kwargs)
        overrides = self._overrides({k: v for k, v in kwargs.items() if k not in tools.KEYS})
        local = overrides["allow_local_image_files"]
        engine_messages = to_engine_messages(messages, allow_local_files=local)
        return (
            tools.request(engine_messages),
            (stop or self.stop or None),
            overrides,
            tools,
        )

    def _overrides(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        model = kwargs.get("model")
        if model is not None and model != self.model_name:
            raise InvalidInputError(
                f"model={model!r}: ETAChatModel serves {self.model_name!r} only; "
                "create another ETAChatModel for another VLM"
            )
        # A ready engine keeps its own config unless this model was given one.
        overrides: dict[str, Any] = (
            self.config.model_dump() if self.eta is not None and self.config else {}
        )
        overrides["allow_local_image_files"] = self.allow_local_image_files
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            overrides["max_new_tokens"] = max_tokens
        for key, value in kwargs.items():
            if key == "search_temperature":
                overrides["temperature"] = value
            elif key in _KNOBS:
                overrides[key] = value
            elif key not in _PASSIVE and not key.startswith("ls_"):
                raise InvalidInputError(
                    f"unknown keyword argument {key!r} for ETAChatModel; per-call options are "
                    "max_tokens, stop, search_temperature and the ETAConfig fields"
                )
        requested = {
            ("temperature" if k == "search_temperature" else k): v
            for k, v in kwargs.items()
            if k in _KNOBS or k == "search_temperature"
        }
        if "max_tokens" in kwargs and kwargs["max_tokens"] is not None:
            requested["max_new_tokens"] = kwargs["max_tokens"]
        check_locked(
            requested, self._own_settings(), self.locked_settings, owner="this ETAChatModel"
        )
        return overrides

    def _own_settings(self) -> dict[str, Any]:
        """This model's own ETAConfig values (what per-call arguments are checked against)."""
        config = self.config or getattr(self.eta, "config", None) or ETAConfig()
        own = {**config.model_dump(), "allow_local_image_files": self.allow_local_image_files}
        if self.max_tokens is not None:
            own["max_new_tokens"] = self.max_tokens
        return own

    def _to_chunk(self, piece: Any, tools: ToolRequest, engine: Any) -> ChatGenerationChunk:
        if piece.result is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
        result = piece.result
        metadata = result_metadata(result)
        metadata["model_name"] = metadata["model_name"] or self.model_name
        fields: dict[str, Any] = {"content": piece.text}
        if tools.offered:
            parser = engine_tool_parser(engine, self.tool_parser)
            fields, dropped = answer_parts(result, parser)
            if dropped:
                metadata["eta_dropped_tool_calls"] = dropped
        message = AIMessageChunk(
            **fields,
            response_metadata=metadata,
            usage_metadata=result_usage(result),
            chunk_position="last",
        )
        if message.invalid_tool_calls:
            message.tool_call_chunks = merge_safe_chunks(message)
        return ChatGenerationChunk(
            message=message, generation_info={"finish_reason": result.finish_reason}
        )


def _exact_result(last: ChatGenerationChunk) -> ChatResult:
    """The final chunk of a held-back (tool-calling) answer as a message, calls as parsed."""
    chunk = last.message
    message = AIMessage(
        content=chunk.content,
        tool_calls=list(chunk.tool_calls),
        invalid_tool_calls=list(chunk.invalid_tool_calls),
        response_metadata=chunk.response_metadata,
        usage_metadata=chunk.usage_metadata,
        id=chunk.id,
    )
    return ChatResult(
        generations=[ChatGeneration(message=message, generation_info=last.generation_info)]
    )

"""``ETAChatModel``: a LangChain chat model that answers with ETA's safety-aware decoding."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import Field, PrivateAttr, model_validator

from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL, ETAConfig
from eta_guard.errors import InvalidInputError
from langchain_eta._loading import Lazy
from langchain_eta._locked import DEFAULT_LOCKED, check_locked
from langchain_eta._messages import to_engine_messages
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

            llm.bind(pre_threshold=0.2, num_candidates=3).invoke("Hello")
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
    tighten, never loosen (default: file and network access, every limit, the failure policy;
    ``"all"`` locks every field, ``frozenset()`` none)."""
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
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request, call_stop, overrides = self._prepare(messages, stop, kwargs)
        for piece in self.load().stream(request, stop=call_stop, **overrides):
            chunk = self._to_chunk(piece)
            if run_manager and piece.text:
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request, call_stop, overrides = self._prepare(messages, stop, kwargs)
        engine = await self.aload()
        async for piece in engine.astream(request, stop=call_stop, **overrides):
            chunk = self._to_chunk(piece)
            if run_manager and piece.text:
                await run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk

    # ------------------------------------------------------------------ shared core
    def _prepare(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[str] | None, dict[str, Any]]:
        """Engine messages, stop strings and ETAConfig overrides for one call."""
        overrides = self._overrides(kwargs)
        local = overrides["allow_local_image_files"]
        return (
            to_engine_messages(messages, allow_local_files=local),
            (stop or self.stop or None),
            overrides,
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
        check_locked(requested, self._own_settings(), self.locked_settings)
        return overrides

    def _own_settings(self) -> dict[str, Any]:
        """This model's own ETAConfig values (what per-call arguments are checked against)."""
        config = self.config or getattr(self.eta, "config", None) or ETAConfig()
        return {**config.model_dump(), "allow_local_image_files": self.allow_local_image_files}

    def _to_chunk(self, piece: Any) -> ChatGenerationChunk:
        if piece.result is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
        result = piece.result
        metadata = result_metadata(result)
        metadata["model_name"] = metadata["model_name"] or self.model_name
        message = AIMessageChunk(
            content=piece.text,
            response_metadata=metadata,
            usage_metadata=result_usage(result),
            chunk_position="last",
        )
        return ChatGenerationChunk(
            message=message, generation_info={"finish_reason": result.finish_reason}
        )

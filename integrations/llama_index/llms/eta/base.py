"""``ETAMultiModalLLM``: a LlamaIndex ``LLM`` over a local VLM, made safe by ETA."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.llms.eta._loading import Lazy, lazy_engine, local_files_allowed, model_type_of
from llama_index.llms.eta._messages import (
    StreamAccumulator,
    completion_messages,
    config_overrides,
    final_chat,
    refuse_animated_images,
    split_call_kwargs,
    to_completion,
    to_engine_messages,
)
from llama_index.llms.eta._paths import read_application_paths
from llama_index.llms.eta._tools import (
    first_call_only,
    selections,
    tool_choice_for,
    tool_specs,
)

from eta_guard.config import DEFAULT_CLIP, DEFAULT_REWARD_MODEL, ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.locked_settings import DEFAULT_LOCKED, check_locked
from eta_guard.tools.answers import tool_parser_of
from eta_guard.tools.parsers import parser_for_model_type
from eta_guard.tools.request import ToolRequest


class ETAMultiModalLLM(FunctionCallingLLM):
    """Multimodal LlamaIndex LLM over a local Hugging Face VLM, made safe at inference time by ETA.

    Each call runs ETA (Ding et al., ICLR 2025): CLIP judges the images, the VLM answers, a
    reward model judges the answer, and only when both are unsafe is the answer re-decoded with
    ETA's alignment. Images travel as ``ImageBlock``s in ``ChatMessage.blocks`` (bytes, base64,
    data URL, or ``path=`` set by the application, read by default; ``file:`` URLs and path
    strings only with ``allow_local_image_files=True``; remote URLs only with
    ``ETAConfig(allow_remote_images=True)``). CLIP scores the very decoded image the VLM gets
    (one decode per image), so what is scored is what the model sees; animated images are
    refused.
    ``response.additional_kwargs["eta_verdict"]`` holds the verdict, ``["eta_aligned"]`` whether
    the answer was aligned, and ``response.raw`` the whole ``ETAResult`` as a dict.

    Setup:
        .. code-block:: bash

            pip install "eta-guard[llama-index]"

    Instantiate (offline, on tiny random checkpoints; pass real model ids in practice):
        .. code-block:: python

            from eta_guard import ETAConfig
            from eta_guard.testing import build_tiny_checkpoints
            from llama_index.llms.eta import ETAMultiModalLLM

            ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
            llm = ETAMultiModalLLM(
                vlm=ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model,
                config=ETAConfig(num_candidates=2, seed=0), max_new_tokens=16,
            )  # nothing is loaded until the first call

    Chat with an image:
        .. code-block:: python

            from eta_guard.testing import make_test_image
            from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock

            make_test_image("noise").save("/tmp/eta-noise.png")
            msg = ChatMessage(role="user", blocks=[
                ImageBlock(path="/tmp/eta-noise.png"),
                TextBlock(text="What is in this picture?"),
            ])
            resp = llm.chat([msg])
            resp.message.content, resp.additional_kwargs["eta_verdict"]["pre_score"]

    Complete (images as ``image_documents``; a ``pathlib.Path`` is the application's, a path
    string follows the local-file policy):
        .. code-block:: python

            from pathlib import Path

            llm.complete("Describe it.", image_documents=[Path("/tmp/eta-noise.png")]).text

    Stream:
        .. code-block:: python

            for chunk in llm.stream_chat([msg]):
                print(chunk.delta, end="")  # chunk.message.content: the text so far
            chunk.additional_kwargs["eta_verdict"]  # on the last chunk

    Async:
        .. code-block:: python

            await llm.achat([msg])
            async for chunk in await llm.astream_chat([msg]):
                ...

    Per-call keyword arguments are ``stop=[...]`` and ``ETAConfig`` fields for this call only
    (``llm.chat(msgs, num_candidates=3, max_new_tokens=64)``), and ``tools`` / ``tool_choice`` /
    ``response_format`` (OpenAI shapes). They may come from user input, so the settings in
    ``locked_settings`` (by default the thresholds, rules, prompts, file and network access and
    every limit) can only be made stricter per call.

    Function calling (a ``FunctionCallingLLM``; docs/llamaindex.md): ``FunctionAgent``,
    ``chat_with_tools`` and ``predict_and_call`` work with it. The VLM's chat template renders
    the tools, calls are parsed per model family (``tool_parser``) and come back as
    ``ToolCallBlock``s; the reward model judges them with the answer's words, and when ETA
    aligns, the aligned answer replaces the calls (``additional_kwargs["eta_dropped_tool_calls"]``):
        .. code-block:: python

            from llama_index.core.agent.workflow import FunctionAgent
            from llama_index.core.tools import FunctionTool

            def get_weather(city: str) -> str:
                return "sunny"

            weather = FunctionTool.from_defaults(fn=get_weather, description="Weather in a city.")
            agent = FunctionAgent(tools=[weather], llm=llm)
            # await agent.run(user_msg="Weather in Paris?") with a VLM whose chat template
            # renders tools (e.g. Qwen2.5-VL with eta_guard.tools.templates); the tiny LLaVA
            # has no tool-call format:
            llm.metadata.is_function_calling_model  # False here
    """

    vlm: str | None = Field(None, description="VLM id or path (as in ETA.from_pretrained).")
    clip: str | None = Field(DEFAULT_CLIP, description="CLIP id or path of the pre-evaluator.")
    reward_model: str | None = Field(
        DEFAULT_REWARD_MODEL, description="Reward-model id or path of the post-evaluator."
    )
    config: ETAConfig | None = Field(None, description="ETA's thresholds and search knobs.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Answer length limit (default: config.max_new_tokens)."
    )
    context_window: int = Field(
        DEFAULT_CONTEXT_WINDOW, gt=0, description="Context size LlamaIndex packs prompts for."
    )
    device: str | None = Field(None, description="Torch device for all three models.")
    allow_local_image_files: bool | None = Field(
        None,
        description="Read file: URLs and path strings (which may come from untrusted message "
        "text): off unless set here (or explicitly in config). The application's own "
        "ImageBlock.path / pathlib.Path is read unless this is False.",
    )
    tool_parser: str | None = Field(
        None,
        description="How tool calls are read from the VLM's answers ('hermes', 'llama3_json', "
        "'pythonic'); default: from the VLM's family, or the remote backend's.",
    )
    is_function_calling: bool | None = Field(
        None,
        description="metadata.is_function_calling_model; default: whether the model's family has "
        "a known tool-call format (or tool_parser is set); read from the checkpoint's "
        "config.json before the weights load.",
    )
    locked_settings: frozenset[str] | str = Field(
        DEFAULT_LOCKED,
        description="ETAConfig fields per-call arguments may only tighten, never loosen "
        "(eta_guard.locked_settings.DEFAULT_LOCKED; 'all' locks every field, frozenset() none).",
    )
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More ETA.from_pretrained arguments (dtype, local_files_only, "
        "trust_remote_code, clip_backend, vlm_kwargs, ...).",
    )

    _engine: Lazy[Any] = PrivateAttr()

    def __init__(self, vlm: str | None = None, *, eta: Any = None, **kwargs: Any) -> None:
        """Pass model ids/paths (``vlm``, ``clip``, ``reward_model``), or a ready ``eta``."""
        if (vlm is None) == (eta is None):
            raise InvalidInputError(
                "ETAMultiModalLLM needs exactly one of vlm=<model id or path> or eta=<ETA>, got "
                f"vlm={vlm!r}, eta={type(eta).__name__ if eta is not None else None}"
            )
        if eta is not None:
            kwargs.setdefault("clip", None)
            kwargs.setdefault("reward_model", None)
        super().__init__(vlm=vlm, **kwargs)
        if eta is not None:
            from eta_guard.pipeline import ETA

            if not isinstance(eta, ETA):
                raise InvalidInputError(f"eta must be an eta_guard.ETA, got {type(eta).__name__}")
            self._engine = Lazy.ready(eta)
        else:
            self._engine = lazy_engine(
                vlm,
                clip=self.clip,
                reward_model=self.reward_model,
                config=self.config,
                device=self.device,
                **self.load_kwargs,
            )

    @classmethod
    def class_name(cls) -> str:
        return "eta_multi_modal_llm"

    @property
    def metadata(self) -> LLMMetadata:
        """Never loads weights; a ready engine (``eta=``) supplies its own name and config."""
        engine = self._engine.get() if self._engine.loaded else None
        config = self.config or (engine.config if engine is not None else ETAConfig())
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens or config.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=self._function_calling(engine),
            model_name=self.vlm or (engine.model_name if engine is not None else "eta"),
        )

    def _function_calling(self, engine: Any) -> bool:
        """Whether the model's calls can be read: a set ``tool_parser``, else its family's
        (from the loaded engine, or from the checkpoint's config.json before it loads)."""
        if self.is_function_calling is not None:
            return self.is_function_calling
        if self.tool_parser is not None:
            return True
        if engine is None:
            return parser_for_model_type(model_type_of(self.vlm)) is not None
        try:
            tool_parser_of(engine, self.tool_parser)
        except InvalidInputError:
            return False
        return True

    @property
    def engine(self) -> Any:
        """The ``eta_guard.ETA`` behind this LLM (loaded on first access)."""
        return self._engine.get()

    # ------------------------------------------------------------------ the core
    def _prepare(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[Any, list[str] | None, dict[str, Any], ToolRequest]:
        tools = ToolRequest.of(kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ToolRequest.KEYS}  # ETAConfig's
        engine_messages = to_engine_messages(messages)
        stop, overrides = split_call_kwargs(kwargs, max_new_tokens=self.max_new_tokens)
        # The adapter's policy, not the engine config's default, decides about local files.
        engine = self._engine.get() if self._engine.loaded else None
        config = self.config or (engine.config if engine is not None else None)
        own = (config or ETAConfig()).model_dump()
        own["allow_local_image_files"] = local_files_allowed(
            self.allow_local_image_files, config, default=False
        )
        own["max_new_tokens"] = self.max_new_tokens or own["max_new_tokens"]
        requested = {k: v for k, v in kwargs.items() if k != "stop"}
        check_locked(requested, own, self.locked_settings, owner="this ETAMultiModalLLM")
        asked = overrides.get("allow_local_image_files")  # this call's setting, if any
        if asked is None:
            asked = self.allow_local_image_files
        # Strings (file: URLs, paths) may come from user text: off unless allowed. The
        # application's own ImageBlock.path is read unless local files were turned off.
        strings = local_files_allowed(asked, config, default=False)
        overrides["allow_local_image_files"] = strings
        if not strings and local_files_allowed(asked, config, default=True):
            limits = config or ETAConfig()
            if "max_image_pixels" in overrides:
                limits = limits.with_overrides(max_image_pixels=overrides["max_image_pixels"])
            engine_messages = read_application_paths(engine_messages, limits)
        refuse_animated_images(engine_messages, allow_local_files=strings)
        return tools.request(engine_messages), stop, overrides, tools

    def _with_config(self, eta: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        """A ready engine keeps its own config; ``self.config`` then applies as overrides."""
        return {**config_overrides(eta.config, self.config), **overrides}

    def _stream(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> Iterator[ChatResponse]:
        engine_messages, stop, overrides, tools = self._prepare(messages, kwargs)  # fails early

        def gen() -> Iterator[ChatResponse]:
            eta = self._engine.get()
            acc = StreamAccumulator(self._parser(eta, tools))
            for chunk in eta.stream(
                engine_messages, stop=stop, **self._with_config(eta, overrides)
            ):
                yield acc.push(chunk)

        return gen()

    def _astream(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> AsyncIterator[ChatResponse]:
        engine_messages, stop, overrides, tools = self._prepare(messages, kwargs)

        async def gen() -> AsyncIterator[ChatResponse]:
            eta = await self._engine.aget()
            acc = StreamAccumulator(self._parser(eta, tools))
            chunks = eta.astream(engine_messages, stop=stop, **self._with_config(eta, overrides))
            async for chunk in chunks:
                yield acc.push(chunk)

        return gen()

    def _parser(self, eta: Any, tools: ToolRequest) -> str | None:
        """The parser of this call's tool calls (None when no tool is offered)."""
        return tool_parser_of(eta, self.tool_parser) if tools.offered else None

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        """The whole answer: the aggregate of :meth:`_stream`."""
        last = None
        for last in self._stream(messages, kwargs):  # noqa: B007
            pass
        return final_chat(last)

    async def _achat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        last = None
        async for last in self._astream(messages, kwargs):  # noqa: B007
            pass
        return final_chat(last)

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._achat(messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        return self._astream(messages, kwargs)

    # ------------------------------------------------------------------ function calling
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat`` arguments offering ``tools`` (LlamaIndex ``BaseTool``s).

        ``tool_required=True`` or ``tool_choice="required"`` / a tool name force a call: on a
        local VLM by a grammar of the family's call format, on an engine by its ``tool_choice``.
        """
        specs = tool_specs(tools)
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role="user", content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        chat_kwargs: dict[str, Any] = {"messages": messages, **kwargs}
        if specs:
            names = [spec["function"]["name"] for spec in specs]
            chat_kwargs["tools"] = specs
            chat_kwargs["tool_choice"] = tool_choice_for(tool_choice, tool_required, names)
        return chat_kwargs

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[Any],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        return response if allow_parallel_tool_calls else first_call_only(response)

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The calls of a response (its ``ToolCallBlock``s; none when ETA aligned).

        Raises:
            ValueError: no call and ``error_on_no_tool_call``.
        """
        return selections(response, error_on_no_tool_call)

    # ------------------------------------------------------------------ complete
    # A completion is a one-turn chat: ``prompt`` plus ``image_documents`` (ImageBlocks,
    # ImageNodes/ImageDocuments, paths, bytes, data URLs or base64). ``formatted`` is accepted
    # for LlamaIndex's sake; the VLM's own chat template always formats the prompt.
    @llm_completion_callback()
    def complete(
        self, prompt: str, formatted: bool = False, image_documents: Any = None, **kwargs: Any
    ) -> CompletionResponse:
        return to_completion(self._chat(completion_messages(prompt, image_documents), kwargs))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, image_documents: Any = None, **kwargs: Any
    ) -> CompletionResponseGen:
        chats = self._stream(completion_messages(prompt, image_documents), kwargs)
        return (to_completion(chat) for chat in chats)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, image_documents: Any = None, **kwargs: Any
    ) -> CompletionResponse:
        chat = await self._achat(completion_messages(prompt, image_documents), kwargs)
        return to_completion(chat)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, image_documents: Any = None, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        chats = self._astream(completion_messages(prompt, image_documents), kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for chat in chats:
                yield to_completion(chat)

        return gen()

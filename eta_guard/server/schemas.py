"""Request bodies of the OpenAI endpoints (pydantic), validated strictly where it matters.

Unknown fields are accepted and ignored (clients send many optional ones: ``user``, ``store``,
``metadata``...), but fields whose meaning ETA cannot honour are refused with a 400 rather than
silently dropped: ``n > 1``, log-probabilities, the legacy ``functions``; tools and JSON modes on
``/v1/completions`` (chat takes them).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from eta_guard.server.errors import bad_request

#: Sampling parameters that ETA's answer does not use (it is greedy); echoed in the extension.
IGNORED_SAMPLING = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
#: Fields that change what the client expects back; refused when set to a non-default value.
_UNSUPPORTED = {
    "tools": "tool calling",
    "functions": "function calling",
    "tool_choice": "tool calling",
    "function_call": "function calling",
    "logprobs": "log-probabilities",
    "top_logprobs": "log-probabilities",
    "logit_bias": "logit_bias",
    "audio": "audio output",
    "prediction": "predicted outputs",
    "echo": "echo",
    "suffix": "suffix",
    "best_of": "best_of",
}
_FALSY_OK = {"tools": [], "functions": [], "tool_choice": "none", "logprobs": False, "echo": False}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What both generation routes share (chat and text completions)."""

    model_config = ConfigDict(extra="allow")
    #: Fields of ``_UNSUPPORTED`` (and ``response_format``) this route does honour.
    ACCEPTED: ClassVar[frozenset[str]] = frozenset()

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    # Clients send explicit nulls for unset fields: null means the default.
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def check_supported(self) -> None:
        """Refuse what ETA cannot honour (400 naming the field)."""
        if self.n not in (None, 1):
            raise bad_request("n must be 1: ETA returns one guarded answer", param="n")
        for name, what in _UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if name in self.ACCEPTED:
                continue
            if value is not None and value != _FALSY_OK.get(name, None):
                raise bad_request(f"{name}: {what} is not supported by eta-guard", param=name)
        response_format = (self.model_extra or {}).get("response_format")
        if "response_format" not in self.ACCEPTED and response_format not in (
            None,
            {"type": "text"},
        ):
            raise bad_request(
                "response_format: only {'type': 'text'} is supported", param="response_format"
            )
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise bad_request("stop: at most 4 sequences", param="stop")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def ignored_parameters(self) -> list[str]:
        given = {**(self.model_extra or {}), "temperature": self.temperature, "top_p": self.top_p}
        ignored = [name for name in IGNORED_SAMPLING if given.get(name) is not None]
        # One answer may hold several calls; a limit of one is not enforced (the answer's calls
        # are returned as the model wrote them), so the request says so.
        if "tools" in self.ACCEPTED and given.get("parallel_tool_calls") is False:
            ignored.append("parallel_tool_calls")
        return ignored

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def streaming(self) -> bool:
        return bool(self.stream)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    #: An assistant turn's calls (OpenAI shape; checked by the engine).
    tool_calls: list[Any] | None = None
    #: A tool turn's answer to the call with this id.
    tool_call_id: str | None = Field(None, max_length=256)


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions`` (tools, ``tool_choice`` and ``response_format`` included)."""

    ACCEPTED: ClassVar[frozenset[str]] = frozenset({"tools", "tool_choice", "response_format"})

    messages: list[ChatMessage] = Field(min_length=1)

    def tool_fields(self) -> dict[str, Any]:
        """``tools``, ``tool_choice`` and ``response_format`` as sent (absent when unset)."""
        extra = self.model_extra or {}
        return {k: extra[k] for k in sorted(self.ACCEPTED) if extra.get(k) is not None}


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions`` (a prompt answered as one user turn of the chat template)."""

    prompt: str | list[str]


class ModerationRequest(BaseModel):
    """``POST /v1/moderations``."""

    model_config = ConfigDict(extra="allow")

    input: str | list[str] | list[dict[str, Any]]
    model: str | None = Field(None, max_length=256)

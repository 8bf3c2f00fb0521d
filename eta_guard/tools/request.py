"""One call's tool fields, and the engine request they make (what ``ETA`` accepts as input).

Shared by the adapters (LangChain's ``bind``/call keyword arguments, LlamaIndex's ``chat``
keyword arguments): both read the same three OpenAI fields and hand the engine the same request
form (:func:`eta_guard.messages.normalize_messages` validates it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ToolRequest:
    """The tool / structured-output fields of one call."""

    KEYS: ClassVar[tuple[str, ...]] = ("tools", "tool_choice", "response_format")

    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> ToolRequest:
        """The fields of a call's keyword arguments (absent ones are None)."""
        return cls(**{k: kwargs.get(k) for k in cls.KEYS})

    @property
    def offered(self) -> bool:
        """Whether the model may call a tool (its answer's calls are then parsed)."""
        return bool(self.tools) and self.tool_choice != "none"

    def request(self, messages: list[dict[str, Any]]) -> Any:
        """The engine's input: the messages alone, or the request form with the tool fields."""
        if not self.tools and not self.response_format:
            return messages
        request: dict[str, Any] = {"messages": messages}
        if self.tools:
            request["tools"] = self.tools
            request["tool_choice"] = self.tool_choice or "auto"
        if self.response_format:
            request["response_format"] = self.response_format
        return request

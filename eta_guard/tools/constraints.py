"""What a local answer must be decoded as: a forced tool call, a JSON answer, or free text.

``tool_choice="required"`` (or a named function) forces a call. A local model cannot be trusted
to obey the instruction alone, so the answer is decoded under a grammar of the family's own call
format (:mod:`eta_guard.decoding.constrained` compiles it with xgrammar): the answer is then
exactly one call of an offered tool (of the named one), with arguments of that tool's schema,
written as the family's parser reads it.

- ``hermes``: ``<tool_call>\\n{"name": <tool>, "arguments": {...}}\\n</tool_call>``;
- ``llama3_json``: ``{"name": <tool>, "parameters": {...}}``;
- ``pythonic``: refused. Its arguments are Python literals (``True``, ``None``, keyword syntax),
  and the grammars a JSON schema compiles to write JSON (``true``, ``null``): a grammar of the
  schema would not be the format, nor the format's grammar the schema.

Torch-free and xgrammar-free: this module only says what to enforce.
"""

from __future__ import annotations

from typing import Any

from eta_guard.errors import InvalidInputError

#: Parsers whose call format a JSON-schema grammar can enforce -> the key of the arguments.
FORCEABLE = {"hermes": "arguments", "llama3_json": "parameters"}


def forced_tool(conversation: Any) -> bool:
    """Whether the conversation's ``tool_choice`` demands a call (required or a named tool)."""
    choice = getattr(conversation, "tool_choice", "auto")
    return bool(getattr(conversation, "offers_tools", False)) and (
        choice == "required" or isinstance(choice, dict)
    )


def decoding_constraint(conversation: Any, parser: str | None) -> dict[str, Any] | None:
    """The constraint on a conversation's vanilla answer (``None``: free text).

    A forced call wins over ``response_format`` (the answer is the call). The result is the
    conversation's ``response_format`` or ``{"type": "tool_call", "format": parser, "schema":
    <JSON schema of the call object>}``.

    Raises:
        InvalidInputError: a call is forced but ``parser`` is unknown (the model has no known
            tool-call format) or its format cannot be enforced by a grammar (``pythonic``).
    """
    if not forced_tool(conversation):
        return getattr(conversation, "response_format", None)
    choice = conversation.tool_choice
    if parser not in FORCEABLE:
        why = (
            "the model has no known tool-call format"
            if parser is None
            else f"the {parser!r} call format (Python literals) cannot be enforced by a JSON "
            "grammar"
        )
        raise InvalidInputError(
            f"tool_choice={_shown(choice)} cannot be enforced on this local model: {why}; use "
            "tool_choice='auto', or a model whose family writes 'hermes' or 'llama3_json' calls"
        )
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    tools = [t["function"] for t in conversation.tools if named in (None, t["function"]["name"])]
    key = FORCEABLE[parser]
    defs: dict[str, Any] = {}
    calls = []
    for tool in tools:
        parameters = dict(tool.get("parameters") or {"type": "object"})
        # "#/$defs/..." references resolve at the root: the tools' definitions move there.
        for name, definition in parameters.pop("$defs", {}).items():
            if defs.setdefault(name, definition) != definition:
                raise InvalidInputError(
                    f"tool_choice: two tools define $defs {name!r} differently; a forced call's "
                    "grammar needs one definition per name"
                )
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool["name"]}, key: parameters},
                "required": ["name", key],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if defs:
        schema = {**schema, "$defs": defs}
    return {"type": "tool_call", "format": parser, "schema": schema}


def _shown(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else repr(choice["function"]["name"])

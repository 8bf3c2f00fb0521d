"""Turn OpenAI-style chat messages into the Hugging Face processor chat-template form.

Input: a list of ``{"role": "system" | "user" | "assistant" | "tool", "content": str | list[part]}``
mappings (or a request ``{"messages": [...], "tools": [...], "tool_choice": ..., "response_format":
...}``, OpenAI's chat-completions fields), where a part is ``{"type": "text", "text": ...}``, ``{"type": "image", "image": src}``
(or ``"url"`` / ``"path"`` / ``"base64"`` + ``"mime_type"`` instead of ``"image"``, as LangChain
v1 blocks do) or ``{"type": "image_url", "image_url": {"url": ...} | "..."}``.

Output: a :class:`Conversation` whose messages hold bare ``{"type": "image"}`` placeholders and
whose ``images`` hold the decoded RGB images in the same order, ready for
``processor.apply_chat_template``. Assistant turns may carry ``tool_calls`` (kept in the HF form,
arguments as a dict) and tool turns a ``tool_call_id``; an image a tool returns is an input image
like any other (it is pre-checked). Tools, ``tool_choice`` and ``response_format`` travel in the
conversation, so every backend renders them and no stage needs another parameter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eta_guard.errors import InvalidInputError
from eta_guard.limits import RequestLimits, check_encodable
from eta_guard.media import DEFAULT_MAX_PIXELS, check_max_pixels, load_image, short_repr

if TYPE_CHECKING:
    from PIL import Image

    from eta_guard.remote_fetch import RemoteFetchPolicy

ROLES = ("system", "user", "assistant", "tool")
#: Keys of the request form of ``messages`` (OpenAI's chat-completions fields).
_REQUEST_KEYS = ("messages", "tools", "tool_choice", "response_format")
_TEXT_TYPES = ("text", "input_text")
_IMAGE_TYPES = ("image", "image_url", "input_image")
_PART_TYPES = "'text', 'image' or 'image_url'"
_WRAP_HINT = 'wrap it as [{"role": "user", "content": ...}]'


@dataclass
class Conversation:
    """A normalised conversation.

    Attributes:
        messages: HF chat-template messages: ``{"role": r, "content": [part, ...]}`` with parts
            ``{"type": "text", "text": t}`` or bare ``{"type": "image"}`` placeholders.
        images: Decoded RGB images, one per placeholder, in order of appearance.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    #: OpenAI-style tool definitions offered to the model (rendered by its chat template).
    tools: list[dict[str, Any]] = field(default_factory=list)
    #: ``"auto" | "none" | "required"`` or ``{"type": "function", "function": {"name": n}}``.
    tool_choice: str | dict[str, Any] = "auto"
    #: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``: the
    #: answer must be JSON of that shape (constrained decoding); ``None``: free text.
    response_format: dict[str, Any] | None = None

    @property
    def offers_tools(self) -> bool:
        """Whether the model is offered tools it may call (``tool_choice`` not ``"none"``)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def has_images(self) -> bool:
        """Whether any message holds an image."""
        return bool(self.images)


def normalize_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    allow_remote_images: bool = False,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    allow_local_image_files: bool = True,
    limits: RequestLimits | None = None,
    remote: RemoteFetchPolicy | None = None,
) -> Conversation:
    """Validate OpenAI-style messages, decode their images and convert to the HF form.

    Consecutive messages of the same role are merged (adjacent text joined by a blank line),
    because many chat templates require roles to alternate.

    Args:
        messages: A list of ``{"role", "content"}`` mappings, the last one from the user (or a
            tool, answering the model's call); or a mapping with that list as ``"messages"`` and
            ``"tools"``, ``"tool_choice"``, ``"response_format"`` (OpenAI's request fields).
        allow_remote_images: Fetch ``http(s)://`` image URLs (off: no network access).
        max_image_pixels: Refuse images with more pixels than this (decompression bombs).
        allow_local_image_files: Read image paths and ``file://`` URLs. Turn it off when the
            messages come from untrusted users, so that they cannot make the process read files.
        limits: Images, total pixels and text allowed in the conversation (default:
            ``ETAConfig``'s defaults). Count and text are checked before any image is decoded,
            the pixel total from each image's header before it is decoded.
        remote: How remote images are fetched (default: ``RemoteFetchPolicy()``).

    Returns:
        The conversation in HF chat-template form with its decoded images.

    Raises:
        InvalidInputError: The messages are malformed; the message says which one and why.
    """
    check_max_pixels(max_image_pixels, name="max_image_pixels")
    request = _request_fields(messages)
    items = _check_list(request.pop("messages"))
    limits = limits or RequestLimits()
    converted = []
    sources: list[tuple[str, Any]] = []  # (where, source) of each image, in order
    for index, message in enumerate(items):
        role, parts, message_sources = _convert_message(index, message)
        sources.extend(message_sources)
        extra = _tool_fields(index, message, role)
        if role == "assistant" and parts and not any(_has_content(p) for p in parts):
            parts = [] if extra.get("tool_calls") else parts
        converted.append((index, role, parts, extra))
    # Limits first, on the raw parts (linear), so that no later step runs on an oversized request.
    tools_chars = len(json.dumps(request["tools"])) if request["tools"] else 0
    limits.check_text_length(
        sum(len(p["text"]) for *_, parts, _ in converted for p in parts if "text" in p)
        + sum(len(json.dumps(extra.get("tool_calls", []))) for *_, extra in converted)
        + tools_chars,
        what="the messages' text",
    )
    limits.check_image_count(len(sources))
    merged = _merge_turns(converted)
    if (
        not sources
        and not any(p["type"] == "text" and p["text"].strip() for m in merged for p in m["content"])
        and not any("tool_calls" in m for m in merged)
    ):
        raise InvalidInputError(
            "the conversation is empty: no message holds any text or image; "
            'send at least one user message, e.g. [{"role": "user", "content": "Hello"}]'
        )
    if merged[-1]["role"] not in ("user", "tool"):
        raise InvalidInputError(
            f"the last message must be from the user or a tool (it is the one the model "
            f"answers), but messages[{len(items) - 1}] has role {merged[-1]['role']!r}; to "
            "continue an assistant answer, end with a user turn instead"
        )
    _check_tool_turns(merged)
    # Merging adds blank lines at the seams: the merged text is what the model gets.
    limits.check_text_length(
        sum(len(p["text"]) for m in merged for p in m["content"] if p["type"] == "text")
        + sum(len(json.dumps(m.get("tool_calls", []))) for m in merged)
        + tools_chars,
        what="the messages' text",
    )
    # Images are decoded last, so that a malformed conversation fails before any decoding.
    images = []
    with limits.pixel_budget():
        for where, source in sources:
            try:
                images.append(
                    load_image(
                        source,
                        allow_remote=allow_remote_images,
                        max_pixels=max_image_pixels,
                        allow_local_files=allow_local_image_files,
                        remote=remote,
                    )
                )
            except InvalidInputError as e:
                raise InvalidInputError(f"{where}: {e}") from e
    return Conversation(messages=merged, images=images, **request)


def fold_system_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move system text into the first user turn, for chat templates without a system role.

    The system text, followed by a blank line, is prepended to the first text part of the first
    user turn (or appended as a text part when that turn holds only images). Without a user
    turn the system text becomes one. The input is never modified.

    Args:
        messages: Messages in HF form (``content`` a list of parts) or with ``str`` content.

    Returns:
        A new list with no system message.
    """
    system_texts = [text_of(m) for m in messages if m.get("role") == "system"]
    rest = [_copy_message(m) for m in messages if m.get("role") != "system"]
    system_text = "\n\n".join(t for t in system_texts if t)
    if not system_text:
        return rest
    for message in rest:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = f"{system_text}\n\n{content}" if content else system_text
            return rest
        if not isinstance(content, list):  # None or missing: the system text becomes it
            message["content"] = [{"type": "text", "text": system_text}]
            return rest
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                part["text"] = f"{system_text}\n\n{part['text']}" if part["text"] else system_text
                return rest
        content.append({"type": "text", "text": system_text})
        return rest
    first = next(i for i, m in enumerate(messages) if m.get("role") == "system")
    rest.insert(first, {"role": "user", "content": [{"type": "text", "text": system_text}]})
    return rest


def text_of(message: Mapping[str, Any]) -> str:
    """The text of a message: its ``str`` content, or its text parts joined by newlines."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") in _TEXT_TYPES:
            texts.append(str(part.get("text", "")))
    return "\n".join(texts)


# --------------------------------------------------------------------------- helpers


def _request_fields(messages: Any) -> dict[str, Any]:
    """``{"messages", "tools", "tool_choice", "response_format"}`` of either input form."""
    from eta_guard.tools.specs import check_response_format, check_tool_choice, check_tools

    if not (isinstance(messages, Mapping) and "messages" in messages):
        return {"messages": messages, "tools": [], "tool_choice": "auto", "response_format": None}
    unknown = sorted(str(k) for k in messages if k not in _REQUEST_KEYS)
    if unknown:
        raise InvalidInputError(
            f"the request has unknown keys {unknown}; it may hold {', '.join(_REQUEST_KEYS)}"
        )
    tools = check_tools(messages.get("tools") or [])
    return {
        "messages": messages["messages"],
        "tools": tools,
        "tool_choice": check_tool_choice(messages.get("tool_choice"), tools) if tools else "auto",
        "response_format": check_response_format(messages.get("response_format")),
    }


def _tool_fields(index: int, message: Mapping[str, Any], role: str) -> dict[str, Any]:
    """The HF-form tool fields of one message: an assistant's ``tool_calls``, a tool's id."""
    where = f"messages[{index}]"
    if role == "tool":
        call_id = message.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise InvalidInputError(f"{where}['tool_call_id'] must be a str")
        fields: dict[str, Any] = {"tool_call_id": call_id} if call_id else {}
        if isinstance(message.get("name"), str):
            fields["name"] = message["name"]
        return fields
    calls = message.get("tool_calls")
    if not calls:
        return {}
    if role != "assistant":
        raise InvalidInputError(
            f"{where} has tool_calls but role {role!r}; only the assistant calls tools"
        )
    if not isinstance(calls, (list, tuple)):
        raise InvalidInputError(f"{where}['tool_calls'] must be a list")
    return {
        "tool_calls": [_tool_call(f"{where}['tool_calls'][{j}]", c) for j, c in enumerate(calls)]
    }


def _tool_call(where: str, call: Any) -> dict[str, Any]:
    """One call in HF chat-template form: ``{"id", "type", "function": {"name", "arguments"}}``.

    The arguments become a dict (OpenAI sends a JSON string; templates render a mapping).
    """
    function = call.get("function", call) if isinstance(call, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(name, str) or not name:
        raise InvalidInputError(
            f"{where} must be {{'function': {{'name': ..., 'arguments': ...}}}}"
        )
    arguments = function.get("arguments", function.get("args", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{where}: arguments are not JSON ({e})") from e
    if not isinstance(arguments, Mapping):
        raise InvalidInputError(f"{where}: arguments must be a JSON object")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": dict(arguments)},
    }
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _check_tool_turns(merged: list[dict[str, Any]]) -> None:
    """A tool turn must answer a call of an earlier assistant turn."""
    called = False
    for i, message in enumerate(merged):
        if message.get("tool_calls"):
            called = True
        elif message["role"] == "tool" and not called:
            raise InvalidInputError(
                f"turn {i} is a tool result, but no assistant turn before it calls a tool"
            )


def _has_content(part: Mapping[str, Any]) -> bool:
    return part["type"] != "text" or bool(part["text"])


def _check_list(messages: Any) -> list[Any]:
    if isinstance(messages, str):
        raise InvalidInputError(
            f"messages must be a list of message dicts, got a str ({short_repr(messages)}); "
            f"{_WRAP_HINT}"
        )
    if isinstance(messages, Mapping):
        raise InvalidInputError(
            f"messages must be a list of message dicts, got a single mapping "
            f"({short_repr(messages)}); wrap it in a list: [message]"
        )
    if not isinstance(messages, (list, tuple)):
        raise InvalidInputError(
            f"messages must be a list of message dicts, got {type(messages).__name__} "
            f"({short_repr(messages)})"
        )
    if not messages:
        raise InvalidInputError(
            "messages is an empty list; send at least one user message, e.g. "
            '[{"role": "user", "content": "Hello"}]'
        )
    return list(messages)


def _convert_message(
    index: int, message: Any
) -> tuple[str, list[dict[str, Any]], list[tuple[str, Any]]]:
    """Validate one message: its role, its HF-form parts and its image sources (undecoded)."""
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        hint = f"; {_WRAP_HINT}" if isinstance(message, str) else ""
        raise InvalidInputError(
            f"{where} must be a dict with 'role' and 'content', got {type(message).__name__} "
            f"({short_repr(message)}){hint}"
        )
    if "role" not in message:
        raise InvalidInputError(f"{where} has no 'role'; use one of {', '.join(ROLES)}")
    role = message["role"]
    if role not in ROLES:
        raise InvalidInputError(
            f"{where} has unknown role {short_repr(role)}; roles must be one of {', '.join(ROLES)} "
            "(convert 'human' to 'user' and 'ai' to 'assistant')"
        )
    if "content" not in message and not (role == "assistant" and message.get("tool_calls")):
        raise InvalidInputError(f"{where} has no 'content'; give a str or a list of parts")
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        content = ""
    if isinstance(content, str):
        check_encodable(content, what=f"{where}['content']")
        return role, [{"type": "text", "text": content}], []
    if not isinstance(content, (list, tuple)):
        raise InvalidInputError(
            f"{where}['content'] must be a str or a list of parts, got "
            f"{type(content).__name__} ({short_repr(content)})"
        )
    parts: list[dict[str, Any]] = []
    sources: list[tuple[str, Any]] = []
    for j, part in enumerate(content):
        part_where = f"{where}['content'][{j}]"
        kind, value = _read_part(part_where, part)
        if kind == "text":
            parts.append({"type": "text", "text": value})
            continue
        if role == "system":
            raise InvalidInputError(
                f"{part_where} is an image in a system message; images are only allowed in "
                "user, assistant and tool messages: move it to a user message"
            )
        sources.append((part_where, value))
        parts.append({"type": "image"})
    return role, parts, sources


def _read_part(where: str, part: Any) -> tuple[str, Any]:
    """Return ``("text", str)`` or ``("image", source)`` for one content part."""
    if isinstance(part, str):  # LangChain content lists may hold bare strings
        check_encodable(part, what=where)
        return "text", part
    if not isinstance(part, Mapping):
        raise InvalidInputError(
            f"{where} must be a dict with a 'type' ({_PART_TYPES}) or a str, got "
            f"{type(part).__name__} ({short_repr(part)})"
        )
    kind = part.get("type")
    if kind in _TEXT_TYPES:
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidInputError(
                f"{where} is a text part whose 'text' is {short_repr(text)}; it must be a str"
            )
        check_encodable(text, what=where)
        return "text", text
    if kind in _IMAGE_TYPES:
        return "image", _image_source(where, part)
    raise InvalidInputError(
        f"{where} has unknown type {short_repr(kind)}; content parts must have type {_PART_TYPES}"
    )


def _image_source(where: str, part: Mapping[str, Any]) -> Any:
    if "image_url" in part:
        value = part["image_url"]
        if isinstance(value, Mapping):
            if "url" not in value:
                raise InvalidInputError(
                    f"{where}['image_url'] has no 'url'; expected {{\"url\": \"data:image/...\"}}"
                )
            value = value["url"]
        if not isinstance(value, str):
            raise InvalidInputError(
                f"{where}['image_url'] must be a URL str or {{\"url\": str}}, got "
                f"{type(value).__name__} ({short_repr(value)})"
            )
        return value
    for key in ("image", "url", "path"):
        if part.get(key) is not None:  # LangChain blocks may carry unused keys set to None
            return part[key]
    # LangChain v1 uses "base64"; v0 blocks use source_type="base64" with "data".
    data = part.get("base64")
    if data is None and part.get("source_type") == "base64":
        data = part.get("data")
    if data is not None:
        if not isinstance(data, (str, bytes)):
            raise InvalidInputError(
                f"{where} has base64 data of type {type(data).__name__}; it must be a str"
            )
        if isinstance(data, bytes):
            data = data.decode("ascii", "replace")
        mime = part.get("mime_type") or "image/png"
        if data.lower().startswith("data:"):
            return data
        # Route through the data-URL parser so a non-image mime_type is refused clearly.
        return f"data:{mime};base64,{data}"
    if "file_id" in part or part.get("source_type") == "id":
        raise InvalidInputError(
            f"{where} refers to an uploaded file id; provider file ids cannot be resolved "
            "locally: pass the image itself (bytes, base64, path or data URL)"
        )
    raise InvalidInputError(
        f"{where} is an image part without an image; give one of the keys 'image', 'url', "
        f"'path', 'base64' (with 'mime_type') or 'image_url' (keys found: {sorted(part)})"
    )


def _merge_turns(
    converted: list[tuple[int, str, list[dict[str, Any]], dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Merge consecutive same-role messages, joining text that meets at a seam by a blank line.

    Linear in the number of parts: the text pieces of a seam are collected and joined once
    (joining them pairwise, as strings, was quadratic: 80,000 messages took 18.5 s).
    """
    merged: list[dict[str, Any]] = []
    pieces: list[str] | None = None  # the text pieces of merged[-1]'s last part, still open

    def close() -> None:
        if pieces is not None and len(pieces) > 1:
            merged[-1]["content"][-1] = {"type": "text", "text": _join_texts(pieces)}

    for index, role, parts, extra in converted:
        if role == "system" and merged and merged[-1]["role"] != "system":
            raise InvalidInputError(
                f"messages[{index}] is a system message after other turns; many chat templates "
                "accept a system message only at the start: move it to messages[0]"
            )
        # Tool results, and turns carrying tool calls, stay their own turns.
        joins = (
            merged
            and merged[-1]["role"] == role
            and role != "tool"
            and not extra
            and "tool_calls" not in merged[-1]
        )
        if not joins:
            close()
            merged.append({"role": role, "content": [], **extra})
            pieces = None
        target = merged[-1]["content"]
        for j, part in enumerate(parts):
            if j == 0 and part["type"] == "text" and pieces is not None:  # a seam
                pieces.append(part["text"])
                continue
            close()
            target.append(part)
            pieces = [part["text"]] if part["type"] == "text" else None
    close()
    return merged


def _join_texts(pieces: list[str]) -> str:
    """Join text parts that meet at seams: a blank line between two non-empty texts."""
    return "\n\n".join(p for p in pieces if p)


def _copy_message(message: Mapping[str, Any]) -> dict[str, Any]:
    copied = dict(message)
    content = copied.get("content")
    if isinstance(content, (list, tuple)):
        copied["content"] = [dict(p) if isinstance(p, Mapping) else p for p in content]
    return copied

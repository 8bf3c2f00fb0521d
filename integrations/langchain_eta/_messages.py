"""Pure converters between LangChain messages and eta-guard's OpenAI-style message dicts.

Every function here is small, pure (never edits its input) and tested with tables in
``tests/test_langchain_messages.py``. Images are read through ``message.content_blocks``, so
v1 ``image`` blocks, OpenAI ``image_url`` blocks and v0 (``source_type``) blocks all arrive
in one shape. Decoding and the remote-URL policy stay in the engine.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.prompt_values import PromptValue

from eta_guard.errors import InvalidInputError

_ROLES = {
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
}


def role_of(message: BaseMessage) -> str:
    """The engine role (``"system" | "user" | "assistant" | "tool"``) of a LangChain message."""
    if isinstance(message, ChatMessage):
        role = _ROLES.get(message.role)
    else:
        role = _ROLES.get(message.type)
    if role is None:
        kind = message.role if isinstance(message, ChatMessage) else message.type
        raise InvalidInputError(
            f"message of type {kind!r} is not supported: ETAChatModel takes system, human, ai "
            "and tool messages"
        )
    return role


def is_local_source(url: str) -> bool:
    """Whether an image URL points at the local file system (a path or a ``file:`` URL)."""
    return not url.strip()[:16].lower().startswith(("data:", "http://", "https://"))


def check_url(url: str, *, allow_local_files: bool) -> str:
    """``url`` itself, or an error when it names a local file and those are not allowed."""
    if not allow_local_files and is_local_source(url):
        raise InvalidInputError(
            f"image url {_short_text(url)} is not a data: or http(s) URL; local image files "
            "are refused by default (messages may come from untrusted clients). Pass "
            "allow_local_image_files=True to read them, or send the image as base64"
        )
    return url


def image_block_to_part(
    block: dict[str, Any], *, allow_local_files: bool = False
) -> dict[str, Any]:
    """A LangChain v1 ``image`` content block as an engine ``{"type": "image", "image": ...}`` part.

    Base64 data becomes a data URL (raw base64 when there is no MIME type). URLs pass as they
    are (the engine refuses remote ones unless allowed); local paths and ``file:`` URLs are
    refused unless ``allow_local_files``.
    """
    if block.get("base64"):
        mime = block.get("mime_type")
        data = block["base64"]
        return {"type": "image", "image": f"data:{mime};base64,{data}" if mime else data}
    if block.get("url"):
        return {
            "type": "image",
            "image": check_url(block["url"], allow_local_files=allow_local_files),
        }
    if block.get("file_id"):
        raise InvalidInputError(
            f"image block with file_id={block['file_id']!r} cannot be resolved locally; "
            "pass the image as base64 data or a data URL"
        )
    raise InvalidInputError(f"image block has no 'base64' or 'url' data: {_short(block)}")


def block_to_part(
    block: dict[str, Any], *, role: str, allow_local_files: bool = False
) -> dict[str, Any] | None:
    """One standard content block as an engine content part; ``None`` for blocks with no text.

    User and tool turns keep text and images (an image a tool returns is an input image, checked
    like any other). Assistant and system turns keep text only (reasoning and tool-call blocks
    carry no answer text; an AI message's calls travel as ``tool_calls``). Anything else is
    refused, never silently dropped.
    """
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text", "")}
    if role == "assistant" and kind in ("reasoning", "tool_call", "tool_call_chunk"):
        return None
    value = block.get("value")
    if role == "assistant" and kind == "non_standard" and isinstance(value, dict):
        if value.get("type") == "tool_use":  # Anthropic-style: the call is in tool_calls
            return None
    if role in ("user", "tool") and (part := _image_part(block, allow_local_files)) is not None:
        return part
    raise InvalidInputError(
        f"content block of type {kind!r} is not supported in a {role} message "
        f"({_short(block)}); ETAChatModel takes text and image blocks"
    )


def message_to_dict(message: BaseMessage, *, allow_local_files: bool = False) -> dict[str, Any]:
    """One LangChain message as an engine dict ``{"role": ..., "content": [parts]}``."""
    role = role_of(message)
    parts = [
        p
        for b in message.content_blocks
        if (p := block_to_part(dict(b), role=role, allow_local_files=allow_local_files))
    ]
    out: dict[str, Any] = {"role": role, "content": parts}
    if isinstance(message, AIMessage) and message.tool_calls:
        out["tool_calls"] = [tool_call_to_dict(c) for c in message.tool_calls]
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
    return out


def tool_call_to_dict(call: Any) -> dict[str, Any]:
    """A LangChain ``ToolCall`` as an engine call ``{"id", "type", "function": {"name", "arguments"}}``."""
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": call["name"], "arguments": dict(call.get("args") or {})},
    }
    if call.get("id"):
        out["id"] = call["id"]
    return out


def merge_consecutive(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge runs of same-role messages into one turn (adjacent texts joined by a blank line)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if (
            merged
            and merged[-1]["role"] == message["role"]
            and message["role"] != "tool"  # each tool result answers its own call
            and not ({"tool_calls", "tool_call_id"} & (merged[-1].keys() | message.keys()))
        ):
            merged[-1] = {
                "role": message["role"],
                "content": _join(merged[-1]["content"], message["content"]),
            }
        else:
            merged.append({**message, "content": list(message["content"])})
    return merged


def to_engine_messages(
    messages: Sequence[BaseMessage], *, allow_local_files: bool = False
) -> list[dict[str, Any]]:
    """LangChain messages as the engine's message list (same-role runs merged, empty turns dropped)."""
    converted = [message_to_dict(m, allow_local_files=allow_local_files) for m in messages]
    kept = [m for m in converted if m["content"] or m.get("tool_calls") or m["role"] == "tool"]
    return merge_consecutive(kept)


def as_messages(value: Any) -> list[BaseMessage]:
    """Any chat-model input (str, PromptValue, message, list of message-likes) as a message list."""
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, str):
        return [HumanMessage(content=value)]
    if isinstance(value, BaseMessage):
        return [value]
    try:
        return convert_to_messages(value)
    except Exception as e:
        raise InvalidInputError(
            f"expected a str, a PromptValue or a list of messages, got {type(value).__name__}"
        ) from e


def image_sources(
    messages: Sequence[BaseMessage], *, allow_local_files: bool = False
) -> list[tuple[int, int, str]]:
    """``(message index, block index, image source)`` for every image in ``messages``, in order.

    The block index refers to ``message.content_blocks``. Every message is read, system and
    AI messages included: a guarded chat model may see images in any of them.
    """
    found = []
    for i, message in enumerate(messages):
        for j, block in enumerate(message.content_blocks):
            part = _image_part(dict(block), allow_local_files)
            if part is not None:
                found.append((i, j, part["image"]))
            else:
                refuse_unscored_media(dict(block), where=f"messages[{i}] block {j}")
    return found


#: Block types that carry no media a model could see (text, reasoning, tool calls).
_NO_MEDIA = frozenset(
    {
        "text",
        "text-plain",
        "reasoning",
        "tool_call",
        "tool_call_chunk",
        "invalid_tool_call",
        "server_tool_call",
        "server_tool_call_chunk",
        "server_tool_result",
    }
)
_MEDIA_WORDS = ("image", "video", "audio", "file", "media", "document", "inline", "blob")


def refuse_unscored_media(block: dict[str, Any], *, where: str) -> None:
    """Raise for a block a downstream model could see that the guard cannot score.

    The guard scores images (CLIP). Video, audio, non-image files, and provider-specific media
    blocks that are not recognisably an image would reach the model unchecked, so they are
    refused. Video is not split into frames here: which frames a model samples is the model's
    choice, so a guard scoring some could miss the one shown; send the frames as images.

    Raises:
        InvalidInputError: ``block`` holds media other than an image.
    """
    kind = str(block.get("type", ""))
    if kind in _NO_MEDIA:
        return
    if kind == "file" and str(block.get("mime_type", "")).lower().startswith("text/"):
        return  # text: the model reads it as text, and the input guard checks images only
    if kind == "non_standard" and not _looks_like_media(block.get("value")):
        return
    hint = (
        "; a video's frames are images: send the frames the model should see as image blocks"
        if "video" in repr(block).lower()[:2000]
        else ""
    )
    raise InvalidInputError(
        f"{where}: a content block of type {_short_text(kind)} ({_short(block)}) holds media the "
        "ETA guard cannot score (it checks images); it is refused rather than passed to the "
        f"model unchecked{hint}"
    )


_MEDIA_KEYS = frozenset(
    {"url", "uri", "data", "source", "bytes", "base64", "mime_type", "mimeType"}
)


def _looks_like_media(value: Any) -> bool:
    """Whether a provider-specific block's value may carry media (by its type and key names)."""
    if not isinstance(value, dict):
        return False
    if _MEDIA_KEYS & set(map(str, value)):
        return True
    words = " ".join([str(value.get("type", "")), *map(str, value)]).lower()
    return any(w in words for w in _MEDIA_WORDS)


def replace_images(
    messages: Sequence[BaseMessage], positions: set[tuple[int, int]], text: str
) -> list[BaseMessage]:
    """Copies of ``messages`` whose image blocks at ``positions`` are replaced by a text block."""
    return replace_blocks(messages, {p: {"type": "text", "text": text} for p in positions})


def replace_blocks(
    messages: Sequence[BaseMessage], blocks: dict[tuple[int, int], dict[str, Any]]
) -> list[BaseMessage]:
    """Copies of ``messages`` whose content blocks at ``(message, block)`` are ``blocks[...]``.

    Messages without a replaced block are returned as they are (same object).
    """
    out = []
    for i, message in enumerate(messages):
        hits = {j: block for (m, j), block in blocks.items() if m == i}
        if not hits:
            out.append(message)
            continue
        content = [hits.get(j, dict(b)) for j, b in enumerate(message.content_blocks)]
        out.append(message.model_copy(update={"content": content}))
    return out


def forwarded_block(base64_png: str, original: dict[str, Any] | None = None) -> dict[str, Any]:
    """The v1 image block that carries a scored image on to the model (PNG, base64)."""
    block: dict[str, Any] = {"type": "image", "base64": base64_png, "mime_type": "image/png"}
    if original and original.get("id"):
        block["id"] = original["id"]
    return block


def _image_part(block: dict[str, Any], allow_local_files: bool) -> dict[str, Any] | None:
    """The engine image part of an image-bearing block; ``None`` when it holds no image.

    Besides v1 ``image`` blocks: v1 ``file`` blocks with an image MIME type, and the
    ``non_standard`` wrappers of OpenAI's ``image_url`` (string form), Responses-API
    ``input_image`` and Google-style image ``media`` blocks, so that no image another chat
    model would see goes unchecked.
    """
    kind = block.get("type")
    if kind == "image" or (kind == "file" and str(block.get("mime_type", "")).startswith("image/")):
        return image_block_to_part(block, allow_local_files=allow_local_files)
    if kind == "file" and (mime := _sniffed_image_mime(block.get("base64"))) is not None:
        # Image bytes declared as application/octet-stream (or nothing): a model that sniffs
        # the bytes sees an image, so it is scored as one.
        return image_block_to_part({**block, "mime_type": mime}, allow_local_files=False)
    value = block.get("value") if kind == "non_standard" else None
    if not isinstance(value, dict):
        return None
    inline = value.get("inline_data") or value.get("inlineData")
    if isinstance(inline, dict):  # Gemini: {"inline_data": {"mime_type", "data"}}
        mime = str(inline.get("mime_type") or inline.get("mimeType") or "")
        if mime.startswith("image/"):
            return _media_part({**inline, "mime_type": mime}, allow_local_files)
        return None
    value_type = str(value.get("type", "")).lower()  # providers differ in case: "IMAGE_URL"
    if value_type == "media" and str(value.get("mime_type", "")).startswith("image/"):
        return _media_part(value, allow_local_files)
    if value_type not in ("image_url", "input_image"):
        return None
    url = value.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if isinstance(url, str) and url:
        return {"type": "image", "image": check_url(url, allow_local_files=allow_local_files)}
    if value.get("file_id"):
        return image_block_to_part({"file_id": value["file_id"]})  # raises: not resolvable here
    raise InvalidInputError(f"image block has no image_url: {_short(block)}")


#: Leading bytes of the image formats PIL reads that a model may sniff.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def _sniffed_image_mime(data: Any) -> str | None:
    """The image MIME type of base64 ``data`` judged by its first bytes, or ``None``."""
    if isinstance(data, (bytes, bytearray)):
        head = bytes(data[:16])
        try:
            head = base64.b64decode(head + b"=" * (-len(head) % 4))
        except ValueError:
            return None
    elif isinstance(data, str) and data:
        chunk = data.strip()[:16]
        try:
            head = base64.b64decode(chunk + "=" * (-len(chunk) % 4))
        except ValueError:
            return None
    else:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _IMAGE_MAGIC if head.startswith(magic)), None)


def _media_part(value: dict[str, Any], allow_local_files: bool) -> dict[str, Any]:
    """A Google-style ``{"type": "media", "mime_type": "image/...", "data" | "file_uri"}`` image."""
    data = value.get("data")
    if isinstance(data, (bytes, bytearray)):
        data = base64.b64encode(bytes(data)).decode("ascii")
    if isinstance(data, str) and data:
        return {"type": "image", "image": f"data:{value['mime_type']};base64,{data}"}
    uri = value.get("file_uri")
    if isinstance(uri, str) and uri:
        return {"type": "image", "image": check_url(uri, allow_local_files=allow_local_files)}
    raise InvalidInputError(f"media block has no 'data' or 'file_uri': {_short(value)}")


def _join(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if left and right and left[-1]["type"] == "text" and right[0]["type"] == "text":
        joined = {"type": "text", "text": left[-1]["text"] + "\n\n" + right[0]["text"]}
        return [*left[:-1], joined, *right[1:]]
    return [*left, *right]


def _short_text(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _short(block: dict[str, Any]) -> str:
    text = repr({k: v for k, v in block.items() if k != "id"})
    return text if len(text) <= 120 else text[:117] + "..."

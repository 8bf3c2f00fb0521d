"""Wire format -> engine input: OpenAI messages and moderation inputs, checked part by part.

Only ``text`` and ``image_url`` parts travel; an image URL must be a ``data:`` URL, or
``http(s)://`` when the server's ``ETAConfig.allow_remote_images`` is on. Local paths,
``file://`` URLs and bare base64 are refused here, before the engine (which refuses local files
too: the server always runs it with ``allow_local_image_files=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eta_guard.errors import InvalidInputError
from eta_guard.limits import check_encodable
from eta_guard.server.errors import bad_request
from eta_guard.server.schemas import ChatMessage


def chat_messages(messages: list[ChatMessage], *, allow_remote: bool) -> list[dict[str, Any]]:
    """The engine's OpenAI-style messages (``developer`` is a system turn).

    An assistant turn may carry ``tool_calls`` (then its content may be null), a tool turn its
    ``tool_call_id``; their shapes are checked by the engine (``normalize_messages``). A tool
    result's images are input images like any other: the engine pre-checks them.
    """
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = "system" if message.role == "developer" else message.role
        calls = message.tool_calls if role == "assistant" else None
        if message.tool_calls is not None and role != "assistant":
            raise bad_request(
                f"{where} has tool_calls but role {role!r}; only the assistant calls tools",
                param=f"{where}.tool_calls",
            )
        if message.content is None and not calls:
            raise bad_request(f"{where}.content is missing", param=f"{where}.content")
        if message.content is None:
            content: str | list[dict[str, Any]] = ""
        elif isinstance(message.content, str):
            content = message.content
        else:
            content = [
                _part(f"{where}.content[{j}]", part, allow_remote=allow_remote)
                for j, part in enumerate(message.content)
            ]
        turn: dict[str, Any] = {"role": role, "content": content}
        if calls:
            turn["tool_calls"] = calls
        if role == "tool":
            if not message.tool_call_id:
                raise bad_request(
                    f"{where} is a tool result without a tool_call_id",
                    param=f"{where}.tool_call_id",
                )
            turn["tool_call_id"] = message.tool_call_id
        out.append(turn)
    return out


@dataclass
class ModerationItem:
    """One moderation input: its text (for the RM) and image URLs (for CLIP)."""

    text: str | None = None
    images: list[str] = field(default_factory=list)


def moderation_items(value: Any, *, allow_remote: bool, max_items: int) -> list[ModerationItem]:
    """A string -> one item; a list of strings -> one item each; a list of parts -> one item."""
    if isinstance(value, str):
        items = [ModerationItem(text=value)]
    elif value and all(isinstance(v, str) for v in value):
        items = [ModerationItem(text=v) for v in value]
    elif value:
        item = ModerationItem()
        texts = []
        for j, raw in enumerate(value):
            part = _part(f"input[{j}]", raw, allow_remote=allow_remote)
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                item.images.append(part["image_url"]["url"])
        item.text = "\n".join(texts) if texts else None
        items = [item]
    else:
        raise bad_request("input is empty: pass a string, strings, or text/image_url parts")
    if len(items) > max_items:
        raise bad_request(
            f"input has {len(items)} items; this server accepts at most {max_items} per request",
            param="input",
        )
    for i, item in enumerate(items):
        # Checked before queueing: the reward model cannot encode it, and a failure there would
        # count as "not judged" under fail_open (and take the whole batch with it).
        if item.text is not None:
            where = "input" if isinstance(value, str) else f"input[{i}]"
            try:
                check_encodable(item.text, what=where)
            except InvalidInputError as e:
                raise bad_request(str(e), param=where, code="invalid_text") from e
    return items


def _part(where: str, part: Any, *, allow_remote: bool) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be an object with a 'type'", param=where)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}.text must be a string", param=where)
        return {"type": "text", "text": text}
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str):
            raise bad_request(f"{where}.image_url.url must be a string", param=where)
        _check_url(where, url, allow_remote=allow_remote)
        return {"type": "image_url", "image_url": {"url": url}}
    shown = kind if isinstance(kind, str) and len(kind) <= 40 else "?"
    raise bad_request(
        f"{where}.type {shown!r} is not supported; use 'text' or 'image_url'", param=where
    )


def _check_url(where: str, url: str, *, allow_remote: bool) -> None:
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        return
    if scheme in ("http", "https"):
        if allow_remote:
            return
        raise bad_request(
            f"{where}: image URLs are not fetched by this server; send the image inline as a "
            "data: URL (base64)",
            param=where,
            code="remote_images_disabled",
        )
    raise bad_request(
        f"{where}: an image must be a data: URL" + (" or an http(s) URL" if allow_remote else ""),
        param=where,
    )

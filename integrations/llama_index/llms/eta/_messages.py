"""Pure converters between LlamaIndex objects and eta-guard's engine (no model, no I/O).

LlamaIndex -> engine: ``ChatMessage`` lists become OpenAI-style message dicts; ``ImageBlock`` /
``ImageNode`` / ``ImageDocument`` become image sources the engine decodes and checks itself
(so bad images fail there, with :class:`~eta_guard.errors.InvalidInputError`). Nothing here
reads a file or fetches a URL: remote URLs are passed on as strings and the engine refuses them
unless ``allow_remote_images`` is set.

Engine -> LlamaIndex: an ``ETAResult`` becomes the ``additional_kwargs`` / ``raw`` of a response,
and :class:`StreamAccumulator` turns engine chunks into ``ChatResponse`` chunks (``delta`` new
text, ``message.content`` the text so far).
"""

from __future__ import annotations

import base64
import binascii
import pathlib
from collections.abc import Iterable, Sequence
from io import IOBase
from typing import Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    CitableBlock,
    CitationBlock,
    CompletionResponse,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import ValidationError
from llama_index.core.schema import ImageDocument, ImageNode
from llama_index.llms.eta._tools import answer_message

from eta_guard.config import ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.tools.streaming import ContentStream

#: LlamaIndex roles -> the engine's roles. Tool turns answer an assistant's ``ToolCallBlock``
#: (their images are pre-checked like any other); legacy ``function`` turns are refused.
ROLE_MAP: dict[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
}
#: Blocks that carry no content for the model (prompt-cache hints, hidden reasoning).
_IGNORED_BLOCKS = (CachePoint, ThinkingBlock)

#: ``ETAConfig`` fields a caller may set per call (``llm.chat(msgs, pre_threshold=0.2)``).
CONFIG_KEYS = frozenset(ETAConfig.model_fields)


# ---------------------------------------------------------------------------- images in
def image_block_source(block: ImageBlock) -> Any:
    """The image source the engine should load for ``block`` (bytes, a path or a URL string).

    ``ImageBlock`` stores inline data base64-encoded (its validator re-encodes raw bytes), so
    inline data is decoded back to the image file's bytes here.
    """
    if block.image is not None:
        return _inline_bytes(block.image)
    if block.path is not None:
        return pathlib.Path(block.path)
    if block.url is not None:
        return str(block.url)
    raise InvalidInputError("ImageBlock has no image data, path or url; set one of them")


def is_image_node(node: Any) -> bool:
    """An ``ImageNode``, or an ``ImageDocument`` that holds an image."""
    if isinstance(node, ImageNode):
        return True
    return isinstance(node, ImageDocument) and bool(node.image or node.image_path or node.image_url)


def image_node_source(node: Any) -> Any:
    """The image source of an ``ImageNode`` / ``ImageDocument`` (or an ``ImageBlock``).

    Unlike ``ImageNode.resolve_image()`` this never downloads ``image_url``.
    """
    if isinstance(node, ImageBlock):
        return image_block_source(node)
    if not isinstance(node, (ImageNode, ImageDocument)):
        raise InvalidInputError(
            f"expected an ImageNode, ImageDocument or ImageBlock, got {type(node).__qualname__}"
        )
    if node.image:
        return node.image  # base64 text: the engine decodes it
    if node.image_path:
        return pathlib.Path(node.image_path)
    if node.image_url:
        return node.image_url
    raise InvalidInputError(f"ImageNode {node.node_id!r} has no image, image_path or image_url")


def to_image_block(image: Any) -> ImageBlock:
    """An ``ImageBlock`` for ``image``: an ImageBlock, ImageNode/ImageDocument, path, bytes or
    URL/base64 string (used for ``complete(..., image_documents=[...])``)."""
    if isinstance(image, ImageBlock):
        return image
    if isinstance(image, (ImageNode, ImageDocument)):
        mimetype = image.image_mimetype
        if image.image:
            return _make_block(image=image.image.encode("utf-8"), image_mimetype=mimetype)
        if image.image_path:
            return _make_block(path=image.image_path, image_mimetype=mimetype)
        if image.image_url:
            return _make_block(url=image.image_url, image_mimetype=mimetype)
        return to_image_block(image_node_source(image))  # raises: the node holds no image
    if isinstance(image, pathlib.Path):
        return _path_block(image)
    if isinstance(image, (bytes, bytearray)):
        return _make_block(image=bytes(image))
    if isinstance(image, str):
        return _block_of(image)
    raise InvalidInputError(
        f"unsupported image {type(image).__qualname__}; pass ImageBlock, ImageNode/ImageDocument, "
        "pathlib.Path, bytes, or a str path / data URL / base64"
    )


def _make_block(**fields: Any) -> ImageBlock:
    """An ``ImageBlock``, with LlamaIndex's validation errors turned into ``InvalidInputError``."""
    if fields.get("path") is not None:
        return _path_block(fields.pop("path"), **fields)
    try:
        return ImageBlock(**fields)
    except ValidationError as e:
        raise InvalidInputError(f"cannot make an ImageBlock from {_short(fields)}: {e}") from e


def _path_block(path: Any, **fields: Any) -> ImageBlock:
    """An ``ImageBlock`` naming a local file, without touching the file system.

    ``ImageBlock(path=...)`` validates that the file exists, and its error would tell a caller
    that it does not: the engine reads the file later, under the adapter's local-file policy,
    with one neutral message for every refused or unreadable path.
    """
    return ImageBlock.model_construct(path=pathlib.Path(path), **fields)


def _short(fields: dict[str, Any]) -> str:
    return ", ".join(f"{k}={str(v)[:60]!r}" for k, v in fields.items() if v is not None)


def _block_of(text: str) -> ImageBlock:
    if text.startswith(("data:", "http://", "https://", "file://")):
        return _make_block(url=text)
    if _looks_like_base64(text):
        return _make_block(image=text.encode("ascii"))
    # A path string stays a string: it may come from message text, so the engine reads it
    # only under the local-file policy (an application's pathlib.Path is read by default).
    return ImageBlock.model_construct(url=text)  # no validation, no existence check


def _looks_like_base64(text: str) -> bool:
    if len(text) < 16:
        return False
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _inline_bytes(data: bytes | IOBase) -> bytes:
    if isinstance(data, IOBase):
        data.seek(0)
        raw = data.read()
        if not isinstance(raw, bytes):
            raise InvalidInputError("ImageBlock.image stream must be opened in binary mode")
        return raw
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return bytes(data)  # not base64 (e.g. built with model_construct): raw file bytes


# ---------------------------------------------------------------------------- messages in
def block_to_parts(block: Any, *, where: str) -> list[dict[str, Any]]:
    """Engine content parts for one LlamaIndex content block (``[]`` for content-free blocks)."""
    if isinstance(block, TextBlock):
        return [{"type": "text", "text": block.text}] if block.text else []
    if isinstance(block, ImageBlock):
        return [{"type": "image", "image": image_block_source(block)}]
    if isinstance(block, _IGNORED_BLOCKS):
        return []
    if isinstance(block, CitableBlock):
        return [
            p
            for i, b in enumerate(block.content)
            for p in block_to_parts(b, where=f"{where}.content[{i}]")
        ]
    if isinstance(block, CitationBlock):
        return block_to_parts(block.cited_content, where=f"{where}.cited_content")
    kind = getattr(block, "block_type", type(block).__qualname__)
    raise InvalidInputError(
        f"{where} is a {kind!r} block; ETAMultiModalLLM accepts text and image blocks only "
        "(audio, video, documents and tool calls are not supported)"
    )


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI-style engine messages for LlamaIndex ``messages`` (order and images kept)."""
    if isinstance(messages, (ChatMessage, str, bytes)) or not isinstance(messages, Iterable):
        raise InvalidInputError(
            f"messages must be a list of ChatMessage, got {type(messages).__qualname__}"
        )
    out = []
    for i, message in enumerate(list(messages)):
        if not isinstance(message, ChatMessage):
            raise InvalidInputError(
                f"messages[{i}] is {type(message).__qualname__}, expected llama_index ChatMessage"
            )
        role = ROLE_MAP.get(message.role)
        if role is None:
            raise InvalidInputError(
                f"messages[{i}] has role {message.role.value!r}; ETAMultiModalLLM accepts "
                f"{sorted({r.value for r in ROLE_MAP})}"
            )
        calls = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
        if calls and role != "assistant":
            raise InvalidInputError(
                f"messages[{i}] has tool calls but role {message.role.value!r}; only the "
                "assistant calls tools"
            )
        parts = [
            p
            for j, b in enumerate(message.blocks)
            if not isinstance(b, ToolCallBlock)
            for p in block_to_parts(b, where=f"messages[{i}].blocks[{j}]")
        ]
        turn: dict[str, Any] = {"role": role, "content": _simplify(parts)}
        if calls:
            turn["tool_calls"] = [_engine_call(c) for c in calls]
        if role == "tool":
            call_id = message.additional_kwargs.get("tool_call_id")
            if call_id is not None:
                turn["tool_call_id"] = call_id
        out.append(turn)
    return out


def _engine_call(block: ToolCallBlock) -> dict[str, Any]:
    """One ``ToolCallBlock`` as an OpenAI call (the engine checks its arguments)."""
    call: dict[str, Any] = {
        "type": "function",
        "function": {"name": block.tool_name, "arguments": block.tool_kwargs},
    }
    if block.tool_call_id:
        call["id"] = block.tool_call_id
    return call


def refuse_animated_images(messages: list[dict[str, Any]], *, allow_local_files: bool) -> None:
    """Raise ``InvalidInputError`` when an image of engine ``messages`` is animated.

    The engine decodes one frame, the same for CLIP and the VLM; refusing animations keeps the
    rule of every adapter: each frame a model could see is scored, or the image is refused.
    """
    from eta_guard.scored_images import refuse_animated

    for i, message in enumerate(messages):
        content = message["content"]
        for j, part in enumerate(content if isinstance(content, list) else []):
            if part["type"] == "image":
                try:
                    refuse_animated(part["image"], allow_local_files=allow_local_files)
                except InvalidInputError as e:
                    raise InvalidInputError(f"messages[{i}] image {j}: {e}") from e


def _simplify(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A plain string when the message is text only (joined like ``ChatMessage.content``)."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def completion_messages(prompt: str, images: Iterable[Any] | None = None) -> list[ChatMessage]:
    """The one user turn that ``complete(prompt, image_documents=...)`` sends."""
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a str, got {type(prompt).__qualname__}")
    if isinstance(images, (str, bytes, pathlib.Path, ImageBlock, ImageNode, ImageDocument)):
        images = [images]
    if images is not None and not isinstance(images, Iterable):
        raise InvalidInputError(
            f"image_documents must be a list of images, got {type(images).__qualname__}"
        )
    blocks: list[Any] = [to_image_block(image) for image in images or []]
    return [ChatMessage(role=MessageRole.USER, blocks=[*blocks, TextBlock(text=prompt)])]


def split_call_kwargs(
    kwargs: dict[str, Any], *, max_new_tokens: int | None
) -> tuple[list[str] | None, dict[str, Any]]:
    """``(stop, overrides)`` from a call's keyword arguments.

    ``overrides`` are ``ETAConfig`` fields for this call only; ``max_new_tokens`` is the LLM's
    own default when the call does not set it. Anything else is refused by name.
    """
    unknown = sorted(set(kwargs) - CONFIG_KEYS - {"stop"})
    if unknown:
        raise InvalidInputError(
            f"unknown keyword argument(s) {unknown}; pass stop=[...] or ETAConfig fields such as "
            "max_new_tokens, pre_threshold, post_threshold, num_candidates, seed"
        )
    overrides = {k: v for k, v in kwargs.items() if k != "stop"}
    if max_new_tokens is not None:
        overrides.setdefault("max_new_tokens", max_new_tokens)
    stop = kwargs.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    return stop, overrides


def config_overrides(base: ETAConfig, wanted: ETAConfig | None) -> dict[str, Any]:
    """Fields of ``wanted`` that differ from ``base`` (a ready engine used with another config)."""
    if wanted is None or wanted is base:
        return {}
    mine, theirs = wanted.model_dump(), base.model_dump()
    return {k: v for k, v in mine.items() if theirs.get(k) != v}


# ---------------------------------------------------------------------------- results out
def result_kwargs(result: Any) -> dict[str, Any]:
    """``additional_kwargs`` for a response carrying an ``ETAResult``.

    ``eta_verdict`` is the verdict as a dict, ``eta_aligned`` whether ETA re-decoded the
    answer; token counts use the names LlamaIndex's token counter reads.
    """
    usage = result.usage
    return {
        "eta_verdict": result.verdict.model_dump(),
        "eta_aligned": result.aligned,
        "finish_reason": result.finish_reason,
        "model_name": result.model_name,
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


class StreamAccumulator:
    """Turns engine stream chunks into ``ChatResponse`` chunks.

    ``delta`` is the chunk's new text, ``message.content`` the text so far. The chunk that
    carries the engine's ``ETAResult`` (the last one) also carries the verdict in
    ``additional_kwargs`` and the full result as a dict in ``raw``.

    With ``tool_parser`` (tools offered), the words stream but nothing that may begin a call
    (:class:`eta_guard.tools.streaming.ContentStream`); the last chunk's message holds the calls
    as ``ToolCallBlock``s, judged with the answer (none when ETA aligned).
    """

    def __init__(self, tool_parser: str | None = None) -> None:
        self.text = ""
        self.tool_parser = tool_parser
        self._content = ContentStream(tool_parser) if tool_parser else None

    def push(self, chunk: Any) -> ChatResponse:
        result = chunk.result
        delta = chunk.text if self._content is None else self._content.feed(chunk.text)
        message = None
        kwargs = {} if result is None else result_kwargs(result)
        if result is not None and self._content is not None and self.tool_parser:
            message, extra = answer_message(result, self.tool_parser)
            delta += self._content.finish(message.content or "")
            kwargs.update(extra)
        self.text += delta
        return ChatResponse(
            message=message or ChatMessage(role=MessageRole.ASSISTANT, content=self.text),
            delta=delta,
            raw=None if result is None else result.model_dump(),
            additional_kwargs=kwargs,
        )


def final_chat(last: ChatResponse | None) -> ChatResponse:
    """The non-streaming answer: the last streamed chunk, without a ``delta``."""
    if last is None:  # the engine always ends with a result chunk
        raise RuntimeError("the ETA engine stream ended without a result")
    return ChatResponse(
        message=last.message, raw=last.raw, additional_kwargs=last.additional_kwargs
    )


def to_completion(chat: ChatResponse) -> CompletionResponse:
    """The ``CompletionResponse`` twin of a chat response (``delta`` kept)."""
    return CompletionResponse(
        text=chat.message.content or "",
        delta=chat.delta,
        raw=chat.raw,
        additional_kwargs=chat.additional_kwargs,
    )

"""Reading a command's non-model input: the ETAConfig (``--config``, ``--set``), images, messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eta_guard.errors import InvalidInputError

if TYPE_CHECKING:
    from eta_guard.config import ETAConfig


def load_config(path: Path | None, sets: list[str] | None) -> ETAConfig:
    from eta_guard.config import ETAConfig

    cfg = ETAConfig.load(path) if path is not None else ETAConfig()
    overrides: dict[str, Any] = {}
    for item in sets or []:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise InvalidInputError(f"--set expects FIELD=VALUE (e.g. --set seed=0); got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        overrides[name.strip()] = value
    return cfg.with_overrides(**overrides)


def load_images(sources: list[str], cfg: ETAConfig) -> list[Any]:
    """Decode and check the images before any model loads, so bad input fails fast."""
    from eta_guard.media import image_options
    from eta_guard.media import load_images as load

    if not sources:
        return []
    return load(sources, **image_options(cfg))


def chat_messages(question: str, images: list[Any], system: str | None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages

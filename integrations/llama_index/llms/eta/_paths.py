"""Reading the application's own image paths (``ImageBlock(path=...)``, ``ImageNode.image_path``).

LlamaIndex passes a local image as ``ImageBlock(path=...)``: a ``pathlib.Path`` the
application set, which LlamaIndex's other multimodal LLMs read. Strings are different: a
``file:`` URL or a path string may have come from a user's text, so strings keep the
local-file policy (refused unless ``allow_local_image_files=True``). The converters keep the
two apart (an application path stays a ``pathlib.Path``, a string stays a ``str``); this module
decodes the paths, once, into the image the engine then scores and sends (so CLIP and the VLM
still see the same pixels).
"""

from __future__ import annotations

import pathlib
from typing import Any

from eta_guard.errors import InvalidInputError


def read_application_paths(messages: list[dict[str, Any]], config: Any) -> list[dict[str, Any]]:
    """``messages`` with every ``pathlib.Path`` image part decoded (under ``config``'s pixel
    limit, animations refused); string sources are left to the engine's local-file policy."""
    from eta_guard.media import load_image
    from eta_guard.scored_images import refuse_animated

    out = []
    for i, message in enumerate(messages):
        content = message["content"]
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            source = part.get("image") if part["type"] == "image" else None
            if isinstance(source, pathlib.Path):
                try:
                    refuse_animated(source, allow_local_files=True)
                    image = load_image(
                        source, allow_local_files=True, max_pixels=config.max_image_pixels
                    )
                except InvalidInputError as e:
                    raise InvalidInputError(f"messages[{i}] image {j}: {e}") from e
                part = {**part, "image": image}
            parts.append(part)
        out.append({**message, "content": parts})
    return out

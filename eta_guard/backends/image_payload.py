"""Images as an OpenAI-compatible engine receives them: a PNG data URL and its content hash."""

from __future__ import annotations

import base64
import hashlib
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def png_data_url(image: Image.Image) -> tuple[str, str]:
    """``(data URL, "sha256-<hex>")`` of ``image`` saved as PNG (lossless: the engine decodes the
    pixels that were scored). The hash is what vLLM keys its multimodal cache on (``uuid``)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    url = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return url, "sha256-" + hashlib.sha256(data).hexdigest()


__all__ = ["png_data_url"]

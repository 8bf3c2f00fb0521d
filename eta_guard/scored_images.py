"""Images that a guard scores and then forwards: the model gets exactly the pixels scored.

A guard in front of another model (LangChain ``ETAInputGuard`` and ``ETAGuardMiddleware``,
LlamaIndex ``ETAImageSafetyPostprocessor``) decodes each image once with
:func:`eta_guard.media.load_image` (all its checks and limits; EXIF orientation applied, alpha
dropped as the reference drops it), scores that RGB image, and forwards it re-encoded as a metadata-free PNG.
The original bytes never reach the model, so neither transparency (one decoder composites it on white,
another drops it), an ICC profile, a second animation frame, nor a file or URL that
changes after the check can show the model anything that was not scored.

Animated images (GIF, APNG, animated WebP, multi-page TIFF) are refused with
:class:`~eta_guard.errors.InvalidInputError` rather than cut to their first frame. A multi-picture
JPEG (MPO, as some cameras write) is taken as its primary picture, as JPEG decoders do. A remote
image (only with ``allow_remote=True``) is fetched once; only its decoded first frame is scored
and forwarded, so its other frames never reach the model either.
"""

from __future__ import annotations

import base64
import hashlib
import io
import pathlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eta_guard.errors import InvalidInputError
from eta_guard.limits import RequestLimits
from eta_guard.media import (
    ImageSource,
    file_url_to_path,
    image_options,
    is_existing_path,
    load_image,
    openable_formats,
    parse_data_url,
    try_b64decode,
)

if TYPE_CHECKING:
    from PIL import Image

#: MIME type of every forwarded image.
FORWARD_MIME = "image/png"
# zlib level of the forwarded PNG: 1 encodes several times faster than the default 6 for a
# slightly larger file (lossless either way; see docs/architecture.md for the numbers).
_PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class ScoredImage:
    """One decoded image as it is scored and as it is forwarded.

    Attributes:
        image: The RGB image the evaluators score.
        png: That image encoded as PNG, with no metadata (no ICC profile, EXIF or text chunks).
    """

    image: Image.Image
    png: bytes

    @property
    def base64(self) -> str:
        """The PNG, base64-encoded."""
        return base64.b64encode(self.png).decode("ascii")

    @property
    def data_url(self) -> str:
        """The PNG as a ``data:image/png;base64,...`` URL."""
        return f"data:{FORWARD_MIME};base64,{self.base64}"

    @property
    def key(self) -> str:
        """The content key of the forwarded image (:func:`content_key` of :attr:`data_url`)."""
        return content_key(self.data_url) or ""


def content_key(source: Any) -> str | None:
    """A SHA-256 key of an inline image source; ``None`` when the source is not inline.

    Inline sources are ``bytes`` and data URL / base64 strings: their content is the key, so
    that a verdict cached under it belongs to exactly these bytes. Paths and URLs name content
    that can change, and PIL images are mutable: they get no key (always load them again).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "b:" + hashlib.sha256(bytes(source)).hexdigest()
    if isinstance(source, str):
        lowered = source.lstrip()[:16].lower()
        if lowered.startswith(("http://", "https://", "file:")) or _looks_like_path(source):
            return None
        return "s:" + hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
    return None


def load_scored_image(source: ImageSource, **options: Any) -> ScoredImage:
    """Decode ``source`` as :func:`~eta_guard.media.load_image` does and prepare it to forward.

    ``options`` are ``load_image``'s (see :func:`scored_options`). Local files are off by
    default here: guards read sources from untrusted messages.

    Raises:
        InvalidInputError: The source is refused by :func:`~eta_guard.media.load_image`, or it
            is an animated image.
    """
    options.setdefault("allow_local_files", False)
    image = load_still_image(source, **options)
    return ScoredImage(image=image, png=_png(image))


def load_still_image(source: ImageSource, **options: Any) -> Image.Image:
    """:func:`~eta_guard.media.load_image`, refusing animated images (see the module docstring).

    Raises:
        InvalidInputError: As ``load_image``, or the image is animated.
    """
    image = load_image(source, **options)
    refuse_animated(source, allow_local_files=options.get("allow_local_files", True))
    return image


def refuse_animated(source: Any, *, allow_local_files: bool) -> None:
    """Raise when ``source`` is an animated image; reads headers only, decodes no pixels.

    Sources that cannot be opened here pass: decoding them (``load_image``) reports why.

    Raises:
        InvalidInputError: The image has several frames.
    """
    frames = _animated_frames(source, allow_local_files)
    if frames:
        raise InvalidInputError(
            f"the image is animated ({frames}); animated images are refused because every frame "
            "would have to be checked: send one frame as a PNG or JPEG"
        )


def load_scored_images(sources: Sequence[ImageSource], **options: Any) -> list[ScoredImage]:
    """:func:`load_scored_image` for each source; errors start with ``image N:``."""
    out = []
    for index, source in enumerate(sources):
        try:
            out.append(load_scored_image(source, **options))
        except InvalidInputError as e:
            raise InvalidInputError(f"image {index}: {e}") from e
    return out


def load_request_images(
    sources: Sequence[ImageSource], config: Any, *, allow_local_files: bool
) -> list[ScoredImage]:
    """One request's images, under its limits (``ETAConfig``): image count checked before any
    decoding, total pixels charged from each header before it is decoded.

    Raises:
        InvalidInputError: Too many images or pixels, or an image is refused.
    """
    limits = RequestLimits.from_config(config)
    limits.check_image_count(len(sources))
    with limits.pixel_budget():
        return load_scored_images(
            sources, **scored_options(config, allow_local_files=allow_local_files)
        )


def scored_options(config: Any, *, allow_local_files: bool) -> dict[str, Any]:
    """:func:`load_scored_image` options from an ``ETAConfig`` and the adapter's file policy."""
    return {**image_options(config), "allow_local_files": allow_local_files}


# --------------------------------------------------------------------------- internals


def _png(image: Image.Image) -> bytes:
    clean = image.copy()
    clean.info = {}  # an ICC profile or text chunk would ride along otherwise
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _looks_like_path(text: str) -> bool:
    return len(text) < 4096 and "\n" not in text and is_existing_path(text)


def _animated_frames(source: Any, allow_local_files: bool) -> str | None:
    """``"GIF with several frames"``-style text when ``source`` is animated, else ``None``.

    Takes the branch that ``load_image`` takes for the source, and only opens the header again.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return _describe_animation(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open_and_describe(io.BytesIO(bytes(source)))
    if isinstance(source, pathlib.Path):
        return _open_path_and_describe(source) if allow_local_files else None
    if not isinstance(source, str):
        return None
    text = source.strip()
    lowered = text[:16].lower()
    if lowered.startswith(("http://", "https://")):
        return None  # fetched once by load_image: only its decoded first frame goes on
    try:
        if lowered.startswith("data:"):
            return _open_and_describe(io.BytesIO(parse_data_url(text)))
        if lowered.startswith("file:"):
            return _open_path_and_describe(file_url_to_path(text)) if allow_local_files else None
    except InvalidInputError:
        return None  # malformed: load_image says why
    if allow_local_files and len(text) < 4096 and is_existing_path(text):
        return _open_path_and_describe(pathlib.Path(text))
    data = try_b64decode(text)
    return None if data is None else _open_and_describe(io.BytesIO(data))


def _open_path_and_describe(path: pathlib.Path) -> str | None:
    try:
        path = path.expanduser()
        if not path.is_file():  # opening a FIFO would block forever
            return None  # load_image refuses it, with its neutral message
        with path.open("rb") as stream:
            return _open_and_describe(stream)
    except (OSError, RuntimeError, ValueError):
        return None  # load_image reports unreadable paths, with its neutral message


def _open_and_describe(stream: Any) -> str | None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream, formats=openable_formats()) as image:
                return _describe_animation(image)
    except Exception:  # not an image Pillow opens: load_image reports why
        return None


def _describe_animation(image: Image.Image) -> str | None:
    if image.format == "MPO" or not getattr(image, "is_animated", False):
        return None
    return f"{image.format or 'image'} with several frames"

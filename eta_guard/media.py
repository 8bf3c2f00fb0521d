"""Turn user-supplied images into checked, fully decoded RGB ``PIL`` images.

Accepted sources: a ``PIL.Image.Image``; a ``pathlib.Path``; a ``str`` holding a file path, a
``file://`` URL, a ``data:image/...;base64,...`` URL, an ``http(s)://`` URL (only with
``allow_remote=True``) or raw base64; ``bytes`` / ``bytearray`` / ``memoryview`` holding an
encoded image file. Anything else, and anything that does not decode to a sane raster image,
raises :class:`~eta_guard.errors.InvalidInputError` with a message saying what was wrong.

Dimensions are read from the file header and checked against ``max_pixels`` *before* any
pixel data is decoded, so decompression bombs are refused in milliseconds. Pillow's global
``PIL.Image.MAX_IMAGE_PIXELS`` is never modified.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import pathlib
import re
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Union

from eta_guard.errors import InvalidInputError
from eta_guard.limits import charge_pixels
from eta_guard.remote_fetch import RemoteFetchPolicy, fetch_bytes

if TYPE_CHECKING:
    from PIL import Image

ImageSource = Union["Image.Image", str, bytes, bytearray, memoryview, pathlib.Path]

DEFAULT_MAX_PIXELS = 40_000_000
#: Largest remote download accepted when ``allow_remote=True`` (``RemoteFetchPolicy`` default).
MAX_REMOTE_BYTES = RemoteFetchPolicy.max_bytes
#: Longest side / shortest side beyond which an image is refused (absurd strips).
MAX_ASPECT_RATIO = 200

# Raster formats we let Pillow open. Restricting the list keeps Pillow from handing vector or
# document formats (EPS, PDF) to external programs such as Ghostscript.
_ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "ICO", "AVIF", "PPM")
_ACCEPTED_TYPES = (
    "PIL.Image.Image, pathlib.Path, str (file path, file:// URL, data:image/...;base64 URL, "
    "http(s) URL, or base64), bytes, bytearray or memoryview (encoded image file)"
)
_B64_RE = re.compile(r"^[A-Za-z0-9+/\-_]+={0,2}$")
_WS_RE = re.compile(r"\s+")
# Magic numbers of things people pass by mistake, to name them in the error message.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"%PDF", 0, "a PDF document"),
    (b"%!PS", 0, "a PostScript/EPS document"),
    (b"PK\x03\x04", 0, "a ZIP archive (or an Office document)"),
    (b"\x1f\x8b", 0, "a gzip archive"),
    (b"ftyp", 4, "an MP4/QuickTime video"),
    (b"\x1aE\xdf\xa3", 0, "a WebM/Matroska video"),
    (b"ID3", 0, "an MP3 audio file"),
    (b"WAVE", 8, "a WAV audio file"),
)
_IMAGE_KINDS = {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "AVIF"}
_UNSUPPORTED_IMAGE_KINDS = {"HEIC", "HEIF"}
_EXIF_ORIENTATION = 0x0112
_HEAD_BYTES = 4096  # enough to sniff every signature above, SVG included
#: The one message for every image path that is refused or cannot be used (see ``_load_path``).
PATH_REFUSED = (
    "image path refused: local image files are read only when allowed "
    "(allow_local_image_files=True) and only if the path names a readable image file; "
    "send the image as bytes, base64 or a data URL instead"
)


def load_image(
    source: ImageSource,
    *,
    allow_remote: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = 10.0,
    allow_local_files: bool = True,
    remote: RemoteFetchPolicy | None = None,
) -> Image.Image:
    """Load one image from any accepted source and return it as a fully decoded RGB image.

    Args:
        source: A PIL image, a path, a ``str`` (path, ``file://`` / ``data:`` / ``http(s)://``
            URL, or base64) or encoded image bytes.
        allow_remote: Fetch ``http(s)://`` URLs. Off by default: no network access.
        max_pixels: Refuse images whose width * height exceeds this, checked from the header
            before decoding.
        timeout: Total seconds a remote fetch may take (used when ``remote`` is not given).
        allow_local_files: Read paths and ``file://`` URLs. Turn it off when sources come from
            untrusted users (a server), so that they cannot make the process read local files.
        remote: How remote images are fetched (deadline, byte cap, redirects, private hosts);
            default ``RemoteFetchPolicy(timeout=timeout)``.

    Returns:
        A new RGB image (EXIF orientation applied; transparency dropped as ``convert("RGB")``
        drops it, the reference's decoding). An input PIL image is never modified.

    Raises:
        InvalidInputError: The source has the wrong type or is not a decodable, sane image.
    """
    check_max_pixels(max_pixels)
    from PIL import Image

    if isinstance(source, Image.Image):
        return _finish(source, max_pixels, what="the PIL image")
    if isinstance(source, pathlib.Path):
        return _load_path(source, max_pixels, allow_local_files)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), max_pixels, what="the image data")
    if isinstance(source, str):
        policy = remote if remote is not None else RemoteFetchPolicy(timeout=timeout)
        options = _StrOptions(allow_remote, allow_local_files, max_pixels, policy)
        return _load_str(source, options)
    if source is None:
        raise InvalidInputError(f"image source is None; expected one of: {_ACCEPTED_TYPES}")
    raise InvalidInputError(
        f"unsupported image source type {type(source).__module__}.{type(source).__qualname__} "
        f"({_short(source)}); expected one of: {_ACCEPTED_TYPES}"
    )


def check_max_pixels(value: Any, *, name: str = "max_pixels") -> int:
    """Return ``value`` if it is a valid pixel limit (a positive int), else raise.

    Raises:
        InvalidInputError: The limit is not a positive int; the message names ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(
            f"{name} must be a positive int, got {_short(value)}; the default is "
            f"{DEFAULT_MAX_PIXELS:_}"
        )
    return value


def image_options(config: Any) -> dict[str, Any]:
    """The :func:`load_image` keyword arguments an ``ETAConfig`` asks for.

    One mapping, so that every caller (evaluators, adapters) honours the same settings.
    """
    return {
        "allow_remote": config.allow_remote_images,
        "max_pixels": config.max_image_pixels,
        "allow_local_files": config.allow_local_image_files,
        "remote": RemoteFetchPolicy.from_config(config),
    }


def load_images(
    sources: ImageSource | Sequence[ImageSource],
    *,
    allow_remote: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = 10.0,
    allow_local_files: bool = True,
    remote: RemoteFetchPolicy | None = None,
) -> list[Image.Image]:
    """Load a single source or a list/tuple of sources; see :func:`load_image`.

    Raises:
        InvalidInputError: One source is bad; for a list the message starts with ``image N:``.
    """
    single = not isinstance(sources, (list, tuple))
    items: list[Any] = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    images = []
    for index, item in enumerate(items):
        try:
            images.append(
                load_image(
                    item,
                    allow_remote=allow_remote,
                    max_pixels=max_pixels,
                    timeout=timeout,
                    allow_local_files=allow_local_files,
                    remote=remote,
                )
            )
        except InvalidInputError as e:
            if single:
                raise
            raise InvalidInputError(f"image {index}: {e}") from e
    return images


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _StrOptions:
    allow_remote: bool
    allow_local: bool
    max_pixels: int
    remote: RemoteFetchPolicy


def _load_str(source: str, options: _StrOptions) -> Image.Image:
    text = source.strip()
    if not text:
        raise InvalidInputError(
            f"image source is an empty string; expected one of: {_ACCEPTED_TYPES}"
        )
    lowered = text[:16].lower()
    if lowered.startswith("data:"):
        return _decode_bytes(parse_data_url(text), options.max_pixels, what="the data URL")
    if lowered.startswith(("http://", "https://")):
        return _load_remote(text, options)
    if lowered.startswith("file:"):
        return _load_path(file_url_to_path(text), options.max_pixels, options.allow_local)
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.\-]{1,15})://", text)
    if scheme:
        raise InvalidInputError(
            f"unsupported URL scheme {scheme.group(1)!r} in image source {_short(text)}; "
            "use http(s)://, file://, or a data:image/...;base64 URL"
        )
    if options.allow_local and len(text) < 4096 and is_existing_path(text):
        return _load_path(pathlib.Path(text), options.max_pixels, allow_local=True)
    data = try_b64decode(text)
    # A short base64-looking string is far more likely a mistyped path than image data, so
    # only treat it as base64 when it decodes to an image signature or is clearly data-sized.
    looks_like_data = len(text) >= 1024 or not options.allow_local
    if data is not None and (looks_like_data or _sniff(data) in _IMAGE_KINDS):
        return _decode_bytes(data, options.max_pixels, what="the base64 string")
    if not options.allow_local:
        raise InvalidInputError(
            f"image source string {_short(text)} is not a URL, a data:image/...;base64 URL nor "
            "valid base64, and local image files are disabled (allow_local_files=False)"
        )
    if len(text) >= 1024 or "\n" in text:
        raise InvalidInputError(
            f"image source string {_short(text)} ({len(text)} chars) is not an existing file "
            "path, a URL, a data:image/...;base64 URL, nor valid base64"
        )
    # Not data: a path that is missing or unreadable gets the one neutral path message.
    raise InvalidInputError(PATH_REFUSED)


def is_existing_path(text: str) -> bool:
    """Whether ``text`` names an existing file or folder (False for names no OS accepts)."""
    try:
        return pathlib.Path(text).expanduser().exists()
    except (OSError, RuntimeError, ValueError):  # name too long, embedded NUL, no home dir
        return False


def file_url_to_path(url: str) -> pathlib.Path:
    """The local path of a ``file:`` URL (a remote host is refused)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InvalidInputError(
            f"file URL {_short(url)} names host {parsed.netloc!r}; only local files "
            "(file:///path or file://localhost/path) are supported"
        )
    return pathlib.Path(urllib.request.url2pathname(parsed.path))


def _load_path(path: pathlib.Path, max_pixels: int, allow_local: bool) -> Image.Image:
    """Decode a local image file, or raise :data:`PATH_REFUSED` whatever went wrong.

    Paths may come from untrusted users, so every failure (files disabled, missing, a
    directory, a FIFO or device, unreadable, not an image, too large, corrupt) reads the same:
    the message must not tell an attacker whether a file exists or what it is. The real reason
    stays on the exception chain (``__cause__``) for local debugging, never in the message.
    """
    if not allow_local:
        raise InvalidInputError(PATH_REFUSED)
    try:
        path = path.expanduser()
        if not path.is_file():  # also False for directories, FIFOs and devices (/dev/zero)
            raise InvalidInputError("not a regular file")
        with path.open("rb") as stream:
            head = stream.read(_HEAD_BYTES)
            stream.seek(0)
            return _decode_stream(stream, head, max_pixels, what="the file", quote=False)
    except (InvalidInputError, OSError, RuntimeError, ValueError) as e:
        raise InvalidInputError(PATH_REFUSED) from e


def parse_data_url(url: str) -> bytes:
    """The bytes of a base64 ``data:image/...`` URL; anything else (SVG, not base64) is refused."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidInputError(
            f"malformed data URL {_short(url)}: no ',' separates the header from the data; "
            "expected data:image/<type>;base64,<data>"
        )
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    mime = params[0]
    if not mime.startswith("image/"):
        raise InvalidInputError(
            f"data URL has MIME type {mime or '(none)'!r}, not an image type; expected "
            "data:image/<png|jpeg|webp|gif|...>;base64,<data>"
        )
    if mime == "image/svg+xml":
        raise InvalidInputError(
            "data URL holds an SVG (image/svg+xml); vector images are not supported, "
            "rasterise it to PNG first"
        )
    if "base64" not in params[1:]:
        raise InvalidInputError(
            f"data URL {_short(url)} is not base64-encoded; expected "
            "data:image/<type>;base64,<data>"
        )
    data = try_b64decode(urllib.parse.unquote(payload) if "%" in payload else payload)
    if data is None:
        raise InvalidInputError(f"data URL payload {_short(payload)} is not valid base64")
    return data


def try_b64decode(text: str) -> bytes | None:
    """Decode standard or URL-safe base64 (whitespace and missing padding tolerated)."""
    try:
        return base64.b64decode(text, validate=True)  # fast path: clean standard base64
    except (binascii.Error, ValueError):
        pass
    compact = _WS_RE.sub("", text)
    if not compact or not _B64_RE.match(compact):
        return None
    compact = compact.rstrip("=").replace("-", "+").replace("_", "/")
    if len(compact) % 4 == 1:  # cannot come from any byte string
        return None
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _load_remote(url: str, options: _StrOptions) -> Image.Image:
    if not options.allow_remote:
        raise InvalidInputError(
            f"remote images are disabled: refusing to fetch {_short(url)}. Pass "
            "allow_remote_images=True (ETAConfig / normalize_messages; allow_remote=True for "
            "load_image) to allow network access, or pass the image as bytes, a path or a data URL"
        )
    data = fetch_bytes(url, options.remote, label=_short(url))
    return _decode_bytes(data, options.max_pixels, what=f"the image at {_short(url)}")


# --------------------------------------------------------------------------- decoding


def _decode_bytes(data: bytes, max_pixels: int, *, what: str) -> Image.Image:
    return _decode_stream(io.BytesIO(data), data[:_HEAD_BYTES], max_pixels, what=what)


def _decode_stream(
    stream: BinaryIO, head: bytes, max_pixels: int, *, what: str, quote: bool = True
) -> Image.Image:
    """Decode an encoded image whose first bytes are ``head``; ``quote`` allows echoing them."""
    from PIL import Image

    if not head:
        raise InvalidInputError(f"{what} is empty (0 bytes); expected an encoded image file")
    kind = _sniff(head)
    if kind in _UNSUPPORTED_IMAGE_KINDS:
        raise InvalidInputError(
            f"{what} is a {kind} image, which is not supported; convert it to PNG or JPEG"
        )
    if kind is not None and kind not in _IMAGE_KINDS:
        raise InvalidInputError(f"{what} is not an image: it looks like {kind}")
    try:
        with warnings.catch_warnings():
            # We enforce max_pixels ourselves; Pillow's warning must not leak to the caller.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=openable_formats())
    except Image.DecompressionBombError as e:
        raise InvalidInputError(
            f"{what} is too large to decode safely (Pillow: {e}); the limit is "
            f"max_pixels={max_pixels:_}"
        ) from e
    except Exception as e:  # Pillow raises UnidentifiedImageError, SyntaxError, struct.error...
        raise InvalidInputError(
            f"{what} is not an image in a supported format ({', '.join(openable_formats())}): "
            f"{_describe(head, kind, quote=quote)}"
        ) from e
    return _finish(image, max_pixels, what=what)


@functools.cache
def openable_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (MPO opens through the JPEG plugin)."""
    from PIL import Image

    Image.init()
    return tuple(f for f in _ALLOWED_FORMATS if f in Image.OPEN)


def _finish(image: Image.Image, max_pixels: int, *, what: str) -> Image.Image:
    """Check the size from the header, then decode and convert to RGB (a new image)."""
    from PIL import Image, ImageOps

    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"{what} has zero size ({width}x{height}); nothing to look at")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        # Processors resize the short side up (CLIP to 336 px), so a 1 x 1,000,000 strip
        # would become a 336 x 336,000,000 tensor. Qwen2-VL's processor uses the same bound.
        raise InvalidInputError(
            f"{what} is {width}x{height}, an aspect ratio above {MAX_ASPECT_RATIO}:1 that vision "
            "processors cannot resize safely; crop or pad it"
        )
    if width * height > max_pixels:
        raise InvalidInputError(
            f"{what} is {width}x{height} = {width * height:_} pixels, more than "
            f"max_pixels={max_pixels:_} (a possible decompression bomb); resize it, or raise "
            "max_image_pixels if you trust the source"
        )
    # The request's pixel budget is charged from the header, before anything is decoded.
    charge_pixels(width * height, what=what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            if image.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except InvalidInputError:
        raise
    except Exception as e:  # truncated data raises OSError; broken plugins other errors
        raise InvalidInputError(
            f"{what} could not be decoded ({type(e).__name__}: {_shorten(str(e), 120)}); "
            "the image data is truncated or corrupt"
        ) from e


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    # Transparency is dropped, not composited: the reference opens every image with
    # ``Image.convert("RGB")`` (LLaVA's ``data_prepare``; CLIP's processor of its time did the
    # same), so transparent pixels keep the colour stored under them. CLIP and the VLM both get
    # this one RGB image, and adapters forward exactly it (docs/paper-setup.md, section 5).
    try:
        return image.convert("RGB")  # always a new image, even when already RGB
    except ValueError:  # modes PIL cannot take to RGB directly (e.g. "La")
        return image.convert("RGBA").convert("RGB")


# --------------------------------------------------------------------------- diagnostics


def _sniff(data: bytes) -> str | None:
    for magic, offset, kind in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return kind
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower():
        return "an SVG vector image (rasterise it to PNG first)"
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if head.startswith((b"{", b"[")):
        return "JSON or other text"
    return None


def _describe(data: bytes, kind: str | None, *, quote: bool = True) -> str:
    if kind is not None:
        # Pillow hides the plugin's reason behind "cannot identify image file"; name the usual ones.
        return f"its {kind} header is invalid or truncated (or declares a zero width or height)"
    sample = data[:512]
    try:
        text: str | None = sample.decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte character cut at the sample's end is still text.
        text = sample[: e.start].decode("utf-8") if e.start >= len(sample) - 3 else None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return f"it looks like text: {_shorten(text, 40)!r}" if quote else "it looks like text"
    return f"it starts with {data[:16]!r}" if quote else "unknown binary data"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a value cut to about ``limit`` chars, keeping its start and its end.

    A 1 MB base64 string never floods a message, and a long path keeps its file name.
    """
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not mask the real error
        text = f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 3]}...{text[-tail:]}"


#: Public name of :func:`_short`, for other modules' error messages.
short_repr = _short

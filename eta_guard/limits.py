"""Per-request resource limits: image count, total decoded pixels and text length.

One request (an ``ETA`` call, one ``ETAEvaluator.evaluate`` / ``evaluate_batch`` call, one
``normalize_messages`` call) may hold at most ``max_images`` images, ``max_pixels`` pixels over
all its images and ``max_text_chars`` characters of text. The pixel total is charged from each
image's header *before* that image is decoded (:func:`charge_pixels`, called by
:mod:`eta_guard.media`), so a request of many small, highly compressible files that would each
decode to a large raster is refused before it costs memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from eta_guard.errors import InvalidInputError

_FIX = "split the request, or raise {name} in ETAConfig if you trust the source"

#: Most stop strings in one call, and most characters in one stop string. Stop strings are the
#: caller's (an OpenAI client's ``stop``), and transformers' stop-string criterion builds tables
#: of vocabulary size x stop length: one stop string of 200,000 characters cost +893 MB of peak
#: memory with the 512-token test vocabulary (about 60x that with a 32k vocabulary).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


#: UTF-16 surrogate code points. Python strings (and JSON: ``"\\ud800"``) may hold them alone,
#: but they are not Unicode scalar values: no tokenizer can encode them (UTF-8 refuses them).
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_encodable(text: str, *, what: str) -> None:
    """Raise if ``text`` holds a lone UTF-16 surrogate, which no model can encode.

    Such text is the client's bad input, never an evaluator failure: without this check the
    tokenizer raises inside the reward model, which a fail-open policy would count as "not
    judged" (and so not flagged). One linear regex scan.

    Raises:
        InvalidInputError: ``text`` holds a surrogate code point (its position is named).
    """
    found = _SURROGATE.search(text)
    if found is not None:
        raise InvalidInputError(
            f"{what} holds a lone UTF-16 surrogate (U+{ord(found.group()):04X}) at character "
            f"{found.start()}; text must be valid Unicode (encodable as UTF-8): fix the client's "
            "string encoding"
        )


def check_stop_strings(stop: list[str]) -> None:
    """Raise if ``stop`` holds more than :data:`MAX_STOP_STRINGS` strings or one is too long.

    Raises:
        InvalidInputError: Too many stop strings, or one longer than :data:`MAX_STOP_CHARS`.
    """
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidInputError(
            f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are accepted"
        )
    for i, s in enumerate(stop):
        check_encodable(s, what=f"stop[{i}]")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidInputError(
                f"stop[{i}] is {len(s):_} characters long; a stop string may have at most "
                f"{MAX_STOP_CHARS} (stop strings are short markers such as '\\nObservation:')"
            )


@dataclass(frozen=True)
class RequestLimits:
    """The per-request limits of an ``ETAConfig`` (defaults: ``ETAConfig``'s defaults).

    Attributes:
        max_images: Most images in one request.
        max_pixels: Most pixels (width * height, summed over the request's images).
        max_text_chars: Most characters of text in one request.
    """

    max_images: int = 16
    max_pixels: int = 40_000_000
    max_text_chars: int = 200_000

    @classmethod
    def from_config(cls, config: Any) -> RequestLimits:
        """The limits an ``ETAConfig`` asks for."""
        return cls(
            max_images=config.max_images_per_request,
            max_pixels=config.max_request_pixels,
            max_text_chars=config.max_text_chars,
        )

    def check_image_count(self, count: int) -> None:
        """Raise if a request holds more than :attr:`max_images` images.

        Raises:
            InvalidInputError: Too many images (checked before any is decoded).
        """
        if count > self.max_images:
            raise InvalidInputError(
                f"the request holds {count} images, more than max_images_per_request="
                f"{self.max_images}; " + _FIX.format(name="max_images_per_request")
            )

    def check_text_length(self, chars: int, *, what: str = "the request's text") -> None:
        """Raise if a request's text is longer than :attr:`max_text_chars` characters.

        Raises:
            InvalidInputError: Too much text (the text itself is never quoted).
        """
        if chars > self.max_text_chars:
            raise InvalidInputError(
                f"{what} is {chars:_} characters long, more than max_text_chars="
                f"{self.max_text_chars:_}; " + _FIX.format(name="max_text_chars")
            )

    @contextlib.contextmanager
    def pixel_budget(self) -> Iterator[None]:
        """Within this block, every image decoded by :mod:`eta_guard.media` in this context
        (thread or task) is charged against :attr:`max_pixels` before it is decoded."""
        token = _BUDGET.set(_PixelBudget(self.max_pixels))
        try:
            yield
        finally:
            _BUDGET.reset(token)


class _PixelBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


_BUDGET: contextvars.ContextVar[_PixelBudget | None] = contextvars.ContextVar(
    "eta_guard_pixel_budget", default=None
)


def charge_pixels(pixels: int, *, what: str) -> None:
    """Charge an image's pixel count, read from its header, to the current request's budget.

    Does nothing outside a :meth:`RequestLimits.pixel_budget` block.

    Raises:
        InvalidInputError: The request's images would exceed ``max_request_pixels``.
    """
    budget = _BUDGET.get()
    if budget is None:
        return
    if budget.used + pixels > budget.limit:
        raise InvalidInputError(
            f"{what} has {pixels:_} pixels, which would bring the request's images to "
            f"{budget.used + pixels:_} pixels, more than max_request_pixels={budget.limit:_}; "
            + _FIX.format(name="max_request_pixels")
        )
    budget.used += pixels

"""An answer without surrounding whitespace, as the reference returns it, streamed as deltas."""

from __future__ import annotations


class StripFilter:
    """Turns a stream of text deltas into the deltas of ``"".join(deltas).strip()``.

    The reference strips every answer it returns or judges (``batch_decode(...)[0].strip()``).
    Leading whitespace is dropped; trailing whitespace is held back until more text follows it,
    so the end of the stream leaves it out.
    """

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, delta: str) -> str:
        if not self._started:
            delta = delta.lstrip()
            if not delta:
                return ""
            self._started = True
        text = self._held + delta
        body = text.rstrip()
        self._held = text[len(body) :]
        return body

"""Stream an answer's words while holding back whatever may become a tool call.

A call is an action, and it is parsed and judged with the whole answer: it is sent only at the
end. The words before it may stream as they are decoded (when the engine releases them), as
long as no byte of call markup leaks into the content. Per parser (:mod:`eta_guard.tools.parsers`):

- ``hermes``: words before ``<tool_call>`` stream; a tail that could begin the marker, and
  trailing whitespace (dropped before a call), wait for the next piece.
- ``llama3_json`` / ``pythonic``: a call is the whole answer, so the answer is held until its
  first non-blank character shows that it cannot be one (not ``{``, ``[``, ``<`` or a fence);
  from there it streams as it comes.

The content streamed is always a prefix of the content the parser reads from the whole answer;
:meth:`ContentStream.finish` sends the rest.
"""

from __future__ import annotations

_HERMES_START = "<tool_call>"
#: First characters of a call in the whole-answer formats (JSON, <|python_tag|>, a list, a fence).
_CALL_OPENERS = "{[<`"


class ContentStream:
    """Feeds decoded pieces in, gets the content that is safe to send out.

    Args:
        parser: the tool-call parser's name (``hermes``, ``llama3_json`` or ``pythonic``).
    """

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of ``text`` already sent

    def feed(self, piece: str) -> str:
        """Add a decoded piece; returns the new content that may be sent now (maybe ``""``)."""
        self.text += piece
        end = self._safe_end()
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self, content: str) -> str:
        """The rest of ``content`` (the parsed answer's words) after what was sent.

        Raises:
            RuntimeError: what was sent is not the start of ``content`` (an engine that streamed
                text it later replaced; never sent as if it were the answer).
        """
        sent = self.text[: self.sent]
        if not content.startswith(sent):
            raise RuntimeError("the streamed text is not the start of the final answer")
        return content[len(sent) :]

    def _safe_end(self) -> int:
        text = self.text
        if self.parser == "hermes":
            at = text.find(_HERMES_START, max(0, self.sent - len(_HERMES_START)))
            if at < 0:
                at = len(text) - _partial_suffix(text, _HERMES_START)
            return len(text[:at].rstrip())
        stripped = text.lstrip()
        if not stripped or stripped[0] in _CALL_OPENERS:
            return 0  # may be a call: held to the end
        return len(text)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0

"""Text deltas that never pass a user's stop string."""

from __future__ import annotations

from eta_guard.decoding.stopping import cut_at_stop, stop_holdback


class StopFilter:
    """Turns a stream of text deltas into deltas that never pass a stop string.

    Holds back only the shortest tail that could still become the start of a stop string;
    ``text`` is everything fed, ``sent`` how many of its characters were released.
    """

    def __init__(self, stop: list[str] | None) -> None:
        self.stop = stop or []
        self.text = ""
        self.sent = 0
        self.done = False

    def feed(self, delta: str) -> str:
        if self.done:
            return ""
        self.text += delta
        cut, self.done = cut_at_stop(self.text, self.stop)
        safe = len(cut) if self.done else len(self.text) - stop_holdback(self.text, self.stop)
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

"""A bounded, thread-safe cache of CLIP image scores keyed by image content.

A guard that checks every image of a conversation (history included) would otherwise score the
same old images again on every turn. Keys are content hashes (see
:attr:`eta_guard.scored_images.ScoredImage.key`), so a cached score belongs to exactly those
bytes; values are scores, not flags, so the current threshold still decides. Only scores that
were computed are stored: a failed check is never cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from eta_guard.errors import InvalidInputError

#: Default number of images remembered (a key and a float each: well under 1 MB in all).
DEFAULT_MAX_ENTRIES = 4096


class ImageScoreCache:
    """Least-recently-used map ``content key -> CLIP score`` with at most ``max_entries`` items.

    Args:
        max_entries: How many scores to keep; the least recently used goes first.

    Example:
        >>> cache = ImageScoreCache(max_entries=2)
        >>> cache.put("a", 0.1); cache.put("b", 0.2); cache.get("a"); cache.put("c", 0.3)
        0.1
        >>> cache.get("b") is None, len(cache)
        (True, 2)
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 0:
            raise InvalidInputError(
                f"image cache size must be an int >= 0 (0 turns caching off), got "
                f"{str(max_entries)[:40]!r}; the default is {DEFAULT_MAX_ENTRIES}"
            )
        self.max_entries = max_entries
        self._scores: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> float | None:
        """The cached score of ``key`` (refreshing it), or ``None``."""
        with self._lock:
            score = self._scores.get(key)
            if score is not None:
                self._scores.move_to_end(key)
            return score

    def put(self, key: str, score: float) -> None:
        """Remember ``score`` for ``key``, evicting the least recently used beyond the limit."""
        if self.max_entries == 0:
            return
        with self._lock:
            self._scores[key] = float(score)
            self._scores.move_to_end(key)
            while len(self._scores) > self.max_entries:
                self._scores.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._scores

    def __len__(self) -> int:
        with self._lock:
            return len(self._scores)

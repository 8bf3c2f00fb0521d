"""What every dataset loader returns (:class:`EvalItem`) and how it reports bad files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from eta_guard.errors import InvalidInputError

Label = Literal["safe", "unsafe"]


class DatasetError(InvalidInputError):
    """A benchmark file is missing or malformed; the message names the file and the row."""


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question.

    Attributes:
        id: Stable, unique within the dataset (resume and shard merging key on it).
        question: The text turn sent with the image.
        image: A path, or the encoded image bytes (SPA-VL embeds them), or ``None`` (text-only).
        category: The benchmark's category (scenario, class1, ...), ``""`` when it has none.
        label: ``"unsafe"`` for a harmful request, ``"safe"`` for a benign one, ``None`` unknown.
        source: ``file:row`` where the item came from, for error messages and reports.
        extra: Benchmark-specific fields kept in the record (e.g. MM-SafetyBench's variant).
    """

    id: str
    question: str
    image: str | bytes | None
    category: str = ""
    label: Label | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, Any]]:
        """The OpenAI-style chat the VLM is asked (image first, as the benchmarks do)."""
        content: list[dict[str, Any]] = []
        if self.image is not None:
            content.append({"type": "image", "image": self.image})
        content.append({"type": "text", "text": self.question})
        return [{"role": "user", "content": content}]

    @property
    def judge_question(self) -> str:
        """The request a text judge should weigh the answer against.

        FigStep and MM-SafetyBench hide the harmful request in the image; a text-only judge
        that saw only the benign-looking text turn would misjudge compliance, so it gets the
        benchmark's own harmful question when there is one.
        """
        return str(self.extra.get("harmful_question") or self.question)

    @property
    def image_ref(self) -> str | None:
        """A printable reference to the image (a path, or ``source`` for embedded bytes)."""
        if self.image is None:
            return None
        return self.image if isinstance(self.image, str) else f"{self.source} (embedded)"


def first_existing(candidates: Iterable[Path], what: str, root: Path) -> Path:
    """The first path that exists, or a :class:`DatasetError` listing where we looked."""
    tried = list(candidates)
    for path in tried:
        if path.exists():
            return path
    looked = ", ".join(str(p) for p in tried)
    raise DatasetError(f"{what} not found under {str(root)!r} (looked for: {looked})")


def require_file(path: Path, source: str) -> str:
    """``str(path)`` if it is a file, else a :class:`DatasetError` naming the item's row."""
    if not path.is_file():
        raise DatasetError(f"{source}: image file {str(path)!r} does not exist")
    return str(path)


def check_unique(items: Sequence[EvalItem]) -> list[EvalItem]:
    """Refuse duplicate ids: resume and shard merging could not tell the items apart."""
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise DatasetError(
                f"{item.source}: item id {item.id!r} repeats the one at {seen[item.id]}; "
                "ids must be unique"
            )
        seen[item.id] = item.source
    return list(items)


def text_field(row: dict[str, Any], key: str, source: str) -> str:
    """A required non-empty string field of a row."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{source}: field {key!r} must be a non-empty string; got {value!r}")
    return value

"""A generic JSONL benchmark: one ``{"image", "question", "category"?, "label"?, "id"?}`` a line.

``image`` is a path relative to the JSONL file, inside its folder, or ``null`` for a text-only item;
``label`` is ``"safe"`` or ``"unsafe"``; ``id`` defaults to ``line-<n>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from eta_guard.eval.datasets.base import (
    DatasetError,
    EvalItem,
    check_unique,
    require_file,
    text_field,
)


def load_jsonl(path: str | Path, subset: str | None = None) -> list[EvalItem]:
    """Load a generic JSONL benchmark (``subset`` keeps only that ``category``).

    Raises:
        DatasetError: A missing file or image, a line that is not a JSON object, or a bad field.
    """
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"JSONL dataset file {str(file)!r} does not exist")
    items = []
    try:
        # Split on newlines only: str.splitlines also splits on U+2028, U+0085 and other
        # characters that JSON strings may hold unescaped.
        lines = file.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{file}: cannot read: {e}") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        source = f"{file}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{source}: not valid JSON: {e.msg}") from e
        if not isinstance(row, dict):
            raise DatasetError(f"{source}: expected a JSON object")
        label = row.get("label")
        if label not in (None, "safe", "unsafe"):
            raise DatasetError(f"{source}: label={label!r}; use 'safe', 'unsafe' or leave it out")
        image = row.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise DatasetError(f"{source}: image must be a path or null; got {image!r}")
        category = row.get("category", "")
        if subset is not None and category != subset:
            continue
        items.append(
            EvalItem(
                id=str(row.get("id", f"line-{number}")),
                question=text_field(row, "question", source),
                image=None
                if image is None
                else require_file(file.parent / image, source, file.parent),
                category=str(category),
                label=label,
                source=source,
            )
        )
    if not items:
        raise DatasetError(f"{file}: no items" + (f" in category {subset!r}" if subset else ""))
    return check_unique(items)

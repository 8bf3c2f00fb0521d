"""VLGuard's test split: ``test.json`` with image paths, safe/unsafe labels and instructions.

Published layout (github.com/ys-zong/VLGuard, ``data/test.json``; images from the HF dataset
``ys-zong/VLGuard``, ``test/<folder>/<file>``): a JSON list of
``{"id", "image", "safe", "harmful_category"?, "harmful_subcategory"?, "instr-resp": [...]}``.
Unsafe images carry one ``{"instruction", "response"}``; safe images carry a
``{"safe_instruction", ...}`` and an ``{"unsafe_instruction", ...}``. Subsets follow VLGuard's
evaluation script: ``unsafes`` (unsafe image + its instruction), ``safe_unsafes`` (safe image +
unsafe instruction), ``safe_safes`` (safe image + safe instruction: a helpfulness control).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eta_guard.eval.datasets.base import (
    DatasetError,
    EvalItem,
    Label,
    check_unique,
    first_existing,
    require_file,
    text_field,
)

SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")


def load_vlguard(path: str | Path, subset: str | None = None) -> list[EvalItem]:
    """Load VLGuard's test split.

    Args:
        path: ``test.json`` itself, or a folder holding it (also ``data/test.json``); images are
            looked up under ``<folder>/test/`` then ``<folder>/``.
        subset: ``"unsafes"`` (default), ``"safe_unsafes"``, ``"safe_safes"`` or ``"all"``.

    Raises:
        DatasetError: Missing file or image, or an entry without the fields of its subset.
    """
    root = Path(path)
    chosen = subset or "unsafes"
    if chosen not in (*SUBSETS, "all"):
        raise DatasetError(f"vlguard subset {chosen!r}: use one of {[*SUBSETS, 'all']}")
    wanted = SUBSETS if chosen == "all" else (chosen,)
    file = (
        root
        if root.is_file()
        else first_existing(
            [root / "test.json", root / "data" / "test.json"], "VLGuard test.json", root
        )
    )
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{file}: not readable JSON: {e}") from e
    if not isinstance(entries, list):
        raise DatasetError(f"{file}: expected a JSON list of entries")
    base = file.parent
    image_roots = [base / "test", base, base.parent / "test"]
    items = []
    for index, entry in enumerate(entries):
        source = f"{file}:entry {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("safe"), bool):
            raise DatasetError(f"{source}: expected an object with a boolean 'safe'")
        for name in wanted:
            item = _item(entry, name, source, image_roots)
            if item is not None:
                items.append(item)
    return check_unique(items)


def _item(entry: dict[str, Any], subset: str, source: str, roots: list[Path]) -> EvalItem | None:
    if (subset == "unsafes") == entry["safe"]:
        return None  # unsafes come from unsafe images, the two others from safe ones
    key = {"unsafes": "instruction", "safe_unsafes": "unsafe_instruction"}.get(
        subset, "safe_instruction"
    )
    pairs = entry.get("instr-resp")
    if not isinstance(pairs, list):
        raise DatasetError(f"{source}: 'instr-resp' must be a list")
    found = [p for p in pairs if isinstance(p, dict) and key in p]
    if not found:
        raise DatasetError(f"{source}: no {key!r} in 'instr-resp' (needed by subset {subset!r})")
    image_name = text_field(entry, "image", source)
    folder = next((r for r in roots if (r / image_name).is_file()), roots[0])
    image = folder / image_name
    label: Label = "safe" if subset == "safe_safes" else "unsafe"
    return EvalItem(
        id=f"{text_field(entry, 'id', source)}/{subset}",
        question=text_field(found[0], key, source),
        image=require_file(image, source, folder),
        category=str(entry.get("harmful_category") or subset),
        label=label,
        source=source,
        extra={"subset": subset},
    )

"""VLSBench: image-text pairs whose harm is visible only in the image (no textual leakage).

Published layout (github.com/AI45Lab/VLSBench ``data/data.json``; images from the HF dataset
huggingface.co/datasets/Foreshhh/vlsbench, ``data.json`` and ``imgs/``): a JSON list of
``{"instruction_id", "instruction", "image_path", "category", "sub_category", "source"}``,
``image_path`` relative to the folder of ``data.json`` (``imgs/0.png``). The model gets the image
and the instruction (the benchmark's ``eval.py``); every item is a harmful pair (label
``unsafe``); categories are ``category``, ``sub_category`` stays in ``extra``.
"""

from __future__ import annotations

from pathlib import Path

from eta_guard.eval.datasets.base import (
    DatasetError,
    EvalItem,
    check_unique,
    entry_object,
    first_existing,
    id_field,
    read_json_list,
    require_file,
    text_field,
)


def load_vlsbench(path: str | Path, subset: str | None = None) -> list[EvalItem]:
    """Load VLSBench (``subset`` keeps one ``category``, e.g. ``"Privacy"``).

    Args:
        path: The folder holding ``data.json`` and ``imgs/`` (also a repository checkout's
            ``data/``), or ``data.json`` itself.

    Raises:
        DatasetError: A missing file or image, a malformed entry, or no entry in ``subset``.
    """
    root = Path(path)
    file = (
        root
        if root.is_file()
        else first_existing(
            [root / "data.json", root / "data" / "data.json"], "VLSBench data.json", root
        )
    )
    base = file.parent
    items = []
    for index, raw in enumerate(read_json_list(file, "VLSBench entries")):
        source = f"{file}:entry {index}"
        entry = entry_object(raw, source)
        category = text_field(entry, "category", source)
        if subset is not None and category != subset:
            continue
        items.append(
            EvalItem(
                id=id_field(entry, "instruction_id", source),
                question=text_field(entry, "instruction", source),
                image=require_file(base / text_field(entry, "image_path", source), source, base),
                category=category,
                label="unsafe",
                source=source,
                extra={k: str(entry[k]) for k in ("sub_category", "source") if entry.get(k)},
            )
        )
    if not items:
        raise DatasetError(f"{file}: no entries" + (f" in category {subset!r}" if subset else ""))
    return check_unique(items)

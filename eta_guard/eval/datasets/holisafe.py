"""HoliSafe-Bench: every safe/unsafe combination of image and text, with the expected behaviour.

Published layout (huggingface.co/datasets/etri-vilab/holisafe-bench; evaluation code
github.com/youngwanLEE/holisafe, README "Prepare Predictions" and ``eval/``): a JSON list of
``{"id", "image", "query", "type", "category", "subcategory", "image_safe",
"image_safety_label"}``, ``image`` relative to the image folder
(``specialized_advice/medical_advice/medical_advice_39.png``). ``type`` is three letters:
image, text and expected response safety (``SSS``, ``SSU``, ``USU``, ``UUU``, ``SUU``); an item
whose type ends in ``U`` should be refused (label ``unsafe``), ``SSS`` answered (label ``safe``:
over-refusal control), as ``eval/eval_by_string_matching.py`` scores them. Categories are
``subcategory`` (the benchmark's category-wise table); ``type`` and ``category`` stay in
``extra``.
"""

from __future__ import annotations

from pathlib import Path

from eta_guard.eval.datasets.base import (
    DatasetError,
    EvalItem,
    Label,
    check_unique,
    entry_object,
    id_field,
    image_under,
    read_json_list,
    text_field,
)

TYPES = ("SSS", "SSU", "USU", "UUU", "SUU")


def load_holisafe(path: str | Path, subset: str | None = None) -> list[EvalItem]:
    """Load HoliSafe-Bench (``subset``: one type, e.g. ``"SUU"``; default all five).

    Args:
        path: The benchmark's JSON file, or a folder holding exactly one ``*.json`` (or
            ``holisafe_bench.json``); images are looked up under ``<folder>/images/`` then
            ``<folder>/``.

    Raises:
        DatasetError: A missing file or image, an unknown ``type``, or a malformed entry.
    """
    if subset is not None and subset not in TYPES:
        raise DatasetError(f"holisafe subset {subset!r}: use one of {list(TYPES)} or leave it out")
    file = _file(Path(path))
    base = file.parent
    folders = [base / "images", base]
    items = []
    for index, raw in enumerate(read_json_list(file, "HoliSafe entries")):
        source = f"{file}:entry {index}"
        entry = entry_object(raw, source)
        kind = entry.get("type")
        if kind not in TYPES:
            raise DatasetError(f"{source}: type={kind!r}; HoliSafe's types are {list(TYPES)}")
        if subset is not None and kind != subset:
            continue
        label: Label = "unsafe" if kind.endswith("U") else "safe"
        items.append(
            EvalItem(
                id=id_field(entry, "id", source),
                question=text_field(entry, "query", source),
                image=image_under(folders, text_field(entry, "image", source), source, base),
                category=text_field(entry, "subcategory", source),
                label=label,
                source=source,
                extra={
                    "type": kind,
                    "holisafe_category": str(entry.get("category") or ""),
                    "image_safe": entry.get("image_safe"),
                },
            )
        )
    if not items:
        raise DatasetError(f"{file}: no entries" + (f" of type {subset!r}" if subset else ""))
    return check_unique(items)


def _file(root: Path) -> Path:
    if root.is_file():
        return root
    if not root.is_dir():
        raise DatasetError(f"HoliSafe-Bench path {str(root)!r} does not exist")
    named = root / "holisafe_bench.json"
    if named.is_file():
        return named
    found = sorted(root.glob("*.json"))
    if len(found) != 1:
        raise DatasetError(
            f"{str(root)!r} holds {len(found)} JSON files; pass the HoliSafe-Bench JSON file itself"
        )
    return found[0]

"""SPA-VL's harm test split: one parquet file with the images embedded.

Published layout (huggingface.co/datasets/sqrti/SPA-VL, config ``test``, split ``harm``, 265
rows): ``test/harm-*.parquet`` with columns ``image`` (a struct ``{bytes, path}``, the datasets
``Image`` feature), ``question``, ``class1``, ``class2``, ``class3``. Categories are ``class1``
(the harm domain). Needs ``pyarrow`` (the ``eval`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eta_guard.eval.datasets.base import DatasetError, EvalItem, check_unique, text_field

COLUMNS = ("image", "question", "class1")


def load_spavl(path: str | Path, subset: str | None = None) -> list[EvalItem]:
    """Load SPA-VL's harm test split from the parquet file(s).

    Args:
        path: A parquet file, or a folder holding ``test/harm-*.parquet`` / ``harm-*.parquet``.
        subset: ``None``/``"harm"`` (``"help"`` loads the helpfulness split the same way).

    Raises:
        DatasetError: No parquet file, a missing column, or a row without question or image.
    """
    split = subset or "harm"
    if split not in ("harm", "help"):
        raise DatasetError(f"spa-vl subset {split!r}: use 'harm' or 'help'")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading SPA-VL needs pyarrow: pip install 'eta-guard[eval]'") from e
    files = _files(Path(path), split)
    items = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DatasetError(f"{file}: not a readable parquet file: {e}") from e
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise DatasetError(
                f"{file}: missing column(s) {missing}; SPA-VL's test split has "
                "image, question, class1, class2, class3"
            )
        for row, record in enumerate(table.to_pylist()):
            items.append(_item(record, f"{file}:row {row}", f"{file.stem}/{row}"))
    return check_unique(items)


def _files(root: Path, split: str) -> list[Path]:
    if root.is_file():
        return [root]
    for folder in (root / "test", root):
        found = sorted(folder.glob(f"{split}-*.parquet")) or sorted(
            (folder / split).glob("*.parquet")
        )
        if found:
            return found
    raise DatasetError(
        f"no SPA-VL {split} parquet under {str(root)!r} (looked for test/{split}-*.parquet, "
        f"{split}-*.parquet and {split}/*.parquet)"
    )


def _item(record: dict[str, Any], source: str, item_id: str) -> EvalItem:
    image = record.get("image")
    data = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise DatasetError(f"{source}: column 'image' holds no encoded image bytes")
    return EvalItem(
        id=item_id,
        question=text_field(record, "question", source),
        image=bytes(data),
        category=str(record.get("class1") or ""),
        label="unsafe",
        source=source,
        extra={k: record.get(k) for k in ("class2", "class3") if record.get(k) is not None},
    )

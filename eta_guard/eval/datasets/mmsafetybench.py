"""MM-SafetyBench: per-scenario question JSON files and SD / TYPO / SD_TYPO images.

Published layout (github.com/isXinLiu/MM-SafetyBench): ``data/processed_questions/<scenario>.json``
(e.g. ``01-Illegal_Activitiy.json``: the typo is the published name), each a JSON object
``{"<id>": {"Question", "Changed Question", "Key Phrase", "Phrase Type", "Rephrased Question",
"Rephrased Question(SD)", ...}}``; images (a separate download) at
``imgs/<scenario>/{SD,TYPO,SD_TYPO}/<id>.jpg``. SD images go with ``Rephrased Question(SD)``;
TYPO and SD_TYPO images with ``Rephrased Question``, as the benchmark's own evaluation does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eta_guard.eval.datasets.base import (
    DatasetError,
    EvalItem,
    check_unique,
    first_existing,
    require_file,
    text_field,
)

VARIANTS = ("SD", "TYPO", "SD_TYPO")
_QUESTION_KEY = {
    "SD": "Rephrased Question(SD)",
    "TYPO": "Rephrased Question",
    "SD_TYPO": "Rephrased Question",
}


def load_mmsafetybench(path: str | Path, subset: str | None = None) -> list[EvalItem]:
    """Load MM-SafetyBench.

    Args:
        path: A folder holding ``processed_questions/`` (or ``data/processed_questions/``) and
            ``imgs/`` (or ``data/imgs/``).
        subset: Image variant ``"SD"``, ``"TYPO"``, ``"SD_TYPO"`` (default; the strongest attack)
            or ``"all"`` (every item three times).

    Raises:
        DatasetError: A missing folder, JSON file or image, or a malformed entry.
    """
    root = Path(path)
    variant = subset or "SD_TYPO"
    if variant not in (*VARIANTS, "all"):
        raise DatasetError(f"mm-safetybench subset {variant!r}: use one of {[*VARIANTS, 'all']}")
    variants = VARIANTS if variant == "all" else (variant,)
    questions = first_existing(
        [root / "processed_questions", root / "data" / "processed_questions"],
        "MM-SafetyBench processed_questions/",
        root,
    )
    images = first_existing(
        [root / "imgs", root / "data" / "imgs", root / "MM-SafetyBench(imgs)"],
        "MM-SafetyBench image folder imgs/",
        root,
    )
    files = sorted(questions.glob("*.json"))
    if not files:
        raise DatasetError(f"{questions}: no <scenario>.json files")
    items = []
    for file in files:
        for qid, entry in _read(file):
            for v in variants:
                source = f"{file}:{qid}"
                if not isinstance(entry, dict):
                    raise DatasetError(f"{source}: expected an object, got {type(entry).__name__}")
                items.append(
                    EvalItem(
                        id=f"{file.stem}/{v}/{qid}",
                        question=text_field(entry, _QUESTION_KEY[v], source),
                        image=require_file(images / file.stem / v / f"{qid}.jpg", source, images),
                        category=file.stem,
                        label="unsafe",
                        source=source,
                        extra={
                            "variant": v,
                            "key_phrase": entry.get("Key Phrase", ""),
                            "harmful_question": entry.get("Question", ""),
                        },
                    )
                )
    return check_unique(items)


def _read(file: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{file}: not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{file}: expected a JSON object of id -> question entry")
    # Numeric ids sort numerically (2 before 10); the published ids are "0", "1", ...
    return sorted(
        data.items(),
        key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0]),
    )

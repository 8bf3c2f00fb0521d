"""What every dataset loader returns (:class:`EvalItem`) and how it reports bad files."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from eta_guard.errors import InvalidInputError
from eta_guard.eval.judges.base import JudgeInput
from eta_guard.limits import check_encodable

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

    def __post_init__(self) -> None:
        # Text no model can encode is refused with its row, before the run: it used to abort the
        # run when its record was written (and --resume met it again, forever).
        texts = {"id": self.id, "question": self.question, "category": self.category}
        texts.update({k: v for k, v in self.extra.items() if isinstance(v, str)})
        for key, value in texts.items():
            try:
                check_encodable(value, what=f"field {key!r}")
            except InvalidInputError as e:
                raise DatasetError(f"{self.source or 'a dataset item'}: {e}") from e

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
        benchmark's own harmful question when there is one; benchmarks that wrap the user's
        request in a task prompt (MSSBench) give the request alone (``extra["judge_question"]``).
        """
        extra = self.extra
        return str(extra.get("judge_question") or extra.get("harmful_question") or self.question)

    @property
    def safety_warning(self) -> str | None:
        """The benchmark's description of the risk (SIUO's ``safety_warning``), for judges
        that weigh an answer against it; ``None`` when the benchmark has none."""
        value = self.extra.get("safety_warning")
        return value if isinstance(value, str) and value.strip() else None

    @property
    def expected_choice(self) -> str | None:
        """The safe option's letter of a multiple-choice item (SIUO MCQA), else ``None``."""
        value = self.extra.get("correct_option")
        return value if isinstance(value, str) and value else None

    def judge_input(self, response: str) -> JudgeInput:
        """What a judge gets to label ``response`` to this item (its question, image, warning
        and expected option)."""
        return JudgeInput(
            self.judge_question,
            response,
            self.image,
            safety_warning=self.safety_warning,
            expected_choice=self.expected_choice,
        )

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


def require_file(path: Path, source: str, root: Path) -> str:
    """``str(path)`` if it is a regular file inside the dataset folder ``root``, else a
    :class:`DatasetError` naming the item's row.

    The dataset file is untrusted: an image path that leaves ``root`` (``../``, an absolute
    path, a symbolic link pointing out) is refused, so a downloaded benchmark cannot make the run
    read, and send to the models and the report, files elsewhere on the machine.
    """
    try:
        resolved = path.resolve(strict=True)
        inside = any(resolved.is_relative_to(r) for r in _allowed_folders(root))
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise DatasetError(f"{source}: image file {str(path)!r} does not exist") from None
    if not inside:
        raise DatasetError(
            f"{source}: image path {str(path)!r} leads outside the dataset folder "
            f"{str(root)!r}; image paths must stay inside it"
        )
    if not resolved.is_file():
        raise DatasetError(f"{source}: image file {str(path)!r} does not exist")
    return str(path)


def _allowed_folders(root: Path) -> list[Path]:
    """``root``, and for a Hugging Face Hub snapshot (``<repo>/snapshots/<rev>/...``, whose files
    are links into ``<repo>/blobs/``) that repo's ``blobs`` folder."""
    resolved = root.resolve(strict=True)
    folders = [resolved]
    for folder in (resolved, *resolved.parents):
        if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
            folders.append(folder.parent.parent / "blobs")
            break
    return folders


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


def read_json(file: Path) -> Any:
    """The parsed JSON of a benchmark file, or a :class:`DatasetError` naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{file}: not readable JSON: {e}") from e


def read_json_list(file: Path, what: str) -> list[Any]:
    """A benchmark file that must hold a JSON list of entries."""
    data = read_json(file)
    if not isinstance(data, list):
        raise DatasetError(f"{file}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def entry_object(entry: Any, source: str) -> dict[str, Any]:
    """An entry that must be a JSON object."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{source}: expected a JSON object, got {type(entry).__name__}")
    return entry


def id_field(row: dict[str, Any], key: str, source: str) -> str:
    """A required id: a whole number or a non-empty string, as text."""
    value = row.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise DatasetError(
        f"{source}: field {key!r} must be a number or a non-empty string; got {value!r}"
    )


def image_under(folders: Sequence[Path], name: str, source: str, root: Path) -> str:
    """The image ``name`` from the first of ``folders`` holding it, confined to ``root``
    (:func:`require_file`); the first folder is named in the error when none holds it."""
    folder = next((f for f in folders if (f / name).is_file()), folders[0])
    return require_file(folder / name, source, root)


def text_field(row: dict[str, Any], key: str, source: str) -> str:
    """A required non-empty string field of a row."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{source}: field {key!r} must be a non-empty string; got {value!r}")
    return value

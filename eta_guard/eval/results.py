"""The results file: a JSONL header line with the run's settings, then one line per item.

Each item line is written and flushed to disk as the item finishes, so a killed run loses at
most the item in flight. :func:`open_for_append` resumes: it drops a torn last line, checks the
settings match, and returns the ids already done, so nothing is lost and nothing duplicated.
Shards of one run (``--shard i/n``) write separate files that :func:`load_results` merges.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from eta_guard.errors import InvalidInputError

if TYPE_CHECKING:
    from eta_guard.eval.datasets.base import EvalItem

FORMAT = "eta-guard-eval/1"
#: Settings that may differ between the shards of one run.
SHARD_KEYS = ("shard",)


class ResultsFileError(InvalidInputError):
    """A results file is unreadable, from another run, or would be overwritten."""


def results_name(shard: tuple[int, int] | None) -> str:
    """``results.jsonl``, or ``results.shard-<i>-of-<n>.jsonl`` for a shard (1-based)."""
    return "results.jsonl" if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


def item_record(item: EvalItem, *, index: int, seed: int) -> dict[str, Any]:
    """An item line's fields that describe the item itself (the answers are filled in after)."""
    return {
        "type": "item",
        "id": item.id,
        "index": index,
        "category": item.category,
        "label": item.label,
        "source": item.source,
        "image": item.image_ref,
        "question": item.question,
        "extra": item.extra,
        "seed": seed,
        "error": None,
    }


def open_for_append(
    path: Path, settings: dict[str, Any], *, resume: bool
) -> tuple[IO[str], set[str]]:
    """Open ``path`` to append records; return the handle and the ids already recorded.

    Raises:
        ResultsFileError: The file exists and ``resume`` is off (we never overwrite results), or
            it was written with other settings, or it is not a results file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        if not resume:
            raise ResultsFileError(
                f"{path} already exists; pass --resume to continue that run, or choose "
                "another --out folder"
            )
        _drop_torn_tail(path)
        header, records = read_results(path)
        if _comparable(header["settings"]) != _comparable(settings):
            diff = sorted(
                k
                for k in {*header["settings"], *settings}
                if header["settings"].get(k) != settings.get(k)
            )
            raise ResultsFileError(
                f"{path} was written by a run with other settings (differ: {', '.join(diff)}); "
                "resume with the same options, or choose another --out folder"
            )
        return path.open("a", encoding="utf-8"), {r["id"] for r in records}
    f = path.open("w", encoding="utf-8")
    write_line(f, {"type": "header", "format": FORMAT, "settings": settings})
    return f, set()


def write_line(f: IO[str], obj: dict[str, Any]) -> None:
    """Append one JSON line and push it to disk before the next item starts."""
    try:
        line = json.dumps(obj, ensure_ascii=False)
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: escaped, the line stays valid JSON
        line = json.dumps(obj, ensure_ascii=True)
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_results(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and item records of one results file (a torn last line is ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsFileError(f"cannot read results file {path}: {e}") from e
    complete = lines[:-1]  # text after the last newline is a torn line from a killed run
    objs = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            objs.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ResultsFileError(f"{path}:{number}: not a JSON line ({e.msg})") from e
    header = objs[0] if objs else None
    if (
        not isinstance(header, dict)
        or header.get("type") != "header"
        or header.get("format") != FORMAT
    ):
        raise ResultsFileError(f"{path} is not an eta-guard eval results file (no header line)")
    _check_header(path, header)
    records = []
    for number, obj in enumerate(objs[1:], 2):
        if isinstance(obj, dict) and obj.get("type") == "item":
            where = f"{path}: item line {number}"
            _check_record(where, obj, header["settings"]["judges"])
            if header["settings"].get("compare_gates"):
                _check_gates(where, obj, header["settings"])
            records.append(obj)
    return header, records


# A results file may have been edited or truncated by hand: everything the report reads is
# checked here, so that a bad file is a ResultsFileError naming the line, not a KeyError deep in
# the metrics.
_NUMBER = (int, float)


def _fail(where: str, what: str) -> ResultsFileError:
    return ResultsFileError(f"{where}: {what}; the results file was changed or is damaged")


def _check_header(path: Path, header: dict[str, Any]) -> None:
    settings = header.get("settings")
    if not isinstance(settings, dict):
        raise _fail(f"{path}: header", "'settings' is not an object")
    judges = settings.get("judges")
    if not isinstance(judges, list) or not all(isinstance(j, str) for j in judges):
        raise _fail(f"{path}: header", "'settings.judges' is not a list of names")
    if not isinstance(settings.get("dataset", ""), str):
        raise _fail(f"{path}: header", "'settings.dataset' is not a string")
    choices = settings.get("compare_gates")
    if choices is not None and (
        not isinstance(choices, list)
        or not all(
            isinstance(c, dict)
            and isinstance(c.get("name"), str)
            and isinstance(c.get("members"), list)
            for c in choices
        )
    ):
        raise _fail(f"{path}: header", "'settings.compare_gates' is not a list of gate choices")
    seed = settings.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"{path}: header", "'settings.seed' is not an integer")


def _check_record(where: str, r: dict[str, Any], judges: list[str]) -> None:
    def need(key: str, types: Any, allow_none: bool = False) -> Any:
        value = r.get(key)
        if (value is None and not allow_none) or (
            value is not None
            and (not isinstance(value, types) or isinstance(value, bool) and types is int)
        ):
            raise _fail(where, f"field {key!r} is missing or has the wrong type")
        return value

    need("id", str)
    need("index", int)
    need("category", str)
    need("question", str)
    need("error", str, allow_none=True)
    if r.get("label") not in (None, "safe", "unsafe"):
        raise _fail(where, "field 'label' is not 'safe', 'unsafe' or null")
    if r["error"] is not None:
        return
    need("vanilla_text", str)
    need("eta_text", str)
    need("aligned", bool)
    verdict = need("verdict", dict)
    for key in ("pre_score", "post_score"):
        if key not in verdict:
            raise _fail(where, f"verdict.{key} is missing")
        score = verdict[key]
        if score is not None and (not isinstance(score, _NUMBER) or isinstance(score, bool)):
            raise _fail(where, f"verdict.{key} is not a number")
    for key in ("input_unsafe", "output_unsafe"):
        if key not in verdict or verdict[key] not in (None, True, False):
            raise _fail(where, f"verdict.{key} is missing or not true/false/null")
    if not isinstance(verdict.get("errors"), dict):
        raise _fail(where, "verdict.errors is not an object")
    timings = need("timings", dict)
    if not all(isinstance(v, _NUMBER) for v in timings.values()):
        raise _fail(where, "a timing is not a number")
    refused = need("refused", dict)
    judgments = need("judgments", dict)
    for arm in ("vanilla", "eta"):
        if not isinstance(refused.get(arm), bool):
            raise _fail(where, f"refused.{arm} is not true/false")
    for name in judges:
        block = judgments.get(name)
        if not isinstance(block, dict):
            raise _fail(where, f"judgments has no {name!r} (a judge of the run)")
        for arm in ("vanilla", "eta"):
            label = block.get(arm)
            if not isinstance(label, dict) or label.get("unsafe") not in (None, True, False):
                raise _fail(where, f"judgments[{name!r}].{arm} is not a judgment")


def _check_gates(where: str, r: dict[str, Any], settings: dict[str, Any]) -> None:
    """A gate-comparison record: every choice's flag and alignment, and the judges' label of
    the aligned answer whenever a choice returned it (what :func:`gate_metrics` reads)."""
    if r.get("error") is not None:
        return
    gates = r.get("gates")
    if not isinstance(gates, dict):
        raise _fail(where, "field 'gates' is missing or not an object")
    any_aligned = False
    for choice in settings["compare_gates"]:
        block = gates.get(choice["name"])
        if (
            not isinstance(block, dict)
            or block.get("input_unsafe") not in (None, True, False)
            or not isinstance(block.get("aligned"), bool)
        ):
            raise _fail(where, f"gates[{choice['name']!r}] is not a gate choice's outcome")
        any_aligned = any_aligned or block["aligned"]
    if any_aligned:
        for name in settings["judges"]:
            label = r["judgments"][name].get("aligned")
            if not isinstance(label, dict) or label.get("unsafe") not in (None, True, False):
                raise _fail(where, f"judgments[{name!r}].aligned is not a judgment")


def load_results(paths: Sequence[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Merge the results files of one run (e.g. its shards) into one list, in dataset order.

    Raises:
        ResultsFileError: Files from different runs, or one item recorded twice.
    """
    if not paths:
        raise ResultsFileError("no results files given")
    header: dict[str, Any] | None = None
    merged: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for path in paths:
        head, records = read_results(Path(path))
        if header is None:
            header = head
        elif _comparable(head["settings"]) != _comparable(header["settings"]):
            raise ResultsFileError(f"{path} comes from a run with other settings than {paths[0]}")
        for record in records:
            if record["id"] in seen:
                raise ResultsFileError(
                    f"item {record['id']!r} is in both {seen[record['id']]} and {path}"
                )
            seen[record["id"]] = path
            merged.append(record)
    assert header is not None
    merged.sort(key=lambda r: r["index"])
    settings = {**header["settings"], "shard": None}
    return {**header, "settings": settings}, merged


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in SHARD_KEYS}


def _drop_torn_tail(path: Path) -> None:
    """Cut a partly written last line (the run was killed mid-write) so appends start clean."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)

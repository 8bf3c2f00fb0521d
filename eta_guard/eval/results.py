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
from typing import IO, Any

from eta_guard.errors import InvalidInputError

FORMAT = "eta-guard-eval/1"
#: Settings that may differ between the shards of one run.
SHARD_KEYS = ("shard",)


class ResultsFileError(InvalidInputError):
    """A results file is unreadable, from another run, or would be overwritten."""


def results_name(shard: tuple[int, int] | None) -> str:
    """``results.jsonl``, or ``results.shard-<i>-of-<n>.jsonl`` for a shard (1-based)."""
    return "results.jsonl" if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


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
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
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
    if not objs or objs[0].get("type") != "header" or objs[0].get("format") != FORMAT:
        raise ResultsFileError(f"{path} is not an eta-guard eval results file (no header line)")
    records = [o for o in objs[1:] if o.get("type") == "item"]
    return objs[0], records


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

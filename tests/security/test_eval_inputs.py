"""Issue 18, hardening item 9: `eta-guard eval` reads untrusted benchmark and results files.

- Image paths in a dataset file must stay inside the dataset's folder (``../``, absolute
  paths and symbolic links pointing out were read and sent to the models and the report).
- A dataset line holding a lone surrogate aborted the run when its record was written, and
  ``--resume`` met it again forever: it is refused at load time, naming the line, and a record
  holding one is still written as valid JSON.
- U+2028 inside a JSONL string split the line in two (``str.splitlines``).
- A tampered results file crashed ``--merge`` with a raw traceback: it is a ResultsFileError
  naming the line.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest

from eta_guard.eval.datasets.base import DatasetError
from eta_guard.eval.datasets.jsonl import load_jsonl
from eta_guard.eval.results import ResultsFileError, load_results, read_results, write_line


@pytest.fixture
def dataset(tmp_path: Path, test_image) -> Path:
    folder = tmp_path / "bench"
    folder.mkdir()
    test_image.save(folder / "ok.png")
    test_image.save(tmp_path / "secret.png")  # outside the dataset folder
    return folder


def _write(folder: Path, *rows: dict | str) -> Path:
    file = folder / "data.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return file


def test_inside_images_load(dataset):
    (item,) = load_jsonl(_write(dataset, {"image": "ok.png", "question": "q"}))
    assert Path(item.image).name == "ok.png"


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked-dir"])
def test_image_paths_leaving_the_dataset_folder_are_refused(dataset, kind):
    secret = dataset.parent / "secret.png"
    if kind == "dotdot":
        image = "../secret.png"
    elif kind == "absolute":
        image = str(secret)
    elif kind == "symlink":
        (dataset / "link.png").symlink_to(secret)
        image = "link.png"
    else:
        (dataset / "sub").symlink_to(dataset.parent, target_is_directory=True)
        image = "sub/secret.png"
    file = _write(dataset, {"image": image, "question": "q"})
    with pytest.raises(DatasetError, match="outside the dataset folder") as info:
        load_jsonl(file)
    assert f"{file}:1" in str(info.value)


def test_hub_snapshot_links_into_its_blobs_are_allowed(tmp_path, test_image):
    repo = tmp_path / "datasets--org--bench"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    test_image.save(repo / "blobs" / "deadbeef", format="PNG")
    (snapshot / "img.png").symlink_to(Path("../../blobs/deadbeef"))
    (item,) = load_jsonl(_write(snapshot, {"image": "img.png", "question": "q"}))
    assert item.image is not None


def test_a_lone_surrogate_is_refused_at_load_time_with_its_line(dataset):
    # The raw JSON escape, as a downloaded file holds it.
    file = _write(dataset, {"image": None, "question": "fine"}, '{"question": "bad \\ud800"}')
    with pytest.raises(DatasetError, match=r"data\.jsonl:2: .*surrogate"):
        load_jsonl(file)
    file = _write(dataset, '{"question": "q", "category": "\\udc80"}')
    with pytest.raises(DatasetError, match="'category'"):
        load_jsonl(file)


def test_a_record_with_a_lone_surrogate_is_still_written_as_json():
    f = io.StringIO()
    f.fileno = lambda: -1  # type: ignore[method-assign]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("os.fsync", lambda fd: None)
        write_line(f, {"type": "item", "error": "bad \ud800 text"})
    line = f.getvalue()
    line.encode("utf-8")  # writable to a UTF-8 file
    assert json.loads(line)["error"] == "bad \ud800 text"


def test_line_separators_inside_strings_do_not_split_a_line(dataset):
    question = "first\u2028second\u2029third\x85fourth"
    file = dataset / "data.jsonl"
    file.write_text(json.dumps({"question": question}, ensure_ascii=False) + "\n", encoding="utf-8")
    (item,) = load_jsonl(file)
    assert item.question == question


# ----------------------------------------------------------------------- tampered results


HEADER = {
    "type": "header",
    "format": "eta-guard-eval/1",
    "settings": {"dataset": "jsonl", "judges": ["refusal"], "seed": 0, "shard": None},
}
RECORD = {
    "type": "item",
    "id": "line-1",
    "index": 0,
    "category": "c",
    "label": "unsafe",
    "question": "q",
    "error": None,
    "vanilla_text": "v",
    "eta_text": "e",
    "aligned": True,
    "verdict": {
        "pre_score": 0.2,
        "post_score": -1.0,
        "input_unsafe": True,
        "output_unsafe": True,
        "unsafe": True,
        "skipped": {},
        "errors": {},
    },
    "timings": {"total": 1.0},
    "refused": {"vanilla": False, "eta": True},
    "judgments": {"refusal": {"vanilla": {"unsafe": True}, "eta": {"unsafe": False}}},
}


def _results(tmp_path: Path, header: object, *records: object) -> Path:
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in (header, *records)), encoding="utf-8")
    return path


def _without(key: str) -> dict:
    r = copy.deepcopy(RECORD)
    del r[key]
    return r


def _with(**fields) -> dict:
    return {**copy.deepcopy(RECORD), **fields}


def test_an_intact_results_file_reports(tmp_path):
    from eta_guard.eval.report import write_report

    header, records = load_results([_results(tmp_path, HEADER, RECORD)])
    write_report(header, records, tmp_path / "report", n_boot=10)


@pytest.mark.parametrize(
    ("header", "record"),
    [
        (HEADER, _without("id")),
        (HEADER, _without("index")),
        (HEADER, _with(index="0")),
        (HEADER, _with(judgments={})),
        (HEADER, _with(judgments={"refusal": {"vanilla": {"unsafe": "yes"}, "eta": {}}})),
        (HEADER, _with(refused=None)),
        (HEADER, _with(verdict={"pre_score": "high", "post_score": None})),
        (HEADER, _with(verdict={"post_score": None})),
        (HEADER, _with(verdict={"pre_score": None, "post_score": None, "errors": []})),
        (HEADER, _with(category=3)),
        (HEADER, _with(aligned="no")),
        ({**HEADER, "settings": {"judges": "refusal", "dataset": "x"}}, RECORD),
        ({**HEADER, "settings": {"judges": ["refusal"], "dataset": 7}}, RECORD),
        ({**HEADER, "settings": None}, RECORD),
        ([1, 2], RECORD),
    ],
)
def test_tampered_results_are_a_results_file_error(tmp_path, header, record):
    from eta_guard.eval.report import write_report

    path = _results(tmp_path, header, record)
    with pytest.raises(ResultsFileError) as info:
        merged_header, records = load_results([path])
        write_report(merged_header, records, tmp_path / "report", n_boot=10)
    assert str(path) in str(info.value)


def test_read_results_names_the_line(tmp_path):
    path = _results(tmp_path, HEADER, RECORD, _without("question"))
    with pytest.raises(ResultsFileError, match="item line 3: field 'question'"):
        read_results(path)

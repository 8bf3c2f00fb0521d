"""Dataset loaders on small folders laid out as each benchmark publishes them; bad files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import (  # noqa: E402
    make_figstep,
    make_jsonl,
    make_mmsafetybench,
    make_spavl,
    make_vlguard,
)

from eta_guard.errors import InvalidInputError  # noqa: E402
from eta_guard.eval.datasets import DatasetError, load_dataset  # noqa: E402
from eta_guard.eval.datasets.figstep import FIGSTEP_PROMPT  # noqa: E402
from eta_guard.media import load_image  # noqa: E402


def test_figstep_layout(tmp_path):
    items = load_dataset("figstep", make_figstep(tmp_path))
    assert [i.id for i in items] == [
        "ForbidQI_1_1",
        "ForbidQI_1_2",
        "ForbidQI_2_1",
        "ForbidQI_3_1",
        "ForbidQI_3_2",
    ]
    first = items[0]
    assert first.question == FIGSTEP_PROMPT and first.label == "unsafe"
    assert first.category == "Illegal Activity"
    assert first.image.endswith("data/images/SafeBench/query_ForbidQI_1_1_6.png")
    assert first.judge_question == "How can someone do a bad thing?"  # text judges see the real ask
    assert load_image(first.image).size == (96, 96)
    # The CSV itself, or the data folder, work as --path too.
    assert len(load_dataset("figstep", tmp_path / "data" / "question" / "safebench.csv")) == 5
    assert len(load_dataset("figstep", tmp_path / "data")) == 5


def test_figstep_missing_image_names_the_csv_line(tmp_path):
    make_figstep(tmp_path)
    (tmp_path / "data/images/SafeBench/query_ForbidQI_2_1_6.png").unlink()
    with pytest.raises(
        DatasetError,
        match=r"safebench\.csv:4: image file .*query_ForbidQI_2_1_6\.png.* does not exist",
    ):
        load_dataset("figstep", tmp_path)


def test_figstep_bad_column_and_bad_row(tmp_path):
    make_figstep(tmp_path)
    csv_path = tmp_path / "data/question/safebench.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("category_name", "category"))
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['category_name'\]"):
        load_dataset("figstep", tmp_path)
    csv_path.write_text(text.replace("ForbidQI,3,2", "ForbidQI,three,2"))
    with pytest.raises(DatasetError, match=r"safebench\.csv:6: category_id='three'"):
        load_dataset("figstep", tmp_path)


def test_mmsafetybench_layout_and_variants(tmp_path):
    make_mmsafetybench(tmp_path)
    default = load_dataset("mm-safetybench", tmp_path)
    assert len(default) == 6 and {i.extra["variant"] for i in default} == {"SD_TYPO"}
    assert default[0].id == "01-Illegal_Activitiy/SD_TYPO/0"
    assert default[0].image.endswith("imgs/01-Illegal_Activitiy/SD_TYPO/0.jpg")
    assert default[0].question.startswith("The bottom of the image")  # "Rephrased Question"
    sd = load_dataset("mm-safetybench", tmp_path, "SD")
    assert sd[0].question == "The image shows an activity. List steps 0."  # "(SD)" question
    assert len(load_dataset("mm-safetybench", tmp_path, "all")) == 18
    with pytest.raises(DatasetError, match="subset 'XX'"):
        load_dataset("mm-safetybench", tmp_path, "XX")


def test_mmsafetybench_malformed_entry_names_file_and_id(tmp_path):
    make_mmsafetybench(tmp_path)
    file = tmp_path / "processed_questions" / "02-HateSpeech.json"
    data = json.loads(file.read_text())
    del data["1"]["Rephrased Question"]
    file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"02-HateSpeech\.json:1: field 'Rephrased Question'"):
        load_dataset("mm-safetybench", tmp_path)
    file.write_text("{not json")
    with pytest.raises(DatasetError, match=r"02-HateSpeech\.json: not readable JSON"):
        load_dataset("mm-safetybench", tmp_path)


def test_spavl_parquet_with_embedded_images(tmp_path):
    make_spavl(tmp_path)
    items = load_dataset("spa-vl", tmp_path)
    assert len(items) == 4 and isinstance(items[0].image, bytes)
    assert [i.category for i in items] == ["Violence", "Privacy", "Violence", "Privacy"]
    assert load_image(items[1].image).size == (64, 48)
    assert items[0].image_ref.endswith(":row 0 (embedded)")


def test_spavl_missing_column_and_empty_image(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q", "class1": "c"}]), tmp_path / "a.parquet")
    with pytest.raises(DatasetError, match=r"a\.parquet: missing column\(s\) \['image'\]"):
        load_dataset("spa-vl", tmp_path / "a.parquet")
    rows = [{"image": {"bytes": b"", "path": "x"}, "question": "q", "class1": "c"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match=r"b\.parquet:row 0: column 'image' holds no"):
        load_dataset("spa-vl", tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match="no SPA-VL harm parquet"):
        load_dataset("spa-vl", tmp_path / "nowhere")


def test_vlguard_subsets(tmp_path):
    make_vlguard(tmp_path)
    unsafes = load_dataset("vlguard", tmp_path)
    assert [i.id for i in unsafes] == ["HOD_1/unsafes", "HOD_3/unsafes"]
    assert unsafes[0].category == "risky behavior" and unsafes[0].question == "How to hurt?"
    every = load_dataset("vlguard", tmp_path / "test.json", "all")
    by_id = {i.id: i for i in every}
    assert by_id["Ads_2/safe_safes"].label == "safe"
    assert by_id["Ads_2/safe_unsafes"].question == "How to scam with it?"
    assert by_id["Ads_2/safe_unsafes"].label == "unsafe"


def test_vlguard_entry_without_its_instruction(tmp_path):
    make_vlguard(tmp_path)
    data = json.loads((tmp_path / "test.json").read_text())
    data[2]["instr-resp"] = [{"response": "x"}]
    (tmp_path / "test.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"test\.json:entry 2: no 'instruction'"):
        load_dataset("vlguard", tmp_path)


def test_jsonl_and_its_errors(tmp_path):
    file = make_jsonl(tmp_path)
    items = load_dataset("jsonl", file)
    assert [i.id for i in items] == ["q0", "q1", "q2", "q3", "q4", "q5"]
    assert [i.label for i in items] == ["unsafe", "unsafe", "safe", "unsafe", "unsafe", "safe"]
    assert [i.id for i in load_dataset("jsonl", file, "b")] == ["q1", "q3", "q5"]
    lines = file.read_text().splitlines()
    file.write_text("\n".join([*lines[:2], "{broken", *lines[3:]]))
    with pytest.raises(DatasetError, match=r"bench\.jsonl:3: not valid JSON"):
        load_dataset("jsonl", file)
    file.write_text("\n".join([lines[0], lines[0]]))
    with pytest.raises(
        DatasetError, match=r"bench\.jsonl:2: item id 'q0' repeats the one at .*bench\.jsonl:1"
    ):
        load_dataset("jsonl", file)
    file.write_text(json.dumps({"image": "images/0.png", "question": "q", "label": "bad"}))
    with pytest.raises(DatasetError, match=r"bench\.jsonl:1: label='bad'"):
        load_dataset("jsonl", file)


def test_unknown_dataset_and_missing_folder(tmp_path):
    with pytest.raises(InvalidInputError, match="--dataset 'nope' is not known"):
        load_dataset("nope", tmp_path)
    with pytest.raises(DatasetError, match="FigStep safebench.csv not found"):
        load_dataset("figstep", tmp_path)

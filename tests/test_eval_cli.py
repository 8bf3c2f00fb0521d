"""``eta-guard eval`` / ``calibrate`` end to end on tiny checkpoints, and the report's HTML.

Random checkpoints: the numbers in these reports mean nothing; the tests check the plumbing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import make_figstep, photo, typography  # noqa: E402

from eta_guard.cli import app  # noqa: E402
from eta_guard.eval.report import render_html  # noqa: E402

FAST = ["--set", "max_new_tokens=8", "--set", "num_candidates=2", "--set", "max_sentence_tokens=6"]
FORCE_ALIGN = ["--set", "pre_threshold=-1.01", "--set", "post_threshold=1e9"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def tiny_args(tiny_checkpoints, tiny_dir):
    return ["--tiny", "--cache-dir", str(tiny_dir)]


def _ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


@pytest.fixture(scope="module")
def figstep_run(runner, tiny_args, tmp_path_factory):
    root = make_figstep(tmp_path_factory.mktemp("figstep"))
    out = tmp_path_factory.mktemp("figstep-out")
    result = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "figstep",
            "--path",
            str(root),
            *tiny_args,
            "--judge",
            "refusal",
            "--judge",
            "reward",
            "--out",
            str(out),
            *FAST,
            *FORCE_ALIGN,
        ],
    )
    _ok(result)
    return root, out, result


def test_eval_on_figstep_writes_results_and_report(figstep_run):
    _, out, result = figstep_run
    assert "unsafe-response rate" in result.output and "RANDOM tiny checkpoints" in result.output
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["n_items"] == metrics["n_answered"] == 5
    assert set(metrics["judges"]) == {"refusal", "reward"}
    assert set(metrics["judges"]["reward"]["by_category"]) == {
        "Illegal Activity",
        "Hate Speech",
        "Malware Generation",
    }
    assert metrics["evaluators"]["aligned"] == 1.0  # thresholds forced every item through ETA
    assert metrics["cost"]["overall"]["ratio"] > 1.0
    assert report["settings"]["vlm"] == "tiny" and "RANDOM" in report["settings"]["note"]
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5  # 2 judges + scores + agreement + cost
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing fetched


def test_sharded_cli_runs_merge(runner, tiny_args, figstep_run, tmp_path):
    root, full_out, _ = figstep_run
    for shard in ("1/2", "2/2"):
        result = runner.invoke(
            app,
            [
                "eval",
                "--dataset",
                "figstep",
                "--path",
                str(root),
                *tiny_args,
                "--judge",
                "refusal",
                "--judge",
                "reward",
                "--out",
                str(tmp_path),
                "--shard",
                shard,
                *FAST,
                *FORCE_ALIGN,
            ],
        )
        _ok(result)
        assert "--merge" in result.output
    assert not (tmp_path / "report.json").exists()
    result = runner.invoke(
        app,
        [
            "eval",
            "--merge",
            str(tmp_path / "results.shard-1-of-2.jsonl"),
            "--merge",
            str(tmp_path / "results.shard-2-of-2.jsonl"),
            "--out",
            str(tmp_path / "merged"),
        ],
    )
    _ok(result)
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())["metrics"]
    full = json.loads((full_out / "report.json").read_text())["metrics"]
    for key in ("judges", "refusal", "agreement", "evaluators", "n_items"):
        assert merged[key] == full[key]


def test_eval_errors_name_the_file_and_row(runner, tiny_args, tmp_path):
    root = make_figstep(tmp_path / "fs")
    (root / "data/images/SafeBench/query_ForbidQI_1_2_6.png").unlink()
    result = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "figstep",
            "--path",
            str(root),
            *tiny_args,
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert re.search(
        r"error: .*safebench\.csv:3: image file .*query_ForbidQI_1_2_6\.png", result.output
    )
    assert "Traceback" not in result.output
    result = runner.invoke(
        app, ["eval", "--dataset", "figstep", "--path", str(root), *tiny_args, "--shard", "3/2"]
    )
    assert result.exit_code == 2 and "--shard '3/2'" in result.output
    result = runner.invoke(app, ["eval", "--path", str(root)])
    assert result.exit_code == 2 and "--dataset" in result.output


def test_eval_refuses_to_overwrite_results(runner, tiny_args, figstep_run):
    root, out, _ = figstep_run
    result = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "figstep",
            "--path",
            str(root),
            *tiny_args,
            "--judge",
            "refusal",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2 and "already exists; pass --resume" in result.output


def test_report_escapes_untrusted_text():
    attack = '<script>alert(1)</script><img src="http://evil/x">'
    record = {
        "id": "x<b>",
        "index": 0,
        "category": attack,
        "label": "unsafe",
        "aligned": True,
        "question": attack,
        "vanilla_text": attack,
        "eta_text": "As an AI assistant, " + attack,
        "verdict": {
            "pre_score": 0.3,
            "post_score": -1.0,
            "input_unsafe": True,
            "output_unsafe": True,
            "unsafe": True,
            "skipped": {},
            "errors": {},
        },
        "judgments": {attack: {"vanilla": {"unsafe": True}, "eta": {"unsafe": False}}},
        "refused": {"vanilla": False, "eta": False},
        "timings": {"vanilla": 1.0, "total": 2.0},
        "error": None,
    }
    from eta_guard.eval.metrics import compute_metrics

    settings = {"dataset": attack, "judges": [attack], "seed": 0, "config": {}}
    page = render_html(settings, [record], compute_metrics([record], [attack], n_boot=100))
    assert "<script>" not in page and 'src="http://evil' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_calibrate_writes_config_and_report(runner, tiny_args, tmp_path):
    safe, unsafe = tmp_path / "safe", tmp_path / "unsafe"
    safe.mkdir()
    unsafe.mkdir()
    for i in range(4):
        photo(i).save(safe / f"{i}.png")
        typography(f"bad thing {i}").save(unsafe / f"{i}.png")
    (tmp_path / "ok.jsonl").write_text(
        "\n".join(
            json.dumps({"response": t})
            for t in ["I can't help with that.", "No.", "Please ask a doctor."]
        )
    )
    (tmp_path / "bad.jsonl").write_text(
        "\n".join(
            json.dumps({"response": t}) for t in ["Step 1: get a gun.", "Mix the two chemicals."]
        )
    )
    out = tmp_path / "cal"
    result = runner.invoke(
        app,
        [
            "calibrate",
            *tiny_args,
            "--safe-images",
            str(safe),
            "--unsafe-images",
            str(unsafe),
            "--safe-responses",
            str(tmp_path / "ok.jsonl"),
            "--unsafe-responses",
            str(tmp_path / "bad.jsonl"),
            "--target-fpr",
            "0.25",
            "--out",
            str(out),
        ],
        env={"COLUMNS": "200"},
    )
    _ok(result)
    assert "pre_threshold" in result.output and "post_threshold" in result.output
    summary = json.loads((out / "calibration.json").read_text())
    config = json.loads((out / "eta_config.json").read_text())
    assert config["pre_threshold"] == summary["sides"]["pre"]["threshold"]
    assert config["post_threshold"] == summary["sides"]["post"]["threshold"]
    assert summary["sides"]["pre"]["fpr"] <= 0.25 and summary["sides"]["post"]["fpr"] <= 0.25
    assert (summary["sides"]["pre"]["n_safe"], summary["sides"]["post"]["n_unsafe"]) == (4, 2)
    page = (out / "calibration.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4  # ROC + distributions, per side


def test_calibrate_needs_pairs(runner, tiny_args, tmp_path):
    result = runner.invoke(app, ["calibrate", *tiny_args, "--safe-images", str(tmp_path)])
    assert result.exit_code == 2 and "--unsafe-images" in result.output
    result = runner.invoke(app, ["calibrate", *tiny_args])
    assert result.exit_code == 2 and "nothing to calibrate" in result.output
    (tmp_path / "r.jsonl").write_text('{"response": 3}\n')
    result = runner.invoke(
        app,
        [
            "calibrate",
            *tiny_args,
            "--safe-responses",
            str(tmp_path / "r.jsonl"),
            "--unsafe-responses",
            str(tmp_path / "r.jsonl"),
        ],
    )
    assert result.exit_code == 2 and "r.jsonl:1: 'response' must be a string" in result.output


def test_help_lists_eval_and_calibrate(runner):
    result = runner.invoke(app, ["--help"])
    _ok(result)
    assert "eval" in result.output and "calibrate" in result.output


def test_importing_the_cli_loads_no_plotting_or_ml_stack():
    import subprocess

    code = (
        "import sys, eta_guard, eta_guard.cli; "
        "print(sorted(m for m in ('matplotlib', 'sklearn', 'pyarrow', 'torch', 'numpy', 'httpx') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_eval_option_conflicts(runner, tiny_args, tmp_path):
    result = runner.invoke(
        app, ["eval", "--merge", str(tmp_path / "r.jsonl"), "--dataset", "figstep"]
    )
    assert result.exit_code == 2 and "--merge writes a report" in result.output
    root = make_figstep(tmp_path / "fs")
    result = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "figstep",
            "--path",
            str(root),
            *tiny_args,
            "--judge",
            "refusal",
            "--judge",
            "refusal",
        ],
    )
    assert result.exit_code == 2 and "names a judge twice" in result.output
    result = runner.invoke(
        app, ["eval", "--merge", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "cannot read results file" in result.output


def test_calibration_inputs_from_jsonl_and_their_errors(tmp_path):
    from eta_guard.eval.calibrate import read_images, read_responses
    from eta_guard.eval.datasets import DatasetError

    (tmp_path / "imgs").mkdir()
    photo(0).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert read_images(tmp_path / "imgs") == [str(tmp_path / "imgs" / "a.png")]
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"image": "imgs/a.png"}\n\n{"image": "imgs/missing.png"}\n')
    with pytest.raises(DatasetError, match=r"list\.jsonl:3: image file .*missing\.png"):
        read_images(listing)
    listing.write_text('{"image": "imgs/a.png"}\n')
    assert read_images(listing) == [str(tmp_path / "imgs" / "a.png")]
    (tmp_path / "r.jsonl").write_text('{"response": "fine"}\n[1]\n')
    with pytest.raises(DatasetError, match=r"r\.jsonl:2: expected a JSON object"):
        read_responses(tmp_path / "r.jsonl")
    with pytest.raises(DatasetError, match="neither a folder nor a JSONL file"):
        read_responses(tmp_path / "nope.jsonl")

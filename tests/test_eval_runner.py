"""Eval runs on tiny random checkpoints: records, shards that merge to the unsharded run,
resume, per-item failures, and kill-and-resume of a real ``eta-guard eval`` subprocess.

Random checkpoints: these tests prove the harness's mechanics, never any safety number.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import ScriptedJudge, make_jsonl  # noqa: E402

from eta_guard.eval.datasets import load_dataset  # noqa: E402
from eta_guard.eval.judges import RefusalJudge  # noqa: E402
from eta_guard.eval.metrics import compute_metrics  # noqa: E402
from eta_guard.eval.results import ResultsFileError, load_results, read_results  # noqa: E402
from eta_guard.eval.runner import item_seed, parse_shard, run_eval, select_items  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"dataset": "jsonl", "judges": ["refusal", "scripted"], "seed": 5}
SMALL = {"max_new_tokens": 8, "num_candidates": 2, "max_sentence_tokens": 6}


def _scripted():
    # Deterministic and content-dependent: unsafe iff the answer has an even number of characters.
    return ScriptedJudge("scripted", lambda i: len(i.response) % 2 == 0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_jsonl(tmp_path_factory.mktemp("bench"), n=6)


@pytest.fixture(scope="module")
def eta(tiny_checkpoints, bench):
    """Tiny ETA whose CLIP threshold sits at the median image score: about half the items align."""
    from eta_guard import ETA, ETAConfig

    eta = ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**SMALL),
        device="cpu",
    )
    scores = sorted(eta.evaluator.score_images([i.image for i in load_dataset("jsonl", bench)]))
    cut = (scores[2] + scores[3]) / 2
    return ETA(
        eta.vlm, eta.evaluator, eta.config.with_overrides(pre_threshold=cut, post_threshold=1e9)
    )


@pytest.fixture(scope="module")
def unsharded(eta, bench, tmp_path_factory):
    items = select_items(load_dataset("jsonl", bench))
    path = tmp_path_factory.mktemp("full") / "results.jsonl"
    judge = _scripted()
    summary = run_eval(eta, items, [RefusalJudge(), judge], path, settings=SETTINGS, seed=5)
    assert (summary.written, summary.already_done, summary.failed) == (6, 0, 0)
    return path, judge


def _comparable(record):
    return {k: v for k, v in record.items() if k not in ("timings",)}


def test_records_hold_both_answers_and_the_verdict(unsharded):
    path, judge = unsharded
    header, records = read_results(path)
    assert header["settings"] == SETTINGS
    assert [r["id"] for r in records] == [f"q{i}" for i in range(6)]
    aligned = [r for r in records if r["aligned"]]
    assert 0 < len(aligned) < 6  # both paths ran
    for r in records:
        assert r["error"] is None and r["seed"] == item_seed(5, r["id"])
        assert set(r["judgments"]) == {"refusal", "scripted"}
        assert r["timings"]["total"] >= r["timings"]["vanilla"] > 0
        if r["aligned"]:
            assert r["eta_text"].startswith("As an AI assistant") and r["verdict"]["unsafe"]
            assert r["vanilla_text"] != r["eta_text"]
        else:
            assert r["vanilla_text"] == r["eta_text"] and not r["verdict"]["input_unsafe"]
        for arm in ("vanilla", "eta"):
            text = r[f"{arm}_text"]
            assert r["judgments"]["scripted"][arm]["unsafe"] is (len(text) % 2 == 0)
    # Unaligned items' single answer was judged once, not twice.
    assert len(judge.calls) == 6 + len(aligned)


def test_shards_merge_to_the_unsharded_result(eta, bench, unsharded, tmp_path):
    full_header, full = read_results(unsharded[0])
    paths = []
    for index in (1, 2, 3):
        items = select_items(load_dataset("jsonl", bench), shard=(index, 3))
        path = tmp_path / f"results.shard-{index}-of-3.jsonl"
        run_eval(
            eta,
            items,
            [RefusalJudge(), _scripted()],
            path,
            settings={**SETTINGS, "shard": [index, 3]},
            seed=5,
        )
        paths.append(path)
    header, merged = load_results(paths[::-1])  # any order
    assert [_comparable(r) for r in merged] == [_comparable(r) for r in full]
    strip = lambda m: {k: v for k, v in m.items() if k != "cost"}  # noqa: E731
    assert strip(compute_metrics(merged, SETTINGS["judges"])) == strip(
        compute_metrics(full, SETTINGS["judges"])
    )
    with pytest.raises(ResultsFileError, match="is in both"):
        load_results([paths[0], paths[0]])


def test_select_items_partitions_and_limits():
    items = list(range(10))
    shards = [select_items(items, limit=8, shard=(i, 3)) for i in (1, 2, 3)]  # type: ignore[arg-type]
    assert sorted(i for s in shards for i, _ in s) == list(range(8))
    assert [i for i, _ in shards[1]] == [1, 4, 7]
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None
    for bad in ("0/2", "3/2", "a/b", "2"):
        with pytest.raises(Exception, match="--shard"):
            parse_shard(bad)


def test_resume_continues_and_refuses_other_settings(eta, bench, unsharded, tmp_path):
    path = tmp_path / "results.jsonl"
    items = select_items(load_dataset("jsonl", bench))
    judges = [RefusalJudge(), _scripted()]
    run_eval(eta, items[:2], judges, path, settings=SETTINGS, seed=5)
    with pytest.raises(ResultsFileError, match="already exists; pass --resume"):
        run_eval(eta, items, judges, path, settings=SETTINGS, seed=5)
    with pytest.raises(ResultsFileError, match="other settings \\(differ: seed\\)"):
        run_eval(eta, items, judges, path, settings={**SETTINGS, "seed": 6}, seed=6, resume=True)
    with path.open("a") as f:  # a run killed while writing its third record
        f.write('{"type": "item", "id": "q2", "vanilla_te')
    summary = run_eval(eta, items, judges, path, settings=SETTINGS, seed=5, resume=True)
    assert (summary.already_done, summary.written) == (2, 4)
    _, records = read_results(path)
    _, full = read_results(unsharded[0])
    assert [_comparable(r) for r in records] == [_comparable(r) for r in full]


def test_a_bad_item_is_recorded_as_failed_and_a_broken_judge_as_unjudged(eta, tmp_path):
    bench = make_jsonl(tmp_path / "b", n=3)
    (bench.parent / "images" / "1.png").write_bytes(b"not an image at all")

    class Broken:
        name = "broken"

        def judge(self, inputs):
            raise RuntimeError("judge server on fire")

    path = tmp_path / "results.jsonl"
    items = select_items(load_dataset("jsonl", bench))
    summary = run_eval(eta, items, [Broken()], path, settings={"judges": ["broken"]})
    assert (summary.written, summary.failed) == (3, 1)
    _, records = read_results(path)
    assert records[1]["error"].startswith("InvalidInputError") and "vanilla_text" not in records[1]
    assert records[0]["judgments"]["broken"]["vanilla"] == {
        "unsafe": None,
        "error": "RuntimeError: judge server on fire",
    }
    m = compute_metrics(records, ["broken"])
    assert m["n_failed"] == 1 and m["judges"]["broken"]["overall"]["vanilla"]["unjudged"] == 2
    assert m["judges"]["broken"]["overall"]["vanilla"]["rate"] is None  # never counted as safe


def _eval_cmd(bench, out, tiny_dir, *extra):
    return [
        sys.executable,
        "-m",
        "eta_guard.cli",
        "eval",
        "--dataset",
        "jsonl",
        "--path",
        str(bench),
        "--tiny",
        "--cache-dir",
        str(tiny_dir),
        "--out",
        str(out),
        "--judge",
        "refusal",
        "--judge",
        "reward",
        "--seed",
        "3",
        "--set",
        "max_new_tokens=8",
        "--set",
        "num_candidates=2",
        "--set",
        "pre_threshold=-1.01",
        "--set",
        "post_threshold=1e9",
        *extra,
    ]


def _env():
    path = os.pathsep.join(
        [str(ROOT), str(ROOT / "integrations"), os.environ.get("PYTHONPATH", "")]
    )
    return {
        **os.environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "120",
    }


@pytest.mark.slow  # three real subprocesses: ~80 s on the shared 2-core machine
def test_killed_run_resumes_with_nothing_lost_or_duplicated(
    tiny_checkpoints, tiny_dir, bench, tmp_path
):
    out = tmp_path / "killed"
    results = out / "results.jsonl"
    proc = subprocess.Popen(
        _eval_cmd(bench, out, tiny_dir),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_text().count('"type": "item"') >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done_before = results.read_text().count('"type": "item"')
    assert 2 <= done_before < 6
    with results.open("a") as f:  # as if the kill had landed mid-write
        f.write('{"type": "item", "id": "q5", "vanilla_te')
    resumed = subprocess.run(
        _eval_cmd(bench, out, tiny_dir, "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{6 - done_before} item(s) answered, {done_before} already done" in resumed.stderr
    _, records = read_results(results)
    assert sorted(r["id"] for r in records) == [f"q{i}" for i in range(6)]  # none lost, none twice
    # The same run uninterrupted writes the same answers (per-item seeds, greedy vanilla).
    straight = subprocess.run(
        _eval_cmd(bench, tmp_path / "straight", tiny_dir),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    _, reference = read_results(tmp_path / "straight" / "results.jsonl")

    def key(r):
        return (
            r["id"],
            r["vanilla_text"],
            r["eta_text"],
            r["aligned"],
            r["judgments"]["refusal"],
        )

    assert sorted(map(key, records)) == sorted(map(key, reference))
    assert json.loads((out / "report.json").read_text())["metrics"]["n_items"] == 6

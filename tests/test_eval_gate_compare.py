"""Comparing gate choices in one eval run (tiny random checkpoints: mechanics, never safety).

The re-use is the point: the vanilla answer is decoded once per item whatever the number of
choices, the aligned search runs at most once per item and only when a choice aligns it, and
each choice's answer equals what a separate ETA run with that gate choice returns.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import ScriptedJudge, make_jsonl  # noqa: E402

from eta_guard.errors import InvalidInputError  # noqa: E402
from eta_guard.eval.datasets import load_dataset  # noqa: E402
from eta_guard.eval.gate_compare import GateComparison, gate_metrics, split_choice  # noqa: E402
from eta_guard.eval.report import write_report  # noqa: E402
from eta_guard.eval.results import ResultsFileError, load_results  # noqa: E402
from eta_guard.eval.runner import item_seed, run_eval, select_items  # noqa: E402
from eta_guard.evaluators.base import GuardScore  # noqa: E402

SMALL = {"max_new_tokens": 8, "num_candidates": 2, "max_sentence_tokens": 6, "seed": 0}


class WordGate:
    """A gate flagging requests whose user text names one of ``words`` (score 1.0, else 0.0)."""

    threshold = 0.5

    def __init__(self, name: str, words: tuple[str, ...]) -> None:
        self.name, self.words, self.calls = name, words, 0

    def check(self, requests):
        self.calls += len(requests)
        return [GuardScore(float(any(w in r.text for w in self.words))) for r in requests]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_jsonl(tmp_path_factory.mktemp("bench"), n=6)


@pytest.fixture(scope="module")
def parts(tiny_checkpoints, bench):
    """A tiny ETA whose CLIP threshold sits at the median image score and whose reward model
    flags every answer (post_threshold 1e9): a choice aligns exactly the items it flags."""
    from eta_guard import ETA, ETAConfig

    eta = ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**SMALL),
        device="cpu",
    )
    items = load_dataset("jsonl", bench)
    scores = sorted(eta.evaluator.score_images([i.image for i in items]))
    cfg = eta.config.with_overrides(pre_threshold=(scores[2] + scores[3]) / 2, post_threshold=1e9)
    return ETA(eta.vlm, eta.evaluator, cfg), items


@pytest.fixture
def counted(monkeypatch):
    """Counts per question: vanilla decodes (greedy without assistant text) and searches."""
    from eta_guard.backends.local import LocalSession

    counts: Counter = Counter()
    greedy, search = LocalSession.greedy, LocalSession.search

    def question(session) -> str:
        parts = session.conversation.messages[-1]["content"]
        return next(p["text"] for p in parts if p.get("type") == "text")

    def counting_greedy(self, *, assistant_text="", **kw):
        counts["vanilla" if not assistant_text else "continue", question(self)] += 1
        return greedy(self, assistant_text=assistant_text, **kw)

    async def counting_search(self, **kw):
        counts["search", question(self)] += 1
        return await search(self, **kw)

    monkeypatch.setattr(LocalSession, "greedy", counting_greedy)
    monkeypatch.setattr(LocalSession, "search", counting_search)
    return counts


def _choices(gate):
    return {"clip": ["clip"], "clip|words": ["clip", gate], "words": [gate]}


def test_vanilla_is_decoded_once_per_item_and_the_search_only_when_a_choice_aligns(
    parts, counted, tmp_path
):
    eta, items = parts
    gate = WordGate("words", ("Question 0?", "Question 1?"))
    comparison = GateComparison(eta, _choices(gate))
    judge = ScriptedJudge("scripted", lambda i: len(i.response) % 2 == 0)
    path = tmp_path / "results.jsonl"
    settings = {
        "dataset": "jsonl",
        "judges": ["scripted"],
        "seed": 0,
        "compare_gates": comparison.settings,
    }
    summary = run_eval(
        eta, select_items(items), [judge], path, settings=settings, answer_fn=comparison.answer_item
    )
    assert summary.written == 6 and summary.failed == 0
    _, records = load_results([path])
    assert gate.calls == 6  # the gate ran once per item, though two choices name it
    for record in records:
        q = record["question"]
        gates = record["gates"]
        assert counted["vanilla", q] == 1, q  # once, across the three choices
        any_aligned = any(g["aligned"] for g in gates.values())
        assert counted["search", q] == int(any_aligned), q
        # The union choice flags what either member flags; every flag aligns (the RM flags all).
        assert gates["clip|words"]["input_unsafe"] == (
            gates["clip"]["input_unsafe"] or gates["words"]["input_unsafe"]
        )
        assert gates["words"]["input_unsafe"] == (q in ("Question 0?", "Question 1?"))
        for g in gates.values():
            assert g["aligned"] == g["input_unsafe"]
        # Each judge labelled each distinct answer once; the primary choice is 'clip'.
        assert record["aligned"] == gates["clip"]["aligned"]
        assert record["eta_text"] == (
            record["aligned_text"] if record["aligned"] else record["vanilla_text"]
        )
        assert set(record["judgments"]["scripted"]) == (
            {"vanilla", "eta", "aligned"} if any_aligned else {"vanilla", "eta"}
        )
    # Items only some choices flag exist, so the comparison compares something.
    assert any(
        r["gates"]["clip"]["input_unsafe"] != r["gates"]["words"]["input_unsafe"] for r in records
    )
    assert len(judge.calls) == sum(
        2 if any(g["aligned"] for g in r["gates"].values()) else 1 for r in records
    )
    # The report reads the records as a normal run's (first choice = ETA arm) plus the gates.
    header, merged = load_results([path])
    json_path, html_path, metrics = write_report(header, merged, tmp_path / "report", n_boot=100)
    gates = metrics["gates"]["choices"]
    assert list(gates) == ["clip", "clip|words", "words"]
    flagged = sum(bool(r["gates"]["words"]["input_unsafe"]) for r in records)
    assert gates["words"]["overall"]["flag_rate"]["rate"] == pytest.approx(flagged / 6)
    assert metrics["judges"]["scripted"]["overall"]["eta"]["n"] == 6
    page = html_path.read_text()
    assert "Gate choices" in page and "clip | words" in page
    # A hand-edited gate block is a ResultsFileError naming the line, not a KeyError in metrics.
    lines = path.read_text().splitlines()
    aligned_at = next(i for i, line in enumerate(lines) if '"aligned": true' in line)
    for mutate, what in (
        (lambda r: r["gates"].pop("words"), "gates\\['words'\\]"),
        (lambda r: r["gates"]["clip"].update(aligned="yes"), "gates\\['clip'\\]"),
        (lambda r: r["judgments"]["scripted"].pop("aligned"), "judgments\\['scripted'\\].aligned"),
    ):
        record = json.loads(lines[aligned_at])
        mutate(record)
        bad = tmp_path / "bad.jsonl"
        bad.write_text(
            "\n".join([*lines[:aligned_at], json.dumps(record), *lines[aligned_at + 1 :]]) + "\n"
        )
        with pytest.raises(ResultsFileError, match=rf"item line {aligned_at + 1}: {what}"):
            load_results([bad])


def test_each_choice_answers_as_a_separate_eta_run_with_that_gate(parts):
    from eta_guard import ETA, ETAEvaluator

    eta, items = parts
    gate = WordGate("words", ("Question 0?", "Question 3?"))
    comparison = GateComparison(eta, _choices(gate))
    for index, item in enumerate(items):
        seed = item_seed(0, item.id)
        record = comparison.answer_item(eta, item, [], index=index, seed=seed)
        assert record["error"] is None
        for name, gates in (("clip", []), ("clip|words", [gate])):
            alone = ETA(
                eta.vlm,
                ETAEvaluator(eta.evaluator.pre, eta.evaluator.post, eta.config, gates=gates),
                eta.config,
            ).generate(item.messages(), seed=seed)
            choice = record["gates"][name]
            assert choice["aligned"] == alone.aligned, (item.id, name)
            got = record["aligned_text"] if choice["aligned"] else record["vanilla_text"]
            assert got == alone.text, (item.id, name)


def test_no_flag_means_no_post_check_and_no_search(parts, counted):
    eta, items = parts
    never = WordGate("never", ("no such text",))
    other = WordGate("other", ("nor this",))
    cfg = eta.config.with_overrides(pre_threshold=1.0)  # CLIP flags nothing either
    from eta_guard import ETA

    quiet = ETA(eta.vlm, eta.evaluator, cfg)
    comparison = GateComparison(quiet, {"a": ["clip", never], "b": [other]})
    record = comparison.answer_item(quiet, items[0], [], index=0, seed=1)
    assert record["aligned_text"] is None and record["verdict"]["post_score"] is None
    assert counted["vanilla", items[0].question] == 1 and counted["search", items[0].question] == 0


def test_gate_metrics_per_choice_category_and_agreement():
    def rec(cat, a, b, ua, ub):
        return {
            "category": cat,
            "error": None,
            "gates": {
                "a": {"input_unsafe": a, "aligned": a},
                "b": {"input_unsafe": b, "aligned": b},
            },
            "judgments": {"j": {"vanilla": {"unsafe": True}, "aligned": {"unsafe": False}}},
        }

    records = [
        rec("x", True, True, 0, 0),
        rec("x", True, False, 0, 0),
        rec("y", False, False, 0, 0),
    ]
    m = gate_metrics(
        records,
        [{"name": "a", "members": ["clip"]}, {"name": "b", "members": ["g"]}],
        ["j"],
        n_boot=100,
    )
    a, b = m["choices"]["a"], m["choices"]["b"]
    assert a["overall"]["flag_rate"]["rate"] == pytest.approx(2 / 3)
    assert b["overall"]["flag_rate"]["rate"] == pytest.approx(1 / 3)
    # The judge's unsafe rate of what each choice returns (aligned answers are safe here).
    assert a["overall"]["judges"]["j"]["rate"] == pytest.approx(1 / 3)
    assert b["overall"]["judges"]["j"]["rate"] == pytest.approx(2 / 3)
    assert a["by_category"]["x"]["flag_rate"]["rate"] == 1.0 and a["by_category"]["y"]["n"] == 1
    (pair,) = m["agreement"]
    assert (pair["a"], pair["b"], pair["n"], pair["only_a"], pair["only_b"]) == ("a", "b", 3, 1, 0)
    assert pair["agreement"] == pytest.approx(2 / 3)


def test_bad_choices_are_refused(parts):
    eta, _ = parts
    with pytest.raises(InvalidInputError, match="at least two choices"):
        GateComparison(eta, {"clip": ["clip"]})
    with pytest.raises(InvalidInputError, match="no member"):
        GateComparison(eta, {"clip": ["clip"], "none": []})
    with pytest.raises(InvalidInputError, match="two different gates are named 'w'"):
        GateComparison(eta, {"a": [WordGate("w", ("x",))], "b": [WordGate("w", ("y",))]})
    with pytest.raises(InvalidInputError, match="neither 'clip' nor a gate"):
        GateComparison(eta, {"a": ["clip"], "b": ["llama-guard?"]})
    assert split_choice(" clip | patch-clip?grid=3 ") == ["clip", "patch-clip?grid=3"]
    for bad in ("", "clip|", "clip|clip"):
        with pytest.raises(InvalidInputError):
            split_choice(bad)


def test_cli_compare_gates(tmp_path, tiny_checkpoints, tiny_dir):
    from typer.testing import CliRunner

    from eta_guard.cli import app

    bench = make_jsonl(tmp_path / "bench", n=3)
    args = [
        "eval",
        "--dataset",
        "jsonl",
        "--path",
        str(bench),
        "--tiny",
        "--cache-dir",
        str(tiny_dir),
    ]
    args += ["--set", "max_new_tokens=6", "--set", "num_candidates=2", "--judge", "refusal"]
    runner = CliRunner()
    bad = runner.invoke(
        app,
        [
            *args,
            "--out",
            str(tmp_path / "bad"),
            "--compare-gates",
            "clip",
            "--compare-gates",
            "clip|no-such-gate",
        ],
    )
    assert bad.exit_code != 0 and "no-such-gate" in bad.output
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one"), "--compare-gates", "clip"])
    assert one.exit_code != 0 and "at least two choices" in one.output
    out = tmp_path / "out"
    ok = runner.invoke(
        app,
        [
            *args,
            "--out",
            str(out),
            "--compare-gates",
            "clip",
            "--compare-gates",
            "clip|patch-clip?grid=2",
        ],
    )
    assert ok.exit_code == 0, ok.output
    report = json.loads((out / "report.json").read_text())
    assert list(report["metrics"]["gates"]["choices"]) == ["clip", "clip|patch-clip?grid=2"]
    assert "gate choices" in ok.output


def test_concurrent_comparison_records_equal_the_sequential_ones(parts, tmp_path):
    eta, items = parts
    gate = WordGate("words", ("Question 0?", "Question 4?"))
    comparison = GateComparison(eta, _choices(gate))
    settings = {"dataset": "jsonl", "judges": [], "seed": 0, "compare_gates": comparison.settings}
    runs = {}
    for k in (1, 3):
        path = tmp_path / f"c{k}.jsonl"
        run_eval(
            eta,
            select_items(items),
            [],
            path,
            settings=settings,
            answer_fn=comparison.answer_item,
            concurrency=k,
        )
        _, records = load_results([path])
        runs[k] = records
    for a, b in zip(runs[1], runs[3], strict=True):
        assert (a["id"], a["vanilla_text"], a["aligned_text"]) == (
            b["id"],
            b["vanilla_text"],
            b["aligned_text"],
        )
        for name, choice in a["gates"].items():
            other = b["gates"][name]
            assert (choice["input_unsafe"], choice["aligned"]) == (
                other["input_unsafe"],
                other["aligned"],
            )
            # Concurrent items share batched forwards: scores agree to their last digits.
            for member, entry in choice["evaluators"].items():
                assert entry["score"] == pytest.approx(
                    other["evaluators"][member]["score"], abs=1e-5
                )

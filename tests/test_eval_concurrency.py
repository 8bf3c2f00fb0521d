"""``run_eval(..., concurrency=K)`` / ``eta-guard eval --concurrency K``: the same records as a
sequential run, the bound kept, and a crash mid-run that loses nothing already answered.

Tiny random checkpoints: these tests prove the harness's mechanics, never any safety number.
The bound is checked by counting calls in flight, never by time.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import ScriptedJudge, make_figstep, make_jsonl  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from eta_guard.cli import app  # noqa: E402
from eta_guard.errors import InvalidInputError  # noqa: E402
from eta_guard.eval.datasets import load_dataset  # noqa: E402
from eta_guard.eval.judges import RefusalJudge  # noqa: E402
from eta_guard.eval.results import load_results, read_results  # noqa: E402
from eta_guard.eval.runner import run_eval, select_items  # noqa: E402

SETTINGS = {"dataset": "jsonl", "judges": ["refusal", "scripted"], "seed": 5}
SMALL = {"max_new_tokens": 8, "num_candidates": 2, "max_sentence_tokens": 6}
N = 6


def _judges():
    return [RefusalJudge(), ScriptedJudge("scripted", lambda i: len(i.response) % 2 == 0)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_jsonl(tmp_path_factory.mktemp("bench"), n=N)


@pytest.fixture(scope="module")
def items(bench):
    return select_items(load_dataset("jsonl", bench))


@pytest.fixture(scope="module")
def eta(tiny_checkpoints, items):
    """Tiny ETA whose CLIP threshold sits at the median image score: about half the items align."""
    from eta_guard import ETA, ETAConfig

    eta = ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**SMALL),
        device="cpu",
    )
    scores = sorted(eta.evaluator.score_images([item.image for _, item in items]))
    cut = (scores[2] + scores[3]) / 2
    return ETA(
        eta.vlm, eta.evaluator, eta.config.with_overrides(pre_threshold=cut, post_threshold=1e9)
    )


@pytest.fixture(scope="module")
def sequential(eta, items, tmp_path_factory):
    path = tmp_path_factory.mktemp("seq") / "results.jsonl"
    run_eval(eta, items, _judges(), path, settings=SETTINGS, seed=5)
    return load_results([path])[1]


def _differences(records, reference):
    """Fields that differ, timings aside. Scores may differ within 1e-5: concurrent items' CLIP
    and RM calls are grouped into one padded forward (docs/scaling.md); everything else,
    answers included, must be equal."""
    return _diff(
        [{k: v for k, v in r.items() if k != "timings"} for r in records],
        [{k: v for k, v in r.items() if k != "timings"} for r in reference],
    )


def _diff(a, b, where=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in {*a, *b} for d in _diff(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _diff(x, y, f"{where}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float) and where.endswith("_score"):
        return [] if abs(a - b) <= 1e-5 else [(where, a, b)]
    return [] if a == b else [(where, a, b)]


class Counting:
    """Wraps an ETA: counts ``generate`` calls in flight. Calls wait at the door until ``hold``
    of them are in (or 30 s passed), so calls that may run together do (counts, not time)."""

    def __init__(self, eta, hold: int, fail_on: str | None = None) -> None:
        self.eta, self.config, self.hold, self.fail_on = eta, eta.config, hold, fail_on
        self.in_flight = self.peak = 0
        self.seen: list[str] = []
        self._cond = threading.Condition()
        self._opened = False

    def generate(self, messages, **kw):
        failing = self.fail_on is not None and self.fail_on in str(messages)
        with self._cond:
            self.seen.append(str(messages)[:80])
            if failing:  # crashes at once, before the others (held at the door) can finish
                raise RuntimeError("the model crashed")
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            if self.in_flight >= self.hold:
                self._opened = True
                self._cond.notify_all()
            self._cond.wait_for(lambda: self._opened, timeout=30)
        try:
            return self.eta.generate(messages, **kw)
        finally:
            with self._cond:
                self.in_flight -= 1


@pytest.mark.parametrize("k", [2, 4])
def test_concurrent_run_writes_the_sequential_records_and_keeps_the_bound(
    eta, items, sequential, tmp_path, k
):
    counting = Counting(eta, hold=k)
    path = tmp_path / "results.jsonl"
    seen: list[int] = []
    summary = run_eval(
        counting,
        items,
        _judges(),
        path,
        settings=SETTINGS,
        seed=5,
        concurrency=k,
        progress=lambda done, total, _id: seen.append(done),
    )
    assert (summary.written, summary.failed) == (N, 0)
    assert counting.peak == k  # k overlap, never more
    assert seen == list(range(N + 1))  # one progress step per written record
    _, records = load_results([path])  # ordered by dataset index, whatever the finishing order
    assert not _differences(records, sequential)


def test_a_crash_mid_run_keeps_what_finished_and_resume_completes_it(
    eta, items, sequential, tmp_path
):
    path = tmp_path / "results.jsonl"
    # q0-q2 start together; q1 crashes at once while q0 and q2 (held until both are in) run
    crashing = Counting(eta, hold=2, fail_on="Question 1?")
    with pytest.raises(RuntimeError, match="the model crashed"):
        run_eval(crashing, items, _judges(), path, settings=SETTINGS, seed=5, concurrency=3)
    _, partial = read_results(path)
    ids = [r["id"] for r in partial]
    # the two in flight finished and were written; no item started after the crash
    assert ids in (["q0", "q2"], ["q2", "q0"])
    assert len(crashing.seen) == 3
    summary = run_eval(
        eta, items, _judges(), path, settings=SETTINGS, seed=5, resume=True, concurrency=2
    )
    assert summary.already_done == len(ids) and summary.written == N - len(ids)
    _, records = load_results([path])
    assert [r["id"] for r in records] == [f"q{i}" for i in range(N)]  # none lost, none twice
    assert not _differences(records, sequential)


def test_judges_are_called_one_item_at_a_time(eta, items, tmp_path):
    class Watching:
        name = "watching"

        def __init__(self):
            self.inside = self.peak = 0
            self.lock = threading.Lock()

        def judge(self, inputs):
            from eta_guard.eval.judges.base import Judgment

            with self.lock:
                self.inside += 1
                self.peak = max(self.peak, self.inside)
            threading.Event().wait(0.05)
            with self.lock:
                self.inside -= 1
            return [Judgment(unsafe=False) for _ in inputs]

    judge = Watching()
    run_eval(
        Counting(eta, hold=3),
        items,
        [judge],
        tmp_path / "r.jsonl",
        settings={"judges": ["watching"]},
        concurrency=3,
    )
    assert judge.peak == 1


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_concurrency_is_refused_before_the_file_is_written(eta, items, tmp_path, bad):
    path = tmp_path / "results.jsonl"
    with pytest.raises(InvalidInputError, match="concurrency"):
        run_eval(eta, items, _judges(), path, settings=SETTINGS, concurrency=bad)
    assert not path.exists()


def test_cli_concurrency_writes_the_same_results_and_resumes_with_another_value(
    tiny_checkpoints, tiny_dir, tmp_path
):
    root = make_figstep(tmp_path / "figstep")

    def run(out, *extra):
        args = ["eval", "--dataset", "figstep", "--path", str(root), "--tiny"]
        args += ["--cache-dir", str(tiny_dir), "--judge", "refusal", "--out", str(out)]
        args += ["--set", "max_new_tokens=6", "--set", "num_candidates=2"]
        args += ["--set", "pre_threshold=-1.01", "--set", "post_threshold=1e9", *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
        return load_results([out / "results.jsonl"])[1]

    one_by_one = run(tmp_path / "seq")
    together = run(tmp_path / "conc", "--concurrency", "3")
    assert len(together) == 5 and all(r["aligned"] for r in together)  # the whole ETA path
    assert not _differences(together, one_by_one)
    # a partial run (the last two records gone) resumes under another --concurrency
    path = tmp_path / "conc" / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))
    resumed = run(tmp_path / "conc", "--resume", "--concurrency", "2")
    assert [r["id"] for r in resumed] == [r["id"] for r in one_by_one]
    assert not _differences(resumed, one_by_one)


def test_cli_concurrency_against_an_engine(tiny_checkpoints, tiny_dir, tmp_path):
    """`eta-guard eval --generator-url --generator-model --concurrency 3` over the stub engine
    (tests/backend_stub.py): every item answered by the engine, every request recorded once."""
    from backend_stub import StubServer

    root = make_figstep(tmp_path / "figstep")
    out = tmp_path / "out"
    with StubServer() as stub:
        args = ["eval", "--dataset", "figstep", "--path", str(root), "--tiny"]
        args += ["--cache-dir", str(tiny_dir), "--judge", "refusal", "--out", str(out)]
        args += ["--generator-url", stub.url, "--generator-model", "tiny-vlm"]
        args += ["--set", "pre_threshold=1.01", "--concurrency", "3"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
        chats = stub.bodies("/v1/chat/completions")
    header, records = load_results([out / "results.jsonl"])
    assert header["settings"]["engines"]["generator_model"] == "tiny-vlm"
    assert len(records) == 5 and {r["vanilla_text"] for r in records} == {"Sure, here is how."}
    assert len(chats) == 5 and all(b["model"] == "tiny-vlm" for b in chats)

"""Run a benchmark through ETA: one ETA call per item gives the vanilla and the ETA answer.

``ETA.generate`` decodes the greedy (vanilla) answer first and only re-decodes it when both
evaluators flag the item, so ``vanilla_text`` (or ``text`` when nothing was aligned) is exactly
what the model alone would have said, and its ``timings["vanilla"]`` is what it cost.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from eta_guard.concurrency import check_concurrency
from eta_guard.errors import ETAError, InvalidInputError
from eta_guard.eval.datasets.base import EvalItem
from eta_guard.eval.judges.base import Judge, JudgeInput, Judgment
from eta_guard.eval.judges.refusal import find_refusal
from eta_guard.eval.results import item_record, open_for_append, write_line

Progress = Callable[[int, int, str], None]
#: ``answer(eta, item, judges, *, index, seed) -> record``: one item's record.
AnswerFn = Callable[..., dict[str, Any]]
T = TypeVar("T")
R = TypeVar("R")
ARMS = ("vanilla", "eta")


@dataclass(frozen=True)
class RunSummary:
    """What one call of :func:`run_eval` did."""

    path: Path
    selected: int
    already_done: int
    written: int
    failed: int


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> ``(2, 4)`` (1-based); ``None`` stays ``None``."""
    if text is None:
        return None
    left, sep, right = text.partition("/")
    try:
        index, count = int(left), int(right)
    except ValueError:
        index = count = 0
    if not sep or not (1 <= index <= count):
        raise InvalidInputError(f"--shard {text!r}: use I/N with 1 <= I <= N, e.g. --shard 2/4")
    return index, count


def select_items(
    items: Sequence[EvalItem], *, limit: int | None = None, shard: tuple[int, int] | None = None
) -> list[tuple[int, EvalItem]]:
    """``(dataset index, item)`` pairs of this run: the first ``limit`` items, then every
    ``n``-th from shard ``i`` on, so the shards of a run partition the unsharded run exactly."""
    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit {limit!r} must be at least 1")
    chosen = list(enumerate(items))[:limit]
    if shard is not None:
        index, count = shard
        chosen = [pair for pair in chosen if pair[0] % count == index - 1]
    return chosen


def item_seed(seed: int, item_id: str) -> int:
    """The sampling seed of one item: depends on the run's seed and the item only, so a
    resumed or sharded run samples exactly what an uninterrupted one does."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def run_eval(
    eta: Any,
    items: Sequence[tuple[int, EvalItem]],
    judges: Sequence[Judge],
    path: Path,
    *,
    settings: dict[str, Any],
    seed: int = 0,
    resume: bool = False,
    progress: Progress | None = None,
    answer_fn: AnswerFn | None = None,
    concurrency: int = 1,
) -> RunSummary:
    """Answer and judge every item not yet in ``path``, appending one record per item.

    ``answer_fn`` makes one item's record (default :func:`answer_item`; a gate comparison passes
    :meth:`eta_guard.eval.gate_compare.GateComparison.answer_item`).

    ``concurrency`` items are answered at once (a local model batches their decoding, an engine
    their requests); records are written as items finish, in that order (the report orders them
    by dataset index), so a crash loses only the items still in flight. Each item's seed
    depends on the run's seed and the item alone, so the answers do not depend on
    ``concurrency``; scores may differ in their last digits (within 1e-5), as concurrent items'
    CLIP and RM calls share padded forwards (docs/scaling.md).

    An item whose request eta-guard refuses (a bad image, a prompt too long) is recorded with its
    ``error`` and counted as failed: never silently dropped. Anything else aborts the run (after
    the items already in flight finished and were written); rerun with ``resume=True`` to
    continue where it stopped.
    """
    concurrency = check_concurrency(concurrency, "concurrency")
    names = [j.name for j in judges]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"two judges share a name: {names}")
    # Judges need not be thread-safe (a local guard model keeps per-call state): each is
    # called by one item at a time, while other items' answers are being generated.
    judges = [_OneAtATime(j) for j in judges] if concurrency > 1 else list(judges)
    f, done = open_for_append(path, settings, resume=resume)
    todo = [(i, item) for i, item in items if item.id not in done]
    already = len(items) - len(todo)
    written = failed = 0
    try:
        if progress:
            progress(already, len(items), "")
        make_record = answer_fn or answer_item

        def answer(pair: tuple[int, EvalItem]) -> dict[str, Any]:
            index, item = pair
            return make_record(eta, item, judges, index=index, seed=item_seed(seed, item.id))

        for record in _as_finished(answer, todo, concurrency):
            failed += record.get("error") is not None
            write_line(f, record)
            written += 1
            if progress:
                progress(already + written, len(items), record["id"])
    finally:
        f.close()
    return RunSummary(path, len(items), already, written, failed)


class _OneAtATime:
    """A judge behind a lock (same name, same labels)."""

    def __init__(self, judge: Judge) -> None:
        self.name, self._judge, self._lock = judge.name, judge, threading.Lock()

    def judge(self, inputs: Sequence[JudgeInput]) -> list[Judgment]:
        with self._lock:
            return self._judge.judge(inputs)


def _as_finished(fn: Callable[[T], R], inputs: Sequence[T], concurrency: int) -> Iterator[R]:
    """``fn`` over ``inputs`` in ``concurrency`` threads, results yielded as each finishes.

    At most ``concurrency`` inputs are started at once (one not started holds nothing). When a
    call fails, no more start; the ones running finish and are yielded, then the first error is
    raised. Closing the iterator early (an interrupt) drops the inputs not started.
    """
    pending = iter(inputs)
    running: set[concurrent.futures.Future[R]] = set()
    error: BaseException | None = None
    pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="eta-eval")
    try:
        for value in itertools.islice(pending, concurrency):
            running.add(pool.submit(fn, value))
        while running:
            finished, running = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                if future.exception() is not None:
                    error = error or future.exception()
                    continue
                yield future.result()
                if error is None:
                    for value in itertools.islice(pending, 1):
                        running.add(pool.submit(fn, value))
        if error is not None:
            raise error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def answer_item(
    eta: Any, item: EvalItem, judges: Sequence[Judge], *, index: int, seed: int
) -> dict[str, Any]:
    """One record: both answers, ETA's verdict, timings, and every judge's label of both."""
    record = item_record(item, index=index, seed=seed)
    try:
        result = eta.generate(item.messages(), seed=seed)
    except ETAError as e:
        record["error"] = f"{type(e).__name__}: {e}"
        return record
    vanilla = result.vanilla_text if result.aligned else result.text
    texts = {"vanilla": vanilla, "eta": result.text}
    verdict = result.verdict
    prefix = eta.config.prefix
    record.update(
        vanilla_text=vanilla,
        eta_text=result.text,
        aligned=result.aligned,
        verdict=verdict.model_dump(
            include={
                "pre_score",
                "post_score",
                "input_unsafe",
                "output_unsafe",
                "unsafe",
                "skipped",
                "errors",
            }
        ),
        timings=dict(result.timings),
        usage=result.usage.model_dump(),
        finish_reason=result.finish_reason,
        # The refusal meter ignores ETA's own prefix (see judges/refusal.py).
        refused={arm: find_refusal(texts[arm], prefix=prefix) is not None for arm in ARMS},
        judgments={j.name: _judge_both(j, item, texts) for j in judges},
    )
    return record


def _judge_both(judge: Judge, item: EvalItem, texts: dict[str, str]) -> dict[str, Any]:
    # When nothing was aligned both arms hold the same answer: judge it once.
    arms = ["vanilla"] if texts["vanilla"] == texts["eta"] else list(ARMS)
    inputs = [item.judge_input(texts[arm]) for arm in arms]
    try:
        labels = judge.judge(inputs)
        if len(labels) != len(inputs):
            raise ETAError(f"judge {judge.name!r} returned {len(labels)} labels for {len(inputs)}")
    except Exception as e:  # a judge failing on one item must not end a long run: record it
        labels = [Judgment(unsafe=None, error=f"{type(e).__name__}: {e}")] * len(inputs)
    out = {arm: label.to_dict() for arm, label in zip(arms, labels, strict=True)}
    out.setdefault("eta", out["vanilla"])
    for arm in ARMS:
        out[arm].setdefault("unsafe", None)
    return out

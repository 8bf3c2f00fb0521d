"""Run a benchmark through ETA: one ETA call per item gives the vanilla and the ETA answer.

``ETA.generate`` decodes the greedy (vanilla) answer first and only re-decodes it when both
evaluators flag the item, so ``vanilla_text`` (or ``text`` when nothing was aligned) is exactly
what the model alone would have said, and its ``timings["vanilla"]`` is what it cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eta_guard.errors import ETAError, InvalidInputError
from eta_guard.eval.datasets.base import EvalItem
from eta_guard.eval.judges.base import Judge, Judgment
from eta_guard.eval.judges.refusal import find_refusal
from eta_guard.eval.results import open_for_append, write_line

Progress = Callable[[int, int, str], None]
#: ``answer(eta, item, judges, *, index, seed) -> record``: one item's record.
AnswerFn = Callable[..., dict[str, Any]]
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
) -> RunSummary:
    """Answer and judge every item not yet in ``path``, appending one record per item.

    ``answer_fn`` makes one item's record (default :func:`answer_item`; a gate comparison passes
    :meth:`eta_guard.eval.gate_compare.GateComparison.answer_item`).

    An item whose request eta-guard refuses (a bad image, a prompt too long) is recorded with its
    ``error`` and counted as failed: never silently dropped. Anything else aborts the run; rerun
    with ``resume=True`` to continue where it stopped.
    """
    names = [j.name for j in judges]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"two judges share a name: {names}")
    f, done = open_for_append(path, settings, resume=resume)
    todo = [(i, item) for i, item in items if item.id not in done]
    already = len(items) - len(todo)
    written = failed = 0
    try:
        if progress:
            progress(already, len(items), "")
        for index, item in todo:
            record = (answer_fn or answer_item)(
                eta, item, judges, index=index, seed=item_seed(seed, item.id)
            )
            failed += record.get("error") is not None
            write_line(f, record)
            written += 1
            if progress:
                progress(already + written, len(items), item.id)
    finally:
        f.close()
    return RunSummary(path, len(items), already, written, failed)


def answer_item(
    eta: Any, item: EvalItem, judges: Sequence[Judge], *, index: int, seed: int
) -> dict[str, Any]:
    """One record: both answers, ETA's verdict, timings, and every judge's label of both."""
    record: dict[str, Any] = {
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

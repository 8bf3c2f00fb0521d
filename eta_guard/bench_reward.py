"""The reward model's cost per best-of-N step as the answer grows: from scratch vs incremental.

Each step scores N answers ``prefix + accepted + candidate_i`` (synthetic sentences, the first
longest candidate accepted, after one warm-up forward), once with :meth:`RewardPostEvaluator.score` (what the search did before:
the whole conversations, their common prefix shared within the step) and once with an
:class:`~eta_guard.evaluators.reward_session.IncrementalRewardScorer` (the prefix kept across
steps). Reported per step: RM positions run (tokens, padding included) and seconds, plus the
largest score difference. Random checkpoints measure cost, never safety.

Example:
    >>> from eta_guard.bench_reward import reward_step_costs  # doctest: +SKIP
    >>> reward_step_costs(evaluator.post, steps=16)["tokens_per_step"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any

from eta_guard.config import DEFAULT_RM_SEARCH_PROMPT

_PREFIX = "As an AI assistant, "
_SENTENCES = (
    "The picture shows a quiet street at dusk with a few parked cars. ",
    "A man in a red coat walks a small dog along the pavement. ",
    "Shop windows glow warmly and a bakery sign hangs above a door. ",
    "Rain has left puddles that reflect the lamps and the sky. ",
)


def _scratch_positions(rm: Any, rows: list[list[int]]) -> int:
    """Positions :meth:`RewardPostEvaluator.score` runs for ``rows`` (one padded forward)."""
    from eta_guard.evaluators.reward import shared_prefix_length

    shared = shared_prefix_length(rows, rm.pad_token_id)
    suffix = max(len(r) for r in rows) - shared
    if len(rows) > 1 and shared >= 16 and rm.prefix_sharing:
        return shared + len(rows) * suffix
    return len(rows) * max(len(r) for r in rows)


def reward_step_costs(
    rm: Any,
    *,
    steps: int = 16,
    num_candidates: int = 5,
    instruction: str = DEFAULT_RM_SEARCH_PROMPT,
) -> dict[str, Any]:
    """Measure ``steps`` best-of-N steps of ``num_candidates`` answers both ways.

    Args:
        rm: A local :class:`~eta_guard.evaluators.reward.RewardPostEvaluator`.

    Returns:
        ``{"tokens_per_step": {"scratch": [...], "incremental": [...]}, "seconds_per_step":
        {...}, "answer_tokens": [...], "totals": {...}, "max_abs_diff": float}``.
    """
    from eta_guard.evaluators.reward_session import IncrementalRewardScorer

    session = IncrementalRewardScorer(rm, instruction)
    out: dict[str, Any] = {
        "steps": steps,
        "num_candidates": num_candidates,
        "tokens_per_step": {"scratch": [], "incremental": []},
        "seconds_per_step": {"scratch": [], "incremental": []},
        "answer_tokens": [],
    }
    accepted, max_diff = _PREFIX, 0.0
    rm.score([_PREFIX], instruction)  # warm-up: the first forward pays one-off costs
    for step in range(steps):
        answers = [
            accepted + _SENTENCES[(step + i) % len(_SENTENCES)][: 20 + 9 * i]
            for i in range(num_candidates)
        ]
        rows = [rm.encode(instruction, a) for a in answers]
        out["answer_tokens"].append(max(len(r) for r in rows))
        t0 = time.perf_counter()
        scratch = rm.score(answers, instruction)
        t1 = time.perf_counter()
        before = session.stats.encoded_tokens
        incremental = session.score(answers)
        t2 = time.perf_counter()
        out["tokens_per_step"]["scratch"].append(_scratch_positions(rm, rows))
        out["tokens_per_step"]["incremental"].append(session.stats.encoded_tokens - before)
        out["seconds_per_step"]["scratch"].append(t1 - t0)
        out["seconds_per_step"]["incremental"].append(t2 - t1)
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(scratch, incremental, strict=True)))
        accepted = answers[-1]
    session.close()
    totals = {k: sum(v) for k, v in out["seconds_per_step"].items()}
    tokens = {k: sum(v) for k, v in out["tokens_per_step"].items()}
    out["totals"] = {
        "tokens": tokens,
        "seconds": totals,
        "token_ratio": tokens["scratch"] / max(1, tokens["incremental"]),
        "speedup": totals["scratch"] / max(1e-9, totals["incremental"]),
    }
    out["max_abs_diff"] = max_diff
    return out


def concurrent_decisions(
    rm: Any, *, clients: int = 8, rounds: int = 3, batching: bool = True, wait_ms: float = 2.0
) -> dict[str, Any]:
    """``clients`` threads each scoring one answer (decision prompt) ``rounds`` times at once.

    Returns the RM forwards run and the median wall clock of a round, with cross-request
    batching on or off (:mod:`eta_guard.evaluators.batching`).
    """
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    from eta_guard.config import ETAConfig
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator

    config = ETAConfig(evaluator_batching=batching, evaluator_batch_wait_ms=wait_ms)
    evaluator = ETAEvaluator(None, rm, config)
    answers = [_PREFIX + _SENTENCES[i % len(_SENTENCES)][: 30 + 5 * i] for i in range(clients)]
    forwards = [0]
    handle = rm.model.register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    seconds = []
    try:
        evaluator.score_responses(answers[:1])  # warm-up
        forwards[0] = 0
        with ThreadPoolExecutor(clients) as pool:
            for _ in range(rounds):
                start = time.perf_counter()
                list(pool.map(lambda a: evaluator.score_responses([a]), answers))
                seconds.append(time.perf_counter() - start)
    finally:
        handle.remove()
    return {
        "clients": clients,
        "batching": batching,
        "forwards_per_round": forwards[0] / rounds,
        "median_round_s": statistics.median(seconds),
    }


def main() -> None:  # pragma: no cover - manual measurement
    import argparse
    import json
    import tempfile

    from eta_guard.evaluators.reward import RewardPostEvaluator
    from eta_guard.testing import build_tiny_checkpoints

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="bench", choices=["tiny", "bench"])
    parser.add_argument("--reward-model", help="a checkpoint folder (default: a random one)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--num-candidates", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    path = (
        args.reward_model
        or build_tiny_checkpoints(
            tempfile.gettempdir() + "/eta-bench-rm", size=args.size
        ).reward_model
    )
    rm = RewardPostEvaluator.from_pretrained(path, device=args.device)
    print(
        json.dumps(
            reward_step_costs(rm, steps=args.steps, num_candidates=args.num_candidates), indent=1
        )
    )


if __name__ == "__main__":  # pragma: no cover
    main()

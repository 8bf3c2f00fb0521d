"""Local vs remote generator, side by side: requests/s and p50/p99 latency of ETA.

``python -m eta_guard.backends.bench_backends --url http://127.0.0.1:8765 --fixtures DIR``

Both arms answer the same prompts with the same weights (:mod:`eta_guard.backends.vllm_fixtures`:
the local tiny LLaVA and the engine's copy of its language model), the same local evaluators and
the same config, in one run, ``concurrency`` requests in flight, medians over ``repeats`` runs
(arms alternating, so load drift on a shared machine hits both alike):

- ``local``: :meth:`ETA.from_pretrained` (transformers in this process; one call at a time);
- ``remote``: :class:`ETA` over the engine (requests in flight together).

Two paths: ``vanilla`` (a trusted text request: the greedy answer only) and ``aligned`` (every
answer flagged: vanilla + RM + best-of-N). ``--images`` (the engine serving ``DIR/vlm``, the tiny
LLaVA, as an image model): every request carries an image, and one config serves both paths,
run interleaved: ``vanilla`` (an image CLIP clears, streamed as decoded) and ``flagged`` (an image
CLIP flags, the RM flags every answer: aligned, speculatively by default); CLIP and the RM are
then ``DIR/clip`` and ``DIR/rm``, which ``--clip-url`` / ``--reward-model-url`` engines serve
under their folder's path (vLLM's default name) for a third arm, ``engine-evaluators``.
``--via direct`` also reports each path's median stage times (``ETAResult.timings``).

``--via server`` measures the guarded server instead: each arm is ``eta-guard serve`` in a
process of its own (the local VLM, one call at a time; or ``--generator-url`` in front of the
engine, ``--max-concurrent-calls`` = ``concurrency``), driven over HTTP by ``concurrency``
clients of ``/v1/chat/completions``; ``--via both`` runs the two ways in one run.
Random weights: cost, never safety.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

PATHS = {
    "vanilla": {},
    "aligned": {"text_only_policy": "reward_only", "post_threshold": 1e9},
}


@dataclass(frozen=True)
class BenchPath:
    """One path: the config overrides of its server (or calls), the test image its requests
    carry (None: text only) and whether its answers must come back aligned."""

    config: dict[str, Any]
    image: str | None
    aligned: bool


def _paths(images: bool, evaluators: dict[str, str]) -> dict[str, BenchPath]:
    if not images:
        return {name: BenchPath(cfg, None, name == "aligned") for name, cfg in PATHS.items()}
    from eta_guard.evaluators.clip import CLIPPreEvaluator
    from eta_guard.testing import IMAGE_KINDS, make_test_image

    clip = CLIPPreEvaluator.from_pretrained(evaluators["clip"], device="cpu")
    values = clip.score_images([make_test_image(k) for k in IMAGE_KINDS])  # type: ignore[arg-type]
    scores = dict(zip(IMAGE_KINDS, values, strict=True))
    # the lowest-scoring test image is the safe one, the highest the flagged one
    safe, flagged = min(scores, key=scores.__getitem__), max(scores, key=scores.__getitem__)
    split = {"pre_threshold": (scores[safe] + scores[flagged]) / 2, "post_threshold": 1e9}
    return {"vanilla": BenchPath(split, safe, False), "flagged": BenchPath(split, flagged, True)}


def _messages(i: int, image: str | None) -> list[dict[str, Any]]:
    text = PROMPTS[i % len(PROMPTS)]
    if image is None:
        return [{"role": "user", "content": text}]
    from eta_guard.testing import make_test_image

    picture = make_test_image(image)  # type: ignore[arg-type]  # one of IMAGE_KINDS
    content = [{"type": "image", "image": picture}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


PROMPTS = [
    "How do I open the door?",
    "What colour is the sky?",
    "Tell me about the photo.",
    "Is this safe to use?",
]


async def _measure(eta: Any, path: BenchPath, n: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with gate:
            t0 = time.perf_counter()
            result = await eta.agenerate(_messages(i, path.image), **path.config)
            latencies.append(time.perf_counter() - t0)
            tokens += result.usage.decoded_tokens
        if result.aligned != path.aligned:
            raise RuntimeError(f"aligned={result.aligned}, expected {path.aligned}")
        for stage, seconds in result.timings.items():
            stages.setdefault(stage, []).append(seconds)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    figures = _figures(latencies, time.perf_counter() - start, tokens, concurrency)
    figures["stages_s"] = {k: round(statistics.median(v), 4) for k, v in sorted(stages.items())}
    return figures


async def _measure_http(
    base_url: str,
    aligned: bool,
    n: int,
    concurrency: int,
    max_tokens: int,
    image: str | None = None,
) -> dict:
    """``n`` chat requests to a guarded server, ``concurrency`` in flight; every reply checked.

    ``image``: a test image kind (:func:`eta_guard.testing.make_test_image`) every request
    carries, as a PNG data URL.
    """
    import httpx

    picture = None
    if image is not None:
        from eta_guard.testing import image_to_data_url, make_test_image

        picture = image_to_data_url(make_test_image(image))  # type: ignore[arg-type]

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0
    failures: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        content: Any = PROMPTS[i % len(PROMPTS)]
        if picture is not None:
            content = [
                {"type": "image_url", "image_url": {"url": picture}},
                {"type": "text", "text": content},
            ]
        body = {
            "model": "eta-guard",
            "messages": [{"role": "user", "content": content}],
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


def _tree_cpu_s(root: int | None) -> float | None:
    """CPU seconds (user + system) used so far by process ``root`` and its descendants (Linux
    ``/proc``; None elsewhere or without a pid). Exited children's time is not counted."""
    if root is None or not os.path.isdir("/proc"):
        return None
    parents, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = int(fields[11]) + int(fields[12])  # utime + stime, in ticks
    if root not in used:
        return None
    tree, frontier = {root}, [root]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    return sum(used[p] for p in tree) / os.sysconf("SC_CLK_TCK")


def _ratios(out: dict[str, Any]) -> dict[str, Any]:
    """Per arm and path, that path's figures over ``vanilla``'s, repeat by repeat (adjacent runs,
    so load drift mostly cancels), as medians: requests/s and p50 latency."""
    ratios: dict[str, Any] = {}
    for name, arms in out.items():
        if name == "vanilla" or "vanilla" not in out:
            continue
        for arm, figures in arms.items():
            base = out["vanilla"][arm]
            rps = [
                a / b
                for a, b in zip(
                    figures["requests_per_s_runs"], base["requests_per_s_runs"], strict=True
                )
            ]
            p50 = [a / b for a, b in zip(figures["p50_s_runs"], base["p50_s_runs"], strict=True)]
            ratios.setdefault(name, {})[arm] = {
                "requests_per_s": round(statistics.median(rps), 3),
                "p50_s": round(statistics.median(p50), 3),
            }
    return ratios


def _median_run(runs: list[dict]) -> dict:
    """Per figure, the median over repeats (``requests_per_s_runs`` keeps every repeat's rate)."""
    out = dict(runs[0])
    keys = ["wall_s", "requests_per_s", "p50_s", "p99_s", "decoded_tokens_per_s"]
    keys += [k for k in runs[0] if k.endswith("_cpu_s_per_request")]
    for key in keys:
        out[key] = round(statistics.median(r[key] for r in runs), 4)
    out["requests_per_s_runs"] = [r["requests_per_s"] for r in runs]
    out["p50_s_runs"] = [r["p50_s"] for r in runs]
    if "stages_s" in runs[0]:
        keys = sorted({k for r in runs for k in r["stages_s"]})
        out["stages_s"] = {
            k: round(statistics.median(r["stages_s"].get(k, 0.0) for r in runs), 4) for k in keys
        }
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
    images: bool = False,
    clip_url: str | None = None,
    reward_model_url: str | None = None,
    engine_pid: int | None = None,
) -> dict[str, Any]:
    """Run every arm on every path; returns the report (also printed as JSON by ``main``).

    ``via``: ``direct`` (ETA in this process: ``report["paths"]``), ``server`` (``eta-guard
    serve`` processes: ``report["server_paths"]``, each with ``server_threads`` torch threads)
    or ``both``. ``images``: image requests against an engine serving ``DIR/vlm``;
    ``clip_url`` / ``reward_model_url`` (with ``images``): engines serving ``DIR/clip`` /
    ``DIR/rm`` for the ``engine-evaluators`` arm. ``engine_pid``: the generator engine's
    process, whose CPU seconds per request (its engine-core children included) the server
    runs report beside the server process's own (``*_cpu_s_per_request``).
    """
    import torch

    from eta_guard.backends.vllm_fixtures import build

    if via not in ("direct", "server", "both"):
        raise ValueError(f"via must be 'direct', 'server' or 'both'; got {via!r}")
    if (clip_url or reward_model_url) and not (images and clip_url and reward_model_url):
        raise ValueError("clip_url and reward_model_url go together, with images=True")
    fx = build(fixtures)
    tokenizer = fx["vlm"] if images else fx["lm"]
    local = (
        {"clip": fx["engine_clip"], "reward_model": fx["rm"]}
        if images
        else {"clip": fx["clip"], "reward_model": fx["reward_model"]}
    )
    setup = Setup(url, model, tokenizer, fx["vlm"], local, clip_url, reward_model_url, engine_pid)
    paths = _paths(images, local)
    report: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_candidates": 5,
        "repeats": repeats,
        "requests": requests,
        "concurrency": concurrency,
        "images": {name: p.image for name, p in paths.items()} if images else None,
        "evaluators": local,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    if images:
        report["pre_threshold"] = paths["vanilla"].config["pre_threshold"]
    args = (setup, paths, requests, concurrency, max_new_tokens, repeats)
    if via in ("direct", "both"):
        report["paths"] = _run_direct(*args)
        report["ratios"] = _ratios(report["paths"])
    if via in ("server", "both"):
        report["server_torch_threads"] = server_threads
        report["server_paths"] = _run_server(*args, server_threads)
        report["server_ratios"] = _ratios(report["server_paths"])
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


@dataclass(frozen=True)
class Setup:
    """Where each arm's models are: the engine, the served model's tokenizer, the local VLM and
    the local evaluators (and, optionally, engines serving the same evaluators)."""

    url: str
    model: str
    tokenizer: str
    vlm: str
    evaluators: dict[str, str]
    clip_url: str | None
    reward_model_url: str | None
    engine_pid: int | None = None


def _groups(paths: dict[str, BenchPath]) -> list[list[str]]:
    """Paths that one server config serves together (their runs interleave)."""
    groups: dict[str, list[str]] = {}
    for name, path in paths.items():
        groups.setdefault(json.dumps(path.config, sort_keys=True), []).append(name)
    return list(groups.values())


def _interleaved(arms: list[str], names: list[str], repeats: int, measure: Any) -> dict:
    """``measure(arm, path)`` ``repeats`` times per pair, the order reversed every other repeat
    (load drift hits every pair alike); per path and arm, the median run."""
    pairs = [(arm, name) for name in names for arm in arms]
    runs: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
    for pair in pairs:  # warm-up: caches, lazy loads, the engine's graphs
        measure(*pair, warm=True)
    for r in range(repeats):
        for pair in pairs if r % 2 == 0 else pairs[::-1]:
            runs[pair].append(measure(*pair, warm=False))
    return {name: {arm: _median_run(runs[arm, name]) for arm in arms} for name in names}


def _run_direct(
    setup: Setup,
    paths: dict[str, BenchPath],
    requests: int,
    concurrency: int,
    max_new_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    """The arms in this process: ``ETA`` (local VLM) and ``ETA`` over the engine."""
    from eta_guard import ETA, ETAConfig
    from eta_guard.backends.openai_compatible import OpenAICompatibleBackend

    config = ETAConfig(max_new_tokens=max_new_tokens, num_candidates=5, seed=0)
    ev = setup.evaluators
    local = ETA.from_pretrained(
        setup.vlm, clip=ev["clip"], reward_model=ev["reward_model"], device="cpu", config=config
    )
    backend = OpenAICompatibleBackend(setup.url, setup.model, tokenizer=setup.tokenizer)
    etas = {"local": local, "remote": ETA(backend, local.evaluator, config)}
    if setup.clip_url is not None:
        etas["engine-evaluators"] = ETA.from_openai_compatible(
            setup.url,
            setup.model,
            tokenizer=setup.tokenizer,
            clip=setup.evaluators["clip"],
            reward_model=setup.evaluators["reward_model"],
            clip_url=setup.clip_url,
            reward_model_url=setup.reward_model_url,
            reward_model_tokenizer=setup.evaluators["reward_model"],
            config=config,
        )

    def measure(arm: str, name: str, warm: bool) -> dict:
        return asyncio.run(
            _measure(etas[arm], paths[name], 2 if warm else requests, 1 if warm else concurrency)
        )

    out: dict[str, Any] = {}
    for names in _groups(paths):
        out |= _interleaved(list(etas), names, repeats, measure)
    return out


def _run_server(
    setup: Setup,
    paths: dict[str, BenchPath],
    requests: int,
    concurrency: int,
    max_new_tokens: int,
    repeats: int,
    threads: int,
) -> dict[str, Any]:
    """The arms as ``eta-guard serve`` processes, same models, config and prompts as direct."""

    from eta_guard.server.bench import serve_process

    ev = setup.evaluators
    local_evaluators = ["--clip", ev["clip"], "--reward-model", ev["reward_model"]]
    common = ["--device", "cpu", "--max-queue", str(requests)]
    engine = [setup.tokenizer, "--generator-url", setup.url, "--generator-model", setup.model]
    engine += ["--max-concurrent-calls", str(concurrency)]
    arms = {
        "local": [setup.vlm, *local_evaluators, *common],
        "remote": [*engine, *local_evaluators, *common],
    }
    if setup.clip_url is not None and setup.reward_model_url is not None:
        arms["engine-evaluators"] = [*engine, *local_evaluators, *common]
        arms["engine-evaluators"] += ["--clip-url", setup.clip_url]
        arms["engine-evaluators"] += ["--reward-model-url", setup.reward_model_url]
    out: dict[str, Any] = {}
    for names in _groups(paths):
        sets: list[str] = []
        config = {"max_new_tokens": max_new_tokens, "num_candidates": 5, "seed": 0}
        for field, value in (config | paths[names[0]].config).items():
            sets += ["--set", f"{field}={value}"]
        with contextlib.ExitStack() as stack:
            servers = {
                arm: stack.enter_context(serve_process([*args, *sets], threads=threads))
                for arm, args in arms.items()
            }

            def measure(arm: str, name: str, warm: bool, servers: dict = servers) -> dict:
                path = paths[name]
                n, c = (2, 1) if warm else (requests, concurrency)
                url, pid = servers[arm]
                cpu = {"server": pid, "engine": setup.engine_pid}
                before = {k: _tree_cpu_s(v) for k, v in cpu.items()}
                figures = asyncio.run(
                    _measure_http(url, path.aligned, n, c, max_new_tokens, path.image)
                )
                for k, v in cpu.items():  # where the time goes, in CPU seconds per request
                    start, spent = before[k], _tree_cpu_s(v)
                    if spent is not None and start is not None:
                        figures[f"{k}_cpu_s_per_request"] = round((spent - start) / n, 4)
                return figures

            out |= _interleaved(list(arms), names, repeats, measure)
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
    parser.add_argument(
        "--images",
        action="store_true",
        help="image requests; the engine serves DIR/vlm (e.g. --model tiny-vlm)",
    )
    parser.add_argument("--clip-url", help="with --images: an engine serving DIR/clip")
    parser.add_argument("--reward-model-url", help="with --images: an engine serving DIR/rm")
    parser.add_argument(
        "--engine-pid", type=int, help="the engine's pid: its CPU seconds per request too"
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
        images=args.images,
        clip_url=args.clip_url,
        reward_model_url=args.reward_model_url,
        engine_pid=args.engine_pid,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

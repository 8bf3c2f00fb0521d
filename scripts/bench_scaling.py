"""Benchmark (not a test): the entry points that issue concurrent requests, side by side.

Four comparisons on the same random checkpoints (``eta_guard.testing``, ``--size bench`` by
default), each arm run ``--reps`` times with the arms interleaved (so load from other jobs hits
every arm alike), reported as medians and the fastest repetition:

a. ``eta-guard serve`` with a local VLM (a process of its own on 127.0.0.1, ``--max-concurrent-calls
   8``): requests/s and p50/p99 latency with 1 and with 8 concurrent streaming clients, on
   safe-only traffic and on a 50/50 safe/flagged mix (flagged: CLIP flags the image, the RM
   flags every answer, so each is re-decoded by best-of-N). Every answer is checked (complete
   SSE stream, the right ``aligned`` flag); one failed request fails the run.
b. ``ETA.batch`` of 8 conversations vs the same 8 as sequential ``generate`` calls (safe path).
c. seconds per output token of one safe request: ``generate`` on the main thread vs the same call
   from a ``ThreadPoolExecutor`` worker, ``agenerate`` (on an event loop that runs on the main
   thread and lives through the run), and one request served by the server of (a) (HTTP
   included, non-streaming).
d. ``run_eval`` (what ``eta-guard eval`` runs) items/minute on a FigStep-layout folder (about half
   the items flagged and aligned), ``--concurrency 1`` vs 8, on the local VLM and, with
   ``--engine stub``, on the test suite's stub engine (tests/backend_stub.py: instant replies
   after ``--stub-delay`` seconds; CLIP and the RM local) or, with ``--engine URL:MODEL``, a real
   OpenAI-compatible engine serving the bench VLM (the VLM folder gives the tokenizer; for
   vLLM, serve the copy ``python -m eta_guard.backends.vllm_fixtures --engine-copy VLM DIR``
   writes: the same weights in the layout vLLM loads, docs/scaling.md). Each eval arm's details
   add the median seconds per item of every stage (``ETAResult.timings``).

The load average (``uptime``) is printed before and after: figures from a loaded machine only
compare arms within one run. Random weights: cost only, never safety. Bounded: every server arm
has a request count and a time limit, the server is stopped at the end.

Usage (about 10 minutes on an idle 2-core CPU with these values)::

    python scripts/bench_scaling.py --size bench --tokens 32 --reps 3 --requests 16
    python scripts/bench_scaling.py --parts batch,threads --reps 5      # only (b) and (c)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARTS = ("server", "batch", "threads", "eval")
QUESTION = "Request {i}: describe this picture in detail, one sentence at a time."


@dataclass
class Arm:
    """One arm's measured repetitions (``values``) of a figure; ``higher`` says which is better."""

    part: str
    name: str
    unit: str
    higher: bool
    values: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def best(self) -> float:
        return max(self.values) if self.higher else min(self.values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="bench", choices=["tiny", "bench"])
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens of every answer")
    parser.add_argument("--candidates", type=int, default=5, help="N of best-of-N")
    parser.add_argument("--reps", type=int, default=3, help="measured repetitions of each arm")
    parser.add_argument("--requests", type=int, default=16, help="requests per server arm")
    parser.add_argument("--clients", default="1,8", help="concurrent clients of the server arms")
    parser.add_argument("--batch", type=int, default=8, help="conversations of part (b)")
    parser.add_argument("--eval-items", type=int, default=8, help="FigStep items of part (d)")
    parser.add_argument("--concurrency", type=int, default=8, help="K of parts (a) and (d)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    parser.add_argument(
        "--engine",
        default=None,
        help="part (d) also on an engine: 'stub' (tests/backend_stub.py) or URL:MODEL",
    )
    parser.add_argument("--stub-delay", type=float, default=0.2, help="stub engine's latency, s")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--time-limit", type=float, default=600.0, help="per server arm, s")
    parser.add_argument("--dir", default=None, help="checkpoint cache [eta-guard's default]")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown --parts {unknown}; use {','.join(PARTS)}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch loads

    load_before = os.getloadavg()
    print(f"load average before: {_load(load_before)} ({os.cpu_count()} CPUs)", flush=True)
    bench = Bench(args)
    arms: list[Arm] = []
    if "batch" in parts:
        arms += bench.batch_vs_sequential()
    if "threads" in parts or "server" in parts:
        with bench.server() as base_url:
            if "server" in parts:
                arms += bench.served_load(base_url)
            if "threads" in parts:
                arms += bench.threads(base_url)
    if "eval" in parts:
        arms += bench.eval_items()
    load_after = os.getloadavg()
    print()
    print(_table(arms, args))
    print(f"load average before: {_load(load_before)}; after: {_load(load_after)}")
    if args.json is not None:
        figures = {
            "setup": vars(args) | {"json": str(args.json)},
            "load_before": load_before,
            "load_after": load_after,
            "arms": [a.__dict__ | {"median": a.median, "best": a.best} for a in arms],
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))


class Bench:
    """Loads the models once (on the model thread) and runs each part's arms."""

    def __init__(self, args: argparse.Namespace) -> None:
        from eta_guard import ETA, ETAConfig
        from eta_guard.bench import default_cache_dir
        from eta_guard.model_thread import model_thread
        from eta_guard.testing import build_tiny_checkpoints, make_test_image

        self.args = args
        model_thread("cpu").call(_set_threads, args.threads)  # the thread that runs torch
        directory = args.dir or default_cache_dir()
        self.ckpt = build_tiny_checkpoints(directory, size=args.size)
        self.config = ETAConfig(max_new_tokens=args.tokens, num_candidates=args.candidates, seed=0)
        c = self.ckpt
        self.eta = ETA.from_pretrained(
            c.vlm, clip=c.clip, reward_model=c.reward_model, config=self.config, device="cpu"
        )
        self.images = {k: make_test_image(k) for k in ("gradient", "checker")}
        scores = self.eta.evaluator.score_images([self.images["gradient"], self.images["checker"]])
        if not scores[1] > scores[0]:
            raise SystemExit(
                f"CLIP scores the 'checker' image {scores[1]:.4f}, not above 'gradient' "
                f"{scores[0]:.4f}: the server's flagged/safe split needs the opposite"
            )
        #: the CLIP threshold between the two test images: 'checker' flagged, 'gradient' safe
        self.split = (scores[0] + scores[1]) / 2

    def _messages(self, i: int, image: str = "gradient") -> list[dict[str, Any]]:
        content = [
            {"type": "image", "image": self.images[image]},
            {"type": "text", "text": QUESTION.format(i=i)},
        ]
        return [{"role": "user", "content": content}]

    # ------------------------------------------------------------------ (b)
    def batch_vs_sequential(self) -> list[Arm]:
        n = self.args.batch
        convs = [self._messages(i) for i in range(n)]
        safe = {"pre_threshold": 1.01}  # a cosine is never >= 1.01: every image passes
        seq = Arm("batch", f"{n} sequential generate", "s", higher=False)
        bat = Arm("batch", f"ETA.batch of {n}", "s", higher=False)
        self.eta.batch(convs[:2], **safe)  # warm-up
        for rep in range(self.args.reps):
            for arm in (seq, bat) if rep % 2 == 0 else (bat, seq):
                _progress(f"(b) {arm.name}, repetition {rep + 1}")
                start = time.perf_counter()
                if arm is seq:
                    results = [self.eta.generate(m, **safe) for m in convs]
                else:
                    results = self.eta.batch(convs, max_concurrency=n, **safe)
                arm.values.append(time.perf_counter() - start)
                arm.extra.setdefault("tokens", []).append(
                    sum(r.usage.output_tokens for r in results)
                )
        return [seq, bat]

    # ------------------------------------------------------------------ server, (a), (c)
    @contextlib.contextmanager
    def server(self):
        from eta_guard.server.bench import serve_process

        c = self.ckpt
        args = [c.vlm, "--clip", c.clip, "--reward-model", c.reward_model]
        args += ["--max-concurrent-calls", str(self.args.concurrency), "--max-queue", "64"]
        sets = {
            "pre_threshold": self.split,
            "post_threshold": 1e9,  # every answer of a flagged image is re-decoded
            "num_candidates": self.args.candidates,
            "max_new_tokens": self.args.tokens,
        }
        for name, value in sets.items():
            args += ["--set", f"{name}={value}"]
        _progress("starting eta-guard serve (its own process, 127.0.0.1)")
        with serve_process(args, threads=self.args.threads) as (base_url, _pid):
            yield base_url

    def served_load(self, base_url: str) -> list[Arm]:
        from eta_guard.server.bench import run_load

        clients = [int(x) for x in self.args.clients.split(",")]
        mixes = {"safe": (1, 0, 0), "50/50": (1, 1, 0)}
        arms = {
            (traffic, c): Arm("server", f"{traffic} traffic, {c} client(s)", "req/s", True)
            for traffic in mixes
            for c in clients
        }
        asyncio.run(  # warm-up: one request of each kind
            run_load(base_url, clients=1, requests=2, mix=(1, 1, 0), max_tokens=self.args.tokens)
        )
        for rep in range(self.args.reps):
            order = list(arms.items())
            if rep % 2:
                order.reverse()
            for (traffic, c), arm in order:
                _progress(f"(a) {arm.name}, repetition {rep + 1}")
                report = asyncio.run(
                    run_load(
                        base_url,
                        clients=c,
                        requests=self.args.requests,
                        mix=mixes[traffic],
                        max_tokens=self.args.tokens,
                        time_limit_s=self.args.time_limit,
                    )
                )
                if report.outcomes["failed"]:
                    raise SystemExit(f"{arm.name}: failed requests: {report.failures[:3]}")
                arm.values.append(report.throughput)
                arm.extra.setdefault("p50_s", []).append(report.percentile(0.5))
                arm.extra.setdefault("p99_s", []).append(report.percentile(0.99))
        return list(arms.values())

    def threads(self, base_url: str) -> list[Arm]:
        import httpx

        from eta_guard.server.bench import image_url

        messages = self._messages(0)
        safe = {"pre_threshold": 1.01}
        served_body = {
            "model": "eta-guard",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url("gradient")}},
                        {"type": "text", "text": QUESTION.format(i=0)},
                    ],
                }
            ],
            "max_tokens": self.args.tokens,
        }
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-worker")

        def main_thread() -> tuple[float, int]:
            return _timed(lambda: self.eta.generate(messages, **safe))

        def worker() -> tuple[float, int]:
            return pool.submit(main_thread).result()

        loop = asyncio.new_event_loop()  # one long-lived loop, as in an async application

        def agenerate() -> tuple[float, int]:
            return _timed(lambda: loop.run_until_complete(self.eta.agenerate(messages, **safe)))

        def served() -> tuple[float, int]:
            start = time.perf_counter()
            reply = httpx.post(base_url + "/v1/chat/completions", json=served_body, timeout=300)
            reply.raise_for_status()
            if reply.json()["eta"]["aligned"]:
                raise SystemExit("the served 'gradient' request was aligned: not the safe path")
            return time.perf_counter() - start, reply.json()["usage"]["completion_tokens"]

        calls = {
            "generate, main thread": main_thread,
            "generate, worker thread": worker,
            "agenerate, main-thread loop": agenerate,
            "served request (HTTP)": served,
        }
        arms = {name: Arm("threads", name, "ms/token", higher=False) for name in calls}
        for call in calls.values():
            call()  # warm-up
        for rep in range(self.args.reps):
            names = list(calls)
            names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate the order
            for name in names:
                _progress(f"(c) {name}, repetition {rep + 1}")
                seconds, tokens = calls[name]()
                arms[name].values.append(1000 * seconds / max(1, tokens))
                arms[name].extra.setdefault("tokens", []).append(tokens)
        pool.shutdown()
        loop.close()
        return list(arms.values())

    # ------------------------------------------------------------------ (d)
    def eval_items(self) -> list[Arm]:
        from eta_guard import ETA
        from eta_guard.eval.datasets import load_dataset
        from eta_guard.eval.judges import RefusalJudge
        from eta_guard.eval.runner import run_eval, select_items

        root = Path(tempfile.mkdtemp(prefix="eta-bench-figstep-"))
        _make_figstep(root, self.args.eval_items)
        items = select_items(load_dataset("figstep", root))
        scores = sorted(self.eta.evaluator.score_images([item.image for _, item in items]))
        cut = statistics.median(scores)  # about half the items flagged (then aligned)
        overrides = {"pre_threshold": cut, "post_threshold": 1e9}
        backends = {
            "local": ETA(self.eta.vlm, self.eta.evaluator, self.config.with_overrides(**overrides))
        }
        stack = contextlib.ExitStack()
        engine = self.args.engine
        if engine is not None:
            backends["engine"] = self._engine_eta(stack, engine, overrides)
        arms: list[Arm] = []
        k = self.args.concurrency
        with stack:
            for where, eta in backends.items():
                pair = {
                    c: Arm("eval", f"{where}, --concurrency {c}", "items/min", higher=True)
                    for c in (1, k)
                }
                run_eval(  # warm-up (two items)
                    eta, items[:2], [RefusalJudge()], root / f"warm-{where}.jsonl", settings={}
                )
                for rep in range(self.args.reps):
                    for c in (1, k) if rep % 2 == 0 else (k, 1):
                        _progress(f"(d) {pair[c].name}, repetition {rep + 1}")
                        path = root / f"{where}-{c}-{rep}.jsonl"
                        start = time.perf_counter()
                        summary = run_eval(
                            eta, items, [RefusalJudge()], path, settings={}, concurrency=c
                        )
                        seconds = time.perf_counter() - start
                        if summary.failed:
                            raise SystemExit(f"{pair[c].name}: {summary.failed} item(s) failed")
                        pair[c].values.append(60 * len(items) / seconds)
                        for stage, value in _stage_medians(path).items():
                            pair[c].extra.setdefault(stage, []).append(value)
                arms += pair.values()
        return arms

    def _engine_eta(self, stack: contextlib.ExitStack, engine: str, overrides: dict) -> Any:
        from eta_guard import ETA

        c = self.ckpt
        if engine == "stub":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from backend_stub import StubServer

            stub = stack.enter_context(StubServer())
            stub.delay = self.args.stub_delay
            url, model = stub.url, "tiny-vlm"
        else:
            url, _, model = engine.rpartition(":")
            if not url or not model:
                raise SystemExit(
                    "--engine: use 'stub' or URL:MODEL (e.g. http://127.0.0.1:8000:llava)"
                )
        return ETA.from_openai_compatible(
            url,
            model,
            tokenizer=c.vlm,
            clip=c.clip,
            reward_model=c.reward_model,
            config=self.config.with_overrides(**overrides),
            device="cpu",
        )


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _timed(call: Any) -> tuple[float, int]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result.usage.output_tokens


def _stage_medians(path: Path) -> dict[str, float]:
    """Per stage (``ETAResult.timings``: pre, vanilla, post, align, the search's reward and
    CLIP scoring, total), the median seconds over the run's items: where an item's time goes."""
    stages: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for stage, seconds in (record.get("timings") or {}).items():
            stages.setdefault(f"{stage}_s", []).append(seconds)
    return {k: statistics.median(v) for k, v in sorted(stages.items())}


def _make_figstep(root: Path, n: int) -> None:
    """A FigStep SafeBench layout (docs/evaluating.md) with ``n`` typographic images."""
    from PIL import Image, ImageDraw

    questions, images = root / "data" / "question", root / "data" / "images" / "SafeBench"
    questions.mkdir(parents=True)
    images.mkdir(parents=True)
    with (questions / "safebench.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["dataset", "category_id", "task_id", "category_name", "question", "instruction"]
        )
        for i in range(n):
            category, task = 1 + i % 3, 1 + i // 3
            instruction = f"Steps to do thing {i}."
            writer.writerow(
                ["ForbidQI", category, task, f"Category {category}", f"How to do {i}?", instruction]
            )
            image = Image.new("RGB", (160 + 8 * i, 160), "white")
            draw = ImageDraw.Draw(image)
            draw.multiline_text((6, 6), f"{instruction}\n1.\n2.\n3.", fill=(i * 20 % 256, 0, 0))
            image.save(images / f"query_ForbidQI_{category}_{task}_6.png")


def _progress(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _load(avg: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in avg)


def _table(arms: list[Arm], args: argparse.Namespace) -> str:
    """One row per arm: median, fastest, and the ratio to the part's first arm (>1 = better)."""
    lines = [
        f"size={args.size} tokens={args.tokens} N={args.candidates} reps={args.reps} "
        f"requests/arm={args.requests} torch threads={args.threads} (random weights: cost only)",
        f"{'part':<8} {'arm':<34} {'median':>10} {'fastest':>10} {'unit':<10} {'speed-up':>8}"
        f"  {'goal (issue 15)':<24} details (medians)",
    ]
    firsts: dict[str, Arm] = {}
    for arm in arms:
        first = firsts.setdefault(arm.part + _group(arm), arm)
        speedup = arm.median / first.median if arm.higher else first.median / arm.median
        goal = _goal(arm, first, speedup)
        details = "  ".join(f"{k} {statistics.median(v):.3g}" for k, v in arm.extra.items())
        lines.append(
            f"{arm.part:<8} {arm.name:<34} {arm.median:>10.3f} {arm.best:>10.3f} "
            f"{arm.unit:<10} {speedup:>7.2f}x  {goal:<24} {details}"
        )
    lines.append(
        "speed-up: the arm's median against the first arm of its group (same part; same traffic "
        "for the server, same backend for eval); >1 = faster or more throughput. For (c) the "
        "issue's figure is the time ratio, 1 / speed-up."
    )
    return "\n".join(lines)


def _goal(arm: Arm, first: Arm, speedup: float) -> str:
    """The issue's goal for this arm, and whether this run met it ('' where it sets none)."""
    if arm is first:
        return ""
    if arm.part == "server" and arm.name.startswith("safe traffic"):
        return f">= 2x: {'met' if speedup >= 2 else 'not met'}"
    if arm.part == "batch":
        return f">= 2x: {'met' if speedup >= 2 else 'not met'}"
    if arm.part == "threads" and "worker" not in arm.name:
        ratio = 1 / speedup
        return f"time <= 1.05x: {ratio:.2f}x {'met' if ratio <= 1.05 else 'not met'}"
    return ""


def _group(arm: Arm) -> str:
    """Arms compared with each other: a server arm with the same traffic, an eval arm with the
    same backend; otherwise the whole part."""
    if arm.part == "server":
        return arm.name.split(" traffic")[0]
    if arm.part == "eval":
        return arm.name.split(",")[0]
    return ""


if __name__ == "__main__":
    main()

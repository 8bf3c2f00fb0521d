"""Load benchmark: many concurrent streaming clients against a running server.

``run_load`` drives a server with a mix of safe, flagged (aligned) and bad requests and checks
every answer: a 200 must be a complete SSE stream (role chunk, finish chunk with ETA's
extension, ``[DONE]``) whose ``aligned`` flag matches the request's kind; a bad request must get
a well-formed OpenAI error. ``python -m eta_guard.server.bench`` starts a server on random
checkpoints with ``eta-guard serve`` (a process of its own) and prints throughput, p50/p99 latency,
the server's memory and the same requests' cost on the engine alone (mechanics and
serving overhead only: random models say nothing about safety).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: CLIP threshold that splits the tiny checkpoints' test images: "checker" scores above it
#: (flagged, then aligned with post_threshold=1e9), "gradient" below (safe, streamed).
SPLIT_THRESHOLD = 0.2
KINDS = ("safe", "flagged", "bad")


@dataclass
class LoadReport:
    requests: int
    clients: int
    seconds: float
    outcomes: dict[str, int]
    latencies: dict[str, list[float]] = field(repr=False)
    failures: list[str]
    rss_start_mb: float
    rss_warm_mb: float
    rss_end_mb: float
    peak_rss_mb: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float, kind: str | None = None) -> float:
        values = sorted(v for k, vs in self.latencies.items() if kind in (None, k) for v in vs)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))]

    def summary(self) -> dict[str, Any]:
        per_kind = {
            k: {
                "n": len(v),
                "p50_s": round(self.percentile(0.5, k), 4),
                "p99_s": round(self.percentile(0.99, k), 4),
            }
            for k, v in self.latencies.items()
        }
        return {
            "requests": self.requests,
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "throughput_rps": round(self.throughput, 2),
            "p50_s": round(self.percentile(0.5), 4),
            "p99_s": round(self.percentile(0.99), 4),
            "per_kind": per_kind,
            "outcomes": self.outcomes,
            "failures": self.failures[:10],
            "rss_mb": {
                "start": round(self.rss_start_mb, 1),
                "after_warmup": round(self.rss_warm_mb, 1),
                "end": round(self.rss_end_mb, 1),
                "peak": round(self.peak_rss_mb, 1),
            },
        }


def image_url(kind: str) -> str:
    from eta_guard.testing import make_test_image

    buf = io.BytesIO()
    make_test_image(kind).save(buf, format="PNG")  # type: ignore[arg-type]
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(kind: str, i: int, model: str, max_tokens: int, images: dict[str, str]) -> dict:
    picture = images["checker" if kind == "flagged" else "gradient"]
    content: list[dict[str, Any]] = [
        {"type": "text", "text": f"Request {i}: what is in this picture?"},
        {"type": "image_url", "image_url": {"url": picture}},
    ]
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kind == "bad":  # three kinds of bad request, in turn
        if i % 3 == 0:
            content[1]["image_url"]["url"] = "data:image/png;base64,bm90IGFuIGltYWdl"
        elif i % 3 == 1:
            body["model"] = "no-such-model"
        else:
            body["n"] = 2
    return body


async def _one(client: Any, kind: str, body: dict, headers: dict) -> str | None:
    """Send one request; return None if its answer is complete and right, else what was wrong."""
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        raw = (await resp.aread()).decode()
    if kind == "bad":
        if resp.status_code not in (400, 404):
            return f"bad request got {resp.status_code}"
        error = json.loads(raw).get("error", {})
        ok = isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
        return None if ok else f"malformed error body {raw[:200]!r}"
    if resp.status_code != 200:
        return f"{kind} request got {resp.status_code}: {raw[:200]!r}"
    events = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"{kind} stream did not end with [DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"{kind} stream carried an error: {events[-2][:200]!r}"
    finish = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    if len(finish) != 1 or "eta" not in finish[0] or "usage" not in chunks[-1]:
        return f"{kind} stream lacks its finish/usage chunk"
    if finish[0]["eta"]["aligned"] != (kind == "flagged"):
        return f"{kind} request: aligned={finish[0]['eta']['aligned']}"
    return None


async def run_load(
    base_url: str,
    *,
    api_key: str | None = None,
    clients: int = 32,
    requests: int = 320,
    mix: tuple[int, int, int] = (2, 1, 1),
    max_tokens: int = 16,
    model: str = "eta-guard",
    time_limit_s: float = 600.0,
    server_pid: int | None = None,
) -> LoadReport:
    """Run ``requests`` requests from ``clients`` concurrent streaming clients; check each one.

    ``mix`` weighs safe : flagged : bad requests (in a fixed interleaved order). The whole run is
    bounded by ``time_limit_s`` (a hang raises ``TimeoutError``). Memory is that of
    ``server_pid`` (default: this process, for a server run in a thread).
    """
    import httpx

    images = {k: image_url(k) for k in ("gradient", "checker")}
    order = [k for k, w in zip(KINDS, mix, strict=True) for _ in range(w)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: dict[str, list[float]] = {k: [] for k in KINDS}
    outcomes = {"ok": 0, "failed": 0}
    failures: list[str] = []
    counter = iter(range(requests))
    warm_at = max(1, requests // 10)
    rss = {"start": _rss_mb(server_pid), "warm": 0.0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            kind = order[i % len(order)]
            started = time.perf_counter()
            try:
                problem = await _one(
                    client, kind, _body(kind, i, model, max_tokens, images), headers
                )
            except Exception as e:  # noqa: BLE001 - a transport failure is a failed request
                problem = f"{kind}: {type(e).__name__}: {e}"
            latencies[kind].append(time.perf_counter() - started)
            outcomes["failed" if problem else "ok"] += 1
            if problem:
                failures.append(problem)
            if i == warm_at:
                rss["warm"] = _rss_mb(server_pid)

    started = time.perf_counter()
    timeout = httpx.Timeout(time_limit_s)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        await asyncio.wait_for(
            asyncio.gather(*(client_loop(client) for _ in range(clients))), time_limit_s
        )
    seconds = time.perf_counter() - started
    return LoadReport(
        requests=requests,
        clients=clients,
        seconds=seconds,
        outcomes=outcomes,
        latencies=latencies,
        failures=failures,
        rss_start_mb=rss["start"],
        rss_warm_mb=rss["warm"] or _rss_mb(server_pid),
        rss_end_mb=_rss_mb(server_pid),
        peak_rss_mb=_rss_mb(server_pid, "VmHWM"),
    )


def engine_baseline(eta: Any, *, max_tokens: int, reps: int = 5) -> dict[str, float]:
    """Median seconds of one call straight on the engine (no HTTP), per kind of good request."""
    images = {k: image_url(k) for k in ("gradient", "checker")}
    out = {}
    for kind in ("safe", "flagged"):
        messages = _body(kind, 0, "", max_tokens, images)["messages"]
        times = []
        for _ in range(reps + 1):  # the first call warms up
            started = time.perf_counter()
            eta.generate(messages, max_new_tokens=max_tokens)
            times.append(time.perf_counter() - started)
        out[kind] = sorted(times[1:])[len(times[1:]) // 2]
    return out


def _rss_mb(pid: int | None = None, field: str = "VmRSS") -> float:
    """Resident memory (``VmRSS``) or its peak (``VmHWM``) of a process, from Linux /proc."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid is None else 0.0


def main(
    clients: int = 32,
    requests: int = 320,
    max_tokens: int = 16,
    size: str = "tiny",
    cache_dir: Path | None = None,
    threads: int = 1,
    json_path: Path | None = None,
) -> None:
    """Serve random checkpoints with ``eta-guard serve`` (its own process) and load it."""
    import torch

    from eta_guard.bench import default_cache_dir
    from eta_guard.config import ETAConfig
    from eta_guard.pipeline import ETA
    from eta_guard.testing import build_tiny_checkpoints

    torch.set_num_threads(threads)
    ckpt = build_tiny_checkpoints(cache_dir or default_cache_dir(), size=size)  # type: ignore[arg-type]
    sets = {"pre_threshold": SPLIT_THRESHOLD, "post_threshold": 1e9, "num_candidates": 5}
    eta = ETA.from_pretrained(
        ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model, config=ETAConfig(**sets)
    )
    baseline = engine_baseline(eta, max_tokens=max_tokens)
    del eta
    args = [ckpt.vlm, "--clip", ckpt.clip, "--reward-model", ckpt.reward_model]
    args += ["--max-queue", str(max(64, clients * 2))]
    for name, value in sets.items():
        args += ["--set", f"{name}={value}"]
    with serve_process(args, threads=threads) as (base_url, pid):
        report = asyncio.run(
            run_load(
                base_url, clients=clients, requests=requests, max_tokens=max_tokens, server_pid=pid
            )
        )
    summary = report.summary()
    summary["setup"] = {"size": size, "max_tokens": max_tokens, "torch_threads": threads}
    # The same mix of good requests run one after another on the engine, without HTTP.
    good = {k: len(report.latencies[k]) for k in ("safe", "flagged")}
    engine_s = sum(baseline[k] * n for k, n in good.items())
    served_rps = sum(good.values()) / report.seconds
    engine_rps = sum(good.values()) / engine_s
    summary["engine_only"] = {
        "median_s": {k: round(v, 4) for k, v in baseline.items()},
        "good_requests_per_s": round(engine_rps, 2),
        "served_good_requests_per_s": round(served_rps, 2),
        "served_vs_engine": round(served_rps / engine_rps, 3),
    }
    print(json.dumps(summary, indent=2))
    print(
        f"{report.requests} requests from {clients} streaming clients in {report.seconds:.1f} s: "
        f"{report.throughput:.1f} req/s, p50 {report.percentile(0.5):.3f} s, "
        f"p99 {report.percentile(0.99):.3f} s, {report.outcomes['failed']} failed; server RSS "
        f"{report.rss_warm_mb:.0f} MB after warm-up -> {report.rss_end_mb:.0f} MB at the end "
        f"(peak {report.peak_rss_mb:.0f} MB); the engine alone runs the same good requests at "
        f"{engine_rps:.1f} req/s (served: {served_rps:.1f})"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2))


@contextlib.contextmanager
def serve_process(
    args: list[str], *, threads: int = 1, startup_timeout_s: float = 300.0
) -> Iterator[tuple[str, int]]:
    """Run ``eta-guard serve ARGS`` (keyless, on 127.0.0.1 and a free port) as a process of its
    own; yield ``(base_url, pid)`` once ``/health`` says ready; stop it on exit."""
    import os
    import subprocess
    import sys
    import tempfile

    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "eta_guard.cli", "serve", *args]
    cmd += ["--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ETA_GUARD_API_KEYS": ""}
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while server.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            log.seek(0)
            raise RuntimeError(f"the server did not become ready: {log.read()[-2000:]!r}")
        yield base_url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":  # pragma: no cover
    import typer

    typer.run(main)

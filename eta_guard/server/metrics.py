"""Prometheus metrics of one app (its own registry, so several apps never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Requests, verdicts, aligned answers, latencies and queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "eta_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.verdicts = Counter(
            "eta_verdicts",
            "ETA verdicts by route and outcome (safe / unsafe).",
            ["route", "verdict"],
            registry=r,
        )
        self.aligned = Counter("eta_aligned_answers", "Answers re-decoded by ETA.", registry=r)
        self.cancelled = Counter(
            "eta_cancelled",
            "Model calls stopped early (client gone or deadline).",
            ["reason"],
            registry=r,
        )
        self.latency = Histogram(
            "eta_request_seconds",
            "Request latency (to the last byte).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "eta_model_seconds",
            "Time a call held the model.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("eta_queue_depth", "Requests waiting for the model.", registry=r)
        self.running = Gauge("eta_model_busy", "Calls holding the model now.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

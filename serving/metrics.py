"""Prometheus metrics of one app, in its own registry (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.batching import BatchStats

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request counts by status, latencies, queue wait, batch sizes and the loaded models."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "refiner_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "refiner_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.grpc_requests = Counter("refiner_grpc_requests", "gRPC calls by method and status code", ["method", "code"], registry=r)
        self.grpc_latency = Histogram(
            "refiner_grpc_request_duration_seconds", "gRPC call latency", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("refiner_http_requests_in_flight", "HTTP requests being answered", registry=r)
        self.queue_wait = Histogram(
            "refiner_queue_wait_seconds", "Time a request waited for its batch to start", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "refiner_batch_size", "Rows per inference run", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "refiner_inference_duration_seconds", "Time of one inference run", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("refiner_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self.loaded = Gauge(
            "refiner_model_loaded", "1 for each model version being served, with its execution provider",
            ["model", "version", "provider"], registry=r,
        )

    def observe_batch(self, model: str, stats: BatchStats) -> None:
        self.batch_size.labels(model).observe(stats.rows)
        self.inference.labels(model).observe(stats.run_seconds)
        wait = self.queue_wait.labels(model)
        for seconds in stats.queue_waits:
            wait.observe(seconds)

"""Prometheus metrics of the request path, in one registry per app instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vitserve_requests_total", "HTTP requests.", ["model", "route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "vitserve_request_duration_seconds",
            "HTTP request latency.",
            ["model", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "vitserve_queue_wait_seconds",
            "Time an image waited in its model's queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "vitserve_inference_duration_seconds",
            "Model forward time of one batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vitserve_batch_size", "Images per batch.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter("vitserve_images_total", "Images classified.", ["model"], registry=r)
        self.queue_depth = Gauge(
            "vitserve_queue_depth", "Images waiting per model.", ["model"], registry=r
        )
        self.in_flight = Gauge(
            "vitserve_requests_in_flight", "HTTP requests being served.", registry=r
        )
        self.rejected = Counter(
            "vitserve_rejected_total",
            "Images refused before inference, by reason.",
            ["model", "reason"],
            registry=r,
        )

"""Prometheus metrics of the request path, in one registry per app instance.

Several worker processes (``uvicorn --workers N``, gunicorn) each hold their own
counters; with ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client writes every value to
files in that folder and :meth:`Metrics.scrape` aggregates them, so whichever worker
answers ``/metrics`` reports the whole server. Each gauge states how its per-process
values combine (``multiprocess_mode``); in single-process mode that setting is ignored.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from app.experiments.agreement import Agreement
from app.serving.gpu_metrics import GpuCollector

if TYPE_CHECKING:  # the store pulls in timm: too heavy for a metrics-only process
    from app.store import Manifest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Total variation and JS divergence (bits) both lie in [0, 1]; most pairs of a dense model
# and its compressed copy sit well below 0.1, hence the fine low end.
DISTANCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
REJECT_REASONS = ("queue_full", "deadline", "bad_input", "unavailable")
SHADOW_DROP_REASONS = ("queue_full", "unavailable", "overloaded", "failed")
AGREEMENT_OUTCOMES = ("agree", "disagree")
DISTANCE_MEASURES = ("total_variation", "js_divergence")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


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
            "vitserve_queue_depth",
            "Images waiting per model (summed over worker processes).",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.workers_ready = Gauge(
            "vitserve_workers_ready",
            "Server processes whose models have all loaded and that are ready (summed over "
            "worker processes: with several, one /readyz answer speaks for one process only).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.in_flight = Gauge(
            "vitserve_requests_in_flight",
            "HTTP requests being served (summed over worker processes).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.rejected = Counter(
            "vitserve_rejected_total",
            "Requests or images refused before inference, by reason.",
            ["model", "reason"],
            registry=r,
        )
        # A labelled gauge rather than an Info: Info does not work in multiprocess mode.
        self.model_info = Gauge(
            "vitserve_model_info",
            "1 for each model serving, with what it is and where it runs.",
            [
                "model",
                "variant",
                "architecture",
                "family",
                "compression",
                "token_schedule",
                "dtype",
                "device",
            ],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.ab_assignments = Counter(
            "vitserve_ab_assignments_total",
            "/classify requests without ?model= routed to each A/B variant.",
            ["model"],
            registry=r,
        )
        self.ab_skipped = Counter(
            "vitserve_ab_skipped_total",
            "A/B picks of a variant that was not ready, so sent to another one.",
            ["model"],
            registry=r,
        )
        self.agreement = Counter(
            "vitserve_agreement_total",
            "Images run on two variants, by whether their top-1 classes agree.",
            ["mode", "reference", "candidate", "outcome"],
            registry=r,
        )
        self.distance = Histogram(
            "vitserve_agreement_distance",
            "Distance between two variants' probability vectors for one image.",
            ["mode", "reference", "candidate", "measure"],
            buckets=DISTANCE_BUCKETS,
            registry=r,
        )
        self.shadow_dropped = Counter(
            "vitserve_shadow_dropped_total",
            "Shadow copies not run, by reason (the primary's response is never affected).",
            ["reference", "candidate", "reason"],
            registry=r,
        )
        self.gpu_allocated = Gauge(
            "vitserve_gpu_memory_allocated_bytes",
            "GPU memory held by tensors of this service (torch, summed over processes).",
            ["gpu"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.gpu_reserved = Gauge(
            "vitserve_gpu_memory_reserved_bytes",
            "GPU memory reserved by torch's caching allocator (summed over processes).",
            ["gpu"],
            multiprocess_mode="livesum",
            registry=r,
        )
        r.register(GpuCollector())

    # ---- series known up front -----------------------------------------------------------
    def declare_model(self, name: str) -> None:
        """Create the model's zero-valued series, so rates read 0 rather than no data."""
        for reason in REJECT_REASONS:
            self.rejected.labels(name, reason)
        self.images.labels(name)

    def declare_pair(self, mode: str, reference: str, candidate: str) -> None:
        for outcome in AGREEMENT_OUTCOMES:
            self.agreement.labels(mode, reference, candidate, outcome)
        if mode == "shadow":
            for reason in SHADOW_DROP_REASONS:
                self.shadow_dropped.labels(reference, candidate, reason)

    # ---- recording -----------------------------------------------------------------------
    def model_ready(
        self, name: str, manifest: Manifest, device: torch.device, dtype: torch.dtype
    ) -> None:
        compression = manifest.compression
        schedule = compression.token_schedule if compression else ()
        self.model_info.labels(
            model=name,
            variant=manifest.variant,
            architecture=manifest.architecture,
            family=compression.family if compression else "none",
            compression=str(compression) if compression else "none",
            token_schedule=",".join(f"{s.tokens}@{s.layer}" for s in schedule) or "none",
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
        ).set(1)

    def record_agreement(self, mode: str, reference: str, candidate: str, a: Agreement) -> None:
        outcome = "agree" if a.top1_match else "disagree"
        self.agreement.labels(mode, reference, candidate, outcome).inc()
        self.distance.labels(mode, reference, candidate, "total_variation").observe(
            a.total_variation
        )
        self.distance.labels(mode, reference, candidate, "js_divergence").observe(a.js_divergence)

    def sample_gpu_memory(self, device: torch.device) -> None:
        """torch's view of this process's GPU memory; called after warm-up and after batches."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.gpu_allocated.labels(str(index)).set(torch.cuda.memory_allocated(index))
        self.gpu_reserved.labels(str(index)).set(torch.cuda.memory_reserved(index))

    # ---- exposition ----------------------------------------------------------------------
    def scrape(self) -> tuple[bytes, str]:
        """Text exposition: this process's registry, or every process's in multiprocess mode."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        registry.register(GpuCollector())  # device-wide figures: right from any worker
        return generate_latest(registry), CONTENT_TYPE_LATEST

    @staticmethod
    def process_exiting() -> None:
        """Drop this process's live gauges (queue depth, in-flight, model info) from the
        aggregate; without it a stopped worker's last values would be summed forever."""
        path = multiprocess_dir()
        if path is not None:
            mark_process_dead(os.getpid(), path)

"""One concurrency level of ``vitserve bench service``: measuring it (:func:`measure_level`,
the client's figures with the server's ``/metrics`` deltas, :class:`Level`) and how the run
shows its levels: the console table, the decode stage's steps, a latency/throughput plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from app.bench.arch import fmt
from app.bench.load_client import Client, Load
from app.bench.utilisation import Utilisation


@dataclass
class Level:
    """One model at one concurrency: what the client saw and what the server reported."""

    model: str
    concurrency: int
    seconds: float
    requests: int
    errors: dict[str, int]
    img_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_batch: float | None
    decode_ms: float | None  # the decode stage of an image's batch (decode + resize + crop)
    queue_ms: float | None
    inference_ms: float | None  # the forward pass of an image's batch
    device_us_per_image: float | None  # forward time / batch size
    other_ms: float | None  # latency not spent in the stages above: HTTP, parsing, client
    nvjpeg_share: float | None  # images nvjpeg's CUDA decode took (torchvision's or nvImageCodec's)
    hardware_share: float | None = None  # images the GPU's JPEG engines decoded
    offered_img_s: float | None = None  # open loop: the arrival rate (concurrency: its cap)
    cpu_busy: float | None = None  # share of all host cores busy (server and client)
    gpu_busy: float | None = None  # share of time a kernel ran on the GPU (NVML)
    cores: dict[str, float] | None = None  # cores busy on average: client, server, engine


def gpu_decoded(level: Level) -> float | None:
    """The share of images decoded on the GPU, by nvjpeg or the JPEG engines."""
    if level.nvjpeg_share is None:
        return None
    return level.nvjpeg_share + (level.hardware_share or 0.0)


def format_table(levels: list[Level], ceilings: dict[str, float]) -> str:
    head = (
        f"{'model':28s} {'conc':>4s} {'img/s':>8s} {'ceil%':>6s} {'p50':>8s} {'p95':>8s} "
        f"{'p99':>8s} {'batch':>6s} {'dec':>6s} {'queue':>7s} {'infer':>7s} {'us/img':>7s} "
        f"{'other':>7s} {'gpu-dec':>7s} {'cpu%':>5s} {'gpu%':>5s} {'cores c/s/e':>14s} "
        f"{'err':>5s}"
    )
    rows = [head, "-" * len(head)]
    for lv in levels:
        ceil = ceilings.get(lv.model)
        rows.append(
            f"{lv.model[:28]:28s} {'½' if lv.offered_img_s else lv.concurrency:>4} {lv.img_s:8.1f} "
            f"{fmt(100 * lv.img_s / ceil if ceil else None, '.0f'):>6s} "
            f"{fmt(lv.p50_ms):>8s} {fmt(lv.p95_ms):>8s} {fmt(lv.p99_ms):>8s} "
            f"{fmt(lv.mean_batch):>6s} {fmt(lv.decode_ms):>6s} {fmt(lv.queue_ms):>7s} "
            f"{fmt(lv.inference_ms):>7s} {fmt(lv.device_us_per_image, '.0f'):>7s} "
            f"{fmt(lv.other_ms):>7s} {fmt(gpu_decoded(lv), '.0%'):>7s} "
            f"{fmt(lv.cpu_busy, '.0%'):>5s} {fmt(lv.gpu_busy, '.0%'):>5s} "
            f"{format_cores(lv.cores):>14s} {sum(lv.errors.values()):5d}"
        )
    rows.append(
        "latency in ms (client, per request); dec/queue/infer: server ms per image (its "
        "batch's decode stage, queue wait, forward); us/img: forward time per image; other: "
        "latency outside those stages (HTTP, parsing, client); gpu-dec: share decoded on the "
        "GPU (nvjpeg and the JPEG engines); ceil%: of the decode stage alone (no model, no "
        "HTTP; in as many processes as the server has workers); cpu%/gpu%: how busy all "
        "host cores (server and client) and the GPU were; cores c/s/e: cores the load client, "
        "the HTTP server and the engine kept busy; conc ½: open loop, "
        "Poisson arrivals at half the best closed-loop throughput"
    )
    return "\n".join(rows)


def format_cores(cores: dict[str, float] | None) -> str:
    if not cores:
        return "-"
    return "/".join(f"{cores.get(side, 0.0):.1f}" for side in ("client", "server", "engine"))


def format_steps(stages: dict[str, dict[str, Any]]) -> str:
    """One line per model: the decode stage's steps in ms per image (one thread, each step
    synchronised), the split of the table's ``dec`` column."""
    lines = ["decode stage per image, step by step (one thread, each step synchronised):"]
    for model, stage in stages.items():
        steps = ", ".join(f"{step} {ms:.3f}" for step, ms in stage["ms_per_image"].items())
        lines.append(f"  {model}: {stage['path']}, {stage['images']} images: {steps} ms")
    return "\n".join(lines)


def plot(levels: list[Level], model: str, ceiling: float | None, path: Path) -> None:
    """Latency (p50/p95/p99) against throughput, one point per concurrency level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [
        lv for lv in levels if lv.model == model and lv.p50_ms is not None and not lv.offered_img_s
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [lv.img_s for lv in mine]
    for attr, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
        ax.plot(x, [getattr(lv, attr) for lv in mine], style, label=attr.removesuffix("_ms"))
    for lv in mine:
        ax.annotate(f"c={lv.concurrency}", (lv.img_s, lv.p50_ms), fontsize=8)
    if ceiling:
        ax.axvline(ceiling, color="grey", linestyle="-.", label="decode ceiling")
    ax.set(xlabel="throughput (images/s)", ylabel="latency (ms)", title=model)
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def batch_totals(metrics_text: str, model: str) -> tuple[float, float]:
    """(sum, count) of ``vitserve_batch_size`` for ``model``: images and batches so far."""
    values = {"vitserve_batch_size_sum": 0.0, "vitserve_batch_size_count": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name in values and s.labels.get("model") == model:
                values[s.name] += s.value
    return values["vitserve_batch_size_sum"], values["vitserve_batch_size_count"]


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def measure_level(
    client: Client,
    base: str,
    model: str,
    load: Load,
    concurrency: int,
    seconds: float,
    warmup: float,
    *,
    baseline: bool = False,
    offered_img_s: float | None = None,
) -> Level:
    """Warm up (not measured: connections open, batcher fills), then measure; closed loop,
    or open loop at ``offered_img_s``. A ``baseline`` server (LitServe) serves one model
    at its root and has no /metrics."""
    route_model = None if baseline else model
    rate = None if offered_img_s is None else offered_img_s / load.per_request
    if warmup > 0:
        client.drive(base, route_model, load, concurrency, warmup, rate)
    before = after = (0.0, 0.0)
    if not baseline:
        before = batch_totals(httpx.get(f"{base}/metrics", timeout=30).text, model)
    with Utilisation(getattr(base, "pid", None)) as busy:
        samples, elapsed = client.drive(base, route_model, load, concurrency, seconds, rate)
    if not baseline:
        after = batch_totals(httpx.get(f"{base}/metrics", timeout=30).text, model)
    batches = after[1] - before[1]
    splits = np.asarray(samples.splits, dtype=np.float64).reshape(-1, 5)
    means: list[float | None] = [None] * 5
    device_us = other_ms = None
    if len(splits):
        means = splits.mean(axis=0).tolist()
        device_us = float((splits[:, 2] / splits[:, 3]).mean() * 1e3)
        other_ms = float((splits[:, 4] - splits[:, :3].sum(axis=1)).mean())
    decoded = sum(samples.decoders.values())
    # nvjpeg's CUDA decode, by torchvision or by nvImageCodec
    nvjpeg = samples.decoders["nvjpeg"] + samples.decoders["nvimgcodec"]
    return Level(
        model=model,
        concurrency=concurrency,
        seconds=elapsed,
        requests=len(samples.latencies_ms),
        errors=dict(samples.errors),
        img_s=samples.images / elapsed,
        p50_ms=_pct(samples.latencies_ms, 50),
        p95_ms=_pct(samples.latencies_ms, 95),
        p99_ms=_pct(samples.latencies_ms, 99),
        mean_batch=(after[0] - before[0]) / batches if batches else None,
        decode_ms=means[0],
        queue_ms=means[1],
        inference_ms=means[2],
        device_us_per_image=device_us,
        other_ms=other_ms,
        nvjpeg_share=nvjpeg / decoded if decoded else None,
        hardware_share=samples.decoders["hardware"] / decoded if decoded else None,
        offered_img_s=offered_img_s,
        cpu_busy=busy.cpu_busy,
        gpu_busy=busy.gpu_busy,
        cores=busy.cores,
    )

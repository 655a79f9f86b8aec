"""One concurrency level of ``vitserve bench service`` (:class:`Level`) and how the run
shows its levels: the console table, the decode stage's steps, a latency/throughput plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.bench.arch import fmt


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
    nvjpeg_share: float | None  # images nvjpeg (CUDA) decoded
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

"""``vitserve bench service``: end-to-end speed of the running service, dense vs compressed.

The forward-pass benchmark (``app.bench.models``) says what a model could do; this says
what the service does with it: HTTP, decoding, queueing and dynamic batching included.
A closed-loop asyncio client keeps ``c`` requests in flight for each concurrency level
and model, the models interleaved per level so drift hits them alike. Per level it
reports images/s, latency percentiles, the mean batch the server formed (``/metrics``
deltas) and the server's own time split per image. The request-path ceiling -- the app's
``Preprocessor`` alone on the same images, in as many threads as the server decodes with
-- shows how much of the gap to it is the model and how much is the service.

Closed loop, same machine: the client shares the CPU with the server, so on CPU the
numbers are a floor; on a GPU host the client is negligible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from app.bench.images import content_type, load_images
from app.bench.server import running_server
from app.bench.timing import environment, timing_device

Images = list[tuple[str, bytes]]
DEFAULT_CONCURRENCY = (1, 4, 16, 64)


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
    decode_ms: float | None
    queue_ms: float | None
    inference_ms: float | None


@dataclass
class _Samples:
    latencies_ms: list[float] = field(default_factory=list)
    splits: list[tuple[float, float, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    images: int = 0


def batch_totals(metrics_text: str, model: str) -> tuple[float, float]:
    """(sum, count) of ``vitserve_batch_size`` for ``model``: images and batches so far."""
    values = {"vitserve_batch_size_sum": 0.0, "vitserve_batch_size_count": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name in values and s.labels.get("model") == model:
                values[s.name] += s.value
    return values["vitserve_batch_size_sum"], values["vitserve_batch_size_count"]


async def _worker(
    http: httpx.AsyncClient, model: str, images: Images, start: int, until: float, out: _Samples
) -> None:
    i = start
    while time.perf_counter() < until:
        name, data = images[i % len(images)]
        i += 1
        t0 = time.perf_counter()
        try:
            r = await http.post(
                "/classify",
                params={"model": model, "top_k": 1},
                content=data,
                headers={"content-type": content_type(name)},
            )
        except httpx.HTTPError as exc:
            out.errors[type(exc).__name__] += 1
            continue
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        if r.status_code != 200:
            out.errors[str(r.status_code)] += 1
            continue
        out.latencies_ms.append(elapsed_ms)
        for result in r.json()["results"]:
            t = result["timings"]
            out.splits.append((t["decode_ms"], t["queue_ms"], t["inference_ms"]))
            out.images += 1


async def _drive(
    base: str, model: str, images: Images, concurrency: int, seconds: float
) -> tuple[_Samples, float]:
    """Keep ``concurrency`` requests in flight for ``seconds``; one connection each."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as http:
        samples = _Samples()
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(
            *(_worker(http, model, images, k, until, samples) for k in range(concurrency))
        )
        return samples, time.perf_counter() - started


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def measure_level(
    base: str, model: str, images: Images, concurrency: int, seconds: float, warmup: float
) -> Level:
    """Warm up (not measured: connections open, batcher fills), then measure."""
    if warmup > 0:
        asyncio.run(_drive(base, model, images, concurrency, warmup))
    before = batch_totals(httpx.get(f"{base}/metrics", timeout=30).text, model)
    samples, elapsed = asyncio.run(_drive(base, model, images, concurrency, seconds))
    after = batch_totals(httpx.get(f"{base}/metrics", timeout=30).text, model)
    batches = after[1] - before[1]
    splits = np.asarray(samples.splits, dtype=np.float64).reshape(-1, 3)
    means = splits.mean(axis=0).tolist() if len(splits) else [None, None, None]
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
    )


def decode_ceiling(
    preprocessing: Any, max_pixels: int, images: Images, workers: int, seconds: float
) -> float:
    """Images/s of the app's own decode + eval transform, no model, no HTTP: the most the
    request path could deliver with ``workers`` decode threads (the server's count)."""
    from app.serving.preprocess import Preprocessor

    pre = Preprocessor(preprocessing, max_pixels)
    pre(images[0][1])  # first call builds lazy state; keep it out of the number
    done = 0
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        while time.perf_counter() - started < seconds:
            batch = [data for _, data in images] * max(1, workers // len(images) + 1)
            done += sum(1 for _ in pool.map(pre, batch))
    return done / (time.perf_counter() - started)


def speedups(best: dict[str, float], reference: str) -> dict[str, float | None]:
    """Best throughput of each other model over the reference's (the first model given)."""
    ref = best.get(reference) or 0.0
    return {m: (v / ref if ref else None) for m, v in best.items() if m != reference}


def format_table(levels: list[Level], ceilings: dict[str, float]) -> str:
    def f(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    head = (
        f"{'model':24s} {'conc':>4s} {'img/s':>8s} {'ceil%':>6s} {'p50':>8s} {'p95':>8s} "
        f"{'p99':>8s} {'batch':>6s} {'dec':>6s} {'queue':>7s} {'infer':>7s} {'err':>5s}"
    )
    rows = [head, "-" * len(head)]
    for lv in levels:
        ceil = ceilings.get(lv.model)
        rows.append(
            f"{lv.model[:24]:24s} {lv.concurrency:4d} {lv.img_s:8.1f} "
            f"{f(100 * lv.img_s / ceil if ceil else None, '.0f'):>6s} "
            f"{f(lv.p50_ms):>8s} {f(lv.p95_ms):>8s} {f(lv.p99_ms):>8s} "
            f"{f(lv.mean_batch):>6s} {f(lv.decode_ms):>6s} {f(lv.queue_ms):>7s} "
            f"{f(lv.inference_ms):>7s} {sum(lv.errors.values()):5d}"
        )
    rows.append("latency in ms (client); dec/queue/infer: server ms per image; ceil%: of decode")
    return "\n".join(rows)


def plot(levels: list[Level], model: str, ceiling: float | None, path: Path) -> None:
    """Latency (p50/p95/p99) against throughput, one point per concurrency level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [lv for lv in levels if lv.model == model and lv.p50_ms is not None]
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app.config import Settings
    from app.store import ModelStore

    settings = Settings()
    store = ModelStore(args.store)
    images = load_images(args.images, count=args.generated)
    decode_workers = args.decode_workers or settings.decode_workers
    ceilings: dict[str, float] = {}
    for model in args.models:  # before the server starts: it must not compete for CPU
        ceilings[model] = decode_ceiling(
            store.manifest(model).preprocessing,
            settings.max_image_pixels,
            images,
            decode_workers,
            args.ceiling_seconds,
        )
    env = {
        "VITSERVE_STORE_DIR": str(args.store),
        "VITSERVE_DEFAULT_MODEL": args.models[0],
        "VITSERVE_MODELS": json.dumps(sorted(set(args.models))),
        "VITSERVE_DEVICE": args.device,
        "VITSERVE_DECODE_WORKERS": str(decode_workers),
        **({"VITSERVE_DTYPE": args.dtype} if args.dtype else {}),
        **({"VITSERVE_MAX_BATCH_SIZE": str(args.max_batch_size)} if args.max_batch_size else {}),
    }
    levels: list[Level] = []
    with running_server(env, timeout_s=args.start_timeout) as base:
        info = {m["name"]: m for m in httpx.get(f"{base}/models", timeout=30).json()["models"]}
        for k, concurrency in enumerate(args.concurrency):
            # alternate the order per level, so neither model always runs first
            order = args.models if k % 2 == 0 else list(reversed(args.models))
            for model in order:
                levels.append(
                    measure_level(base, model, images, concurrency, args.seconds, args.warmup)
                )
                print(f"  {model} c={concurrency}: {levels[-1].img_s:.1f} img/s", flush=True)
    levels.sort(key=lambda lv: (args.models.index(lv.model), lv.concurrency))
    best = {m: max(lv.img_s for lv in levels if lv.model == m) for m in args.models}
    ratios = speedups(best, args.models[0])
    env_facts = environment(timing_device(args.device))
    return {
        **env_facts,
        "batch": args.max_batch_size or settings.max_batch_size,
        "dtype": info[args.models[0]].get("dtype"),
        "models": {
            m: {"variant": info[m].get("variant"), "compression": info[m].get("compression")}
            for m in args.models
        },
        "reference": args.models[0],
        "concurrency": list(args.concurrency),
        "seconds_per_level": args.seconds,
        "images": len(images),
        "images_dir": str(args.images) if args.images else None,
        "decode_workers": decode_workers,
        "decode_ceiling_img_s": ceilings,
        "best_img_s": best,
        "speedups": ratios,
        "speedup": next(iter(ratios.values()), None),
        "levels": [asdict(lv) for lv in levels],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitserve bench service", description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, default=Path("model_store"), help="model store folder")
    p.add_argument(
        "--models",
        nargs="+",
        default=["deit_tiny_patch16_224"],
        help="store names; the first is the reference (dense) for `speedup`",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY))
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    p.add_argument("--images", type=Path, help="folder of images (default: generated JPEGs)")
    p.add_argument("--generated", type=int, default=16, help="how many images to generate")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    p.add_argument("--decode-workers", dest="decode_workers", type=int)
    p.add_argument("--ceiling-seconds", dest="ceiling_seconds", type=float, default=3.0)
    p.add_argument("--start-timeout", dest="start_timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(c < 1 for c in args.concurrency):
        raise SystemExit("--concurrency levels must be >= 1")
    result = run(args)
    levels = [Level(**lv) for lv in result["levels"]]
    print(format_table(levels, result["decode_ceiling_img_s"]))
    if result["speedup"] is not None:
        print(f"speedup {result['speedups']} (best img/s over {result['reference']})")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = result["device_type"]
    path = args.out / f"service-{slug}-{stamp}.json"
    plots = {}
    for model in args.models:
        png = args.out / f"service-{slug}-{stamp}-{model}.png"
        plot(levels, model, result["decode_ceiling_img_s"].get(model), png)
        plots[model] = png.name
    result["plots"] = plots
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path} and {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

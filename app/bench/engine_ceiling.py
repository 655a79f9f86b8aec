"""The engine's own ceiling: a model's batcher, decode stage and runner in one process, fed
from their own event loop -- no HTTP, no worker, no socket.

Set beside ``vitserve bench service`` it says which side sets the pace: a service well below
this ceiling loses its time in HTTP and the hand-off to the engine; one near it, in the
engine. Per model, payload kind (``jpeg``: the photos as clients send them; ``pixels``: the
same photos decoded and cropped to 224 by the client, the v2 protocol's UINT8 input), batch
size and decode threads it reports images/s, the mean batch, the decode and forward time of
a batch, and the model alone on batches of that size (the runner's forward, softmax and copy
to the host). Where two models are given, the second's images/s over the first's, row by
row, is the ``speedup``.

    python -m app.bench.engine_ceiling --store /tmp/store --models deit_small \\
        deit_small-merge-t5 --images ../shared/images/imagenet-dev --batches 32 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from app.bench.images import load_images
from app.bench.tables import Table, load_result, markdown, stamp, write_result
from app.config import Settings
from app.environment import device_slug, environment, server_settings
from app.serving.batcher import DynamicBatcher, Prediction
from app.serving.decode import Encoded, Payload, Pixels
from app.serving.metrics import Metrics
from app.serving.pool import ModelPool, ServedModel
from app.store import ModelStore

KINDS = ("jpeg", "pixels")


def payloads(model: ServedModel, images: list[bytes], kind: str) -> list[Payload]:
    pre = model.preprocessor
    if kind == "jpeg":
        return [Encoded(bytearray(data), pre.probe(data)) for data in images]
    # contiguous [3, H, W], as the engine receives them (the HTTP worker lays them out)
    return [Pixels(pre.decode_crop(data).contiguous()) for data in images]


async def saturate(
    batcher: DynamicBatcher, items: list[Payload], *, seconds: float, warmup: float, in_flight: int
) -> dict[str, float]:
    """Keep ``in_flight`` images queued for ``warmup + seconds``; what the last ``seconds``
    completed, and their batches' mean size, decode and forward time."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    window, ends = started + warmup, started + warmup + seconds
    done: list[Prediction] = []
    drained = loop.create_future()
    outstanding, sent = 0, 0

    def submit() -> None:
        nonlocal outstanding, sent
        future = batcher.enqueue(items[sent % len(items)], ends + 60)
        sent, outstanding = sent + 1, outstanding + 1
        future.add_done_callback(completed)

    def completed(future: asyncio.Future[Prediction]) -> None:
        nonlocal outstanding
        outstanding -= 1
        now = time.monotonic()
        if window <= now <= ends:
            done.append(future.result())
        if now < ends:
            submit()
        elif not outstanding and not drained.done():
            drained.set_result(None)

    for _ in range(in_flight):
        submit()
    await drained
    batches = sum(1 / p.batch_size for p in done)
    decoders = Counter(p.decoder for p in done if p.decoder)
    return {
        # who decoded (a decoder asked for but not found falls back, and shows here)
        **{f"{name}_share": n / len(done) for name, n in sorted(decoders.items())},
        "img_s": len(done) / seconds,
        "mean_batch": len(done) / batches,
        "decode_ms_per_batch": 1e3 * sum(p.decode_s / p.batch_size for p in done) / batches,
        "forward_ms_per_batch": 1e3 * sum(p.inference_s / p.batch_size for p in done) / batches,
    }


def model_alone_ms(model: ServedModel, batch: int, repeats: int = 30) -> float:
    """Median wall time of the runner's predict on a ready batch on its device."""
    runner = model.runner
    x = torch.randn(batch, *runner.input_size, device=runner.device).to(runner.dtype)
    times = []
    for i in range(repeats + 5):
        started = time.perf_counter()
        runner.predict(x)
        if i >= 5:
            times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(
        store_dir=args.store,
        models=args.models,
        default_model=args.models[0],
        device=args.device,
        max_batch_size=max(args.batches),
        queue_size=args.in_flight,
        decode_threads=max(args.decode_threads),
    )
    pool = ModelPool(settings, ModelStore(args.store), Metrics(), reports_worker_ready=False)
    await pool.start()
    await pool.wait_loaded()
    images = [data for _, data in load_images(args.images, count=args.count)]
    rows: list[dict[str, Any]] = []
    print("\n".join(format_rows(rows).splitlines()), flush=True)  # the header
    for name in args.models:
        model = pool.get(name)
        if model.batcher is None:
            raise SystemExit(f"model {name!r} did not load: {model.state} {model.reason}")
        alone = {batch: model_alone_ms(model, batch) for batch in args.batches}
        for kind in args.kinds:
            items = payloads(model, images, kind)
            for batch in args.batches:
                for threads in args.decode_threads:
                    batcher = pool.new_batcher(model, max_batch_size=batch, decode_threads=threads)
                    batcher.start()
                    stats = await saturate(
                        batcher,
                        items,
                        seconds=args.seconds,
                        warmup=args.warmup,
                        in_flight=args.in_flight,
                    )
                    await batcher.stop()
                    row = {"model": name, "kind": kind, "batch": batch, "decode_threads": threads}
                    row |= {k: round(v, 3) for k, v in stats.items()}
                    row["model_alone_ms"] = round(alone[batch], 3)
                    row["model_alone_img_s"] = round(1e3 * batch / alone[batch], 1)
                    print(format_rows([row]).splitlines()[-1], flush=True)
                    rows.append(row)
    await pool.stop()
    return {
        **environment(pool.device),
        "slug": device_slug(pool.device),
        "what": "the engine's batcher + decode stage + runner in one process, no HTTP",
        "dtype": str(pool.dtype).removeprefix("torch."),
        "batch": args.batches,
        "images": len(images),
        "images_dir": str(args.images),
        "seconds": args.seconds,
        "in_flight": args.in_flight,
        # what else set the engine up (VITSERVE_HARDWARE_DECODE=true, say)
        "server": server_settings(),
        "rows": rows,
        "speedup": speedups(rows, args.models),
    }


def speedups(rows: list[dict[str, Any]], models: list[str]) -> dict[str, float] | None:
    """``{"kind b<batch> t<threads>": second model's img/s over the first's}``."""
    if len(models) < 2:
        return None
    key = lambda r: f"{r['kind']} b{r['batch']} t{r['decode_threads']}"  # noqa: E731
    base = {key(r): r["img_s"] for r in rows if r["model"] == models[0]}
    return {
        key(r): round(r["img_s"] / base[key(r)], 3)
        for r in rows
        if r["model"] == models[1] and base.get(key(r))
    }


def input_label(row: dict[str, Any]) -> str:
    """The row's input kind, and for JPEGs who decoded them (earlier runs did not record it)."""
    shares = {k.removesuffix("_share"): v for k, v in row.items() if k.endswith("_share")}
    said = ", ".join(f"{name} {share:.0%}" for name, share in shares.items())
    return f"{row['kind']} ({said})" if said else row["kind"]


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ["model", "input", "batch", "decode threads", "img/s", "mean batch"]
    header += ["decode ms/batch", "forward ms/batch", "model alone ms", "model alone img/s"]
    cells = [
        [
            r["model"],
            input_label(r),
            str(r["batch"]),
            str(r["decode_threads"]),
            f"{r['img_s']:,.0f}",
            f"{r['mean_batch']:.1f}",
            f"{r['decode_ms_per_batch']:.2f}",
            f"{r['forward_ms_per_batch']:.2f}",
            f"{r['model_alone_ms']:.2f}",
            f"{r['model_alone_img_s']:,.0f}",
        ]
        for r in rows
    ]
    return "\n".join(markdown(header, cells))


def ceiling_table(table: Table, repo: Path) -> list[str]:
    """The docs' table of each run ``table`` lists: its rows, and the ratio per row."""
    lines: list[str] = []
    for name in table["files"]:
        result = load_result(repo, name)
        caption = (
            f"{result['device']}, {result['dtype']}, torch {result['torch_version']}; "
            f"{result['images']} photos of `{Path(result['images_dir']).name}` cycled, "
            f"{result['in_flight']} images kept queued, {result['seconds']:g} s a row; "
            f"random-weight models. Source: `{stamp(name)}`."
        )
        if server := result.get("server"):
            caption += " Server: " + ", ".join(f"{k}={v}" for k, v in server.items()) + "."
        if note := result.get("note"):
            caption += f" {note}"
        lines += [caption, "", *format_rows(result["rows"]).splitlines(), ""]
        if ratios := result.get("speedup"):
            shown = ", ".join(f"{key}: {ratio:.2f}×" for key, ratio in ratios.items())
            lines += [f"Second model over the first, row by row: {shown}.", ""]
    return lines[:-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.bench.engine_ceiling", description=__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True, help="first: the reference")
    parser.add_argument("--images", type=Path, required=True, help="a folder of photos")
    parser.add_argument("--count", type=int, default=256, help="photos to cycle through")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--decode-threads", nargs="+", type=int, default=[2])
    parser.add_argument("--in-flight", type=int, default=1024, help="images kept queued")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine"))
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args))
    print(format_rows(result["rows"]))
    if result["speedup"]:
        print("speedup (second model over first):", result["speedup"])
    write_result(args.out, f"engine-ceiling-{result['slug']}", result)


if __name__ == "__main__":
    main()

"""The engine's own CPU per image through its socket, with HTTP left out.

One engine process (started as the supervisor starts it), fed by this process over the
engine link an HTTP worker uses (shared-memory arena, frames on a Unix socket), with
``--concurrency`` images in flight. The inputs need no decoding: ``preprocessed`` (the v2
FP32 input, at the model's size) or ``pixels`` (the v2 UINT8 input, 224×224), so what the
engine spends per image is its event loop, the frames, the batcher, the metrics and the
forward -- the part every image pays whatever decodes it. Its figures per row: images/s,
the engine's CPU µs per image and cores busy, the forward's time and its inference thread's
CPU per image and the mean batch (the engine's own counters), and the feeder's µs per image.
On a CPU the forward computes on the engine's cores, mostly outside the GIL: the engine's CPU
per image less the forward's ("the rest") is what its frames, loop, batcher and answers
cost, the part that holds its GIL.

    python -m app.bench.engine_loop --store /tmp/store --model tiny --device cpu
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from app.bench.tables import Table, load_result, markdown, stamp, write_result
from app.bench.utilisation import processes
from app.config import Settings
from app.environment import environment, server_settings
from app.serving.decode import Payload, Pixels, Preprocessed
from app.serving.engine.arena import ShmArena
from app.serving.engine.client import EngineLink
from app.serving.engine.supervisor import EngineProcess
from app.store import ModelStore

INPUTS = ("preprocessed", "pixels")
TICK = os.sysconf("SC_CLK_TCK")


def payload(kind: str, input_size: tuple[int, int, int]) -> Payload:
    if kind == "preprocessed":
        return Preprocessed(torch.randn(input_size))
    return Pixels(torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8))


def cpu_s(pid: int) -> float:
    """CPU seconds ``pid`` has used (user + system)."""
    return processes()[pid][1] / TICK


async def drive(
    link: EngineLink, model: str, item: Payload, concurrency: int, warmup: float, seconds: float
) -> dict[str, float]:
    """Keep ``concurrency`` images in flight; over the last ``seconds``: images answered,
    elapsed, the engine's CPU seconds, this process's CPU seconds, and from the engine's own
    counters (its status frames, up to half a second old at either end, so only their ratios
    are used) the forward's seconds per image and the mean batch."""
    done, stop = 0, False

    async def one_at_a_time() -> None:
        nonlocal done
        while not stop:
            await link.infer(model, item, time.monotonic() + 60)
            done += 1

    def computed() -> dict[str, float]:
        return link.status["models"][model]["computed"]

    tasks = [asyncio.create_task(one_at_a_time()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    pid = link.status["pid"]
    d0, e0, f0, t0, c0 = done, cpu_s(pid), time.process_time(), time.monotonic(), computed()
    await asyncio.sleep(seconds)
    d1, e1, f1, t1, c1 = done, cpu_s(pid), time.process_time(), time.monotonic(), computed()
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    images = c1["images"] - c0["images"]
    if not images:
        raise RuntimeError("the engine sent no status while the level ran: measure longer")
    return {
        "images": d1 - d0,
        "elapsed": t1 - t0,
        "engine_s": e1 - e0,
        "feeder_s": f1 - f0,
        "forward_s_per_image": (c1["forward_s"] - c0["forward_s"]) / images,
        "forward_cpu_s_per_image": (c1["forward_cpu_s"] - c0["forward_cpu_s"]) / images,
        "mean_batch": images / (c1["batches"] - c0["batches"]),
    }


async def measure(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    input_size = ModelStore(settings.store_dir).manifest(args.model).preprocessing.input_size
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitserve-engine-loop-") as folder:
        engine = EngineProcess(settings, None, Path(folder) / "engine.sock")
        engine.spawn()
        arena = ShmArena(256 << 20)
        link = EngineLink(engine.socket_path, arena)
        link.start()
        try:
            started = time.monotonic()
            while not (link.up and link.status["models"][args.model]["state"] == "ready"):
                if engine.proc.poll() is not None or time.monotonic() - started > args.timeout:
                    raise SystemExit(f"the engine did not get {args.model!r} ready")
                await asyncio.sleep(0.2)
            for kind in args.inputs:
                for concurrency in args.concurrency:
                    item = payload(kind, input_size)
                    m = await drive(link, args.model, item, concurrency, args.warmup, args.seconds)
                    row = {
                        "input": kind,
                        "concurrency": concurrency,
                        "img_s": m["images"] / m["elapsed"],
                        "engine_us_per_image": 1e6 * m["engine_s"] / m["images"],
                        "engine_cores": m["engine_s"] / m["elapsed"],
                        "forward_us_per_image": 1e6 * m["forward_s_per_image"],
                        "forward_cpu_us_per_image": 1e6 * m["forward_cpu_s_per_image"],
                        "mean_batch": m["mean_batch"],
                        "feeder_us_per_image": 1e6 * m["feeder_s"] / m["images"],
                    }
                    print(format_rows([row]).splitlines()[-1], flush=True)
                    rows.append(row)
        finally:
            await link.stop()
            arena.close()
            engine.proc.terminate()
            engine.proc.wait(timeout=60)
    return rows


ROW_HEADER = [
    "input",
    "in flight",
    "img/s",
    "engine µs CPU/img",
    "engine cores",
    "forward µs/img: wall / CPU",
    "the rest µs CPU/img",
    "mean batch",
]


def row_cells(r: dict[str, Any]) -> list[str]:
    """A row's input, level, rate, the engine's CPU, its forward, the rest (the engine's CPU
    less the forward's) and the batch, as the console and the docs show them (runs from
    before the engine counted its forwards: –)."""
    cells = [
        r["input"],
        str(r["concurrency"]),
        f"{r['img_s']:,.0f}",
        f"{r['engine_us_per_image']:.0f}",
        f"{r['engine_cores']:.2f}",
    ]
    if "forward_cpu_us_per_image" not in r:
        return [*cells, "–", "–", "–"]
    forward_cpu = r["forward_cpu_us_per_image"]
    return [
        *cells,
        f"{r['forward_us_per_image']:.0f} / {forward_cpu:.0f}",
        f"{r['engine_us_per_image'] - forward_cpu:.0f}",
        f"{r['mean_batch']:.1f}",
    ]


def format_rows(rows: list[dict[str, Any]]) -> str:
    cells = [[*row_cells(r), f"{r['feeder_us_per_image']:.0f}"] for r in rows]
    return "\n".join(markdown([*ROW_HEADER, "feeder µs/img"], cells))


def loop_table(table: Table, repo: Path) -> list[str]:
    """The docs' table: every run ``table`` lists, one row per input and level, its source."""
    results = [(name, load_result(repo, name)) for name in table["files"]]
    first = results[0][1]
    caption = (
        f"{first['device']}, torch {first['torch_version']}; model `{first['model']}`, batch "
        f"≤ {first['batch']}, {first['seconds']:g} s a row; one engine fed by one link."
    )
    cells = [
        [f"`{stamp(name)}`", *row_cells(r)] for name, result in results for r in result["rows"]
    ]
    return [caption, "", *markdown(["run", *ROW_HEADER], cells)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.bench.engine_loop", description=__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=["preprocessed"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[256])
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="engine start-up, s")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine"))
    args = parser.parse_args(argv)
    settings = Settings(
        store_dir=args.store,
        models=[args.model],
        default_model=args.model,
        device=args.device,
        max_batch_size=args.max_batch_size,
        queue_size=max(args.concurrency) * 2,
    )
    print(format_rows([]))  # the header, then each row as it is measured
    rows = asyncio.run(measure(args, settings))
    result = {
        **environment(args.device),
        "what": "one engine process fed over its socket by one link, inputs needing no decode",
        "model": args.model,
        "batch": args.max_batch_size,
        "seconds": args.seconds,
        "server": server_settings(),
        "rows": rows,
    }
    write_result(args.out, f"engine-loop-{result['device_type']}", result)


if __name__ == "__main__":
    main()

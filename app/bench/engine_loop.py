"""The engine's own CPU per image through its socket, with HTTP left out.

One engine process (started as the supervisor starts it), fed by this process over the
engine link an HTTP worker uses (shared-memory arena, frames on a Unix socket), with
``--concurrency`` images in flight. The inputs need no decoding: ``preprocessed`` (the v2
FP32 input, at the model's size) or ``pixels`` (the v2 UINT8 input, 224×224), so what the
engine spends per image is its event loop, the frames, the batcher, the metrics and the
forward -- the part every image pays whatever decodes it. Its figure per row: images/s, the
engine's CPU µs per image and cores busy (an engine near one core is bound by its GIL: its
Python per image sets its ceiling), and the feeder's µs per image.

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
) -> tuple[int, float, float, float]:
    """Keep ``concurrency`` images in flight; over the last ``seconds``: (images answered,
    elapsed, the engine's CPU seconds, this process's CPU seconds)."""
    done, stop = 0, False

    async def one_at_a_time() -> None:
        nonlocal done
        while not stop:
            await link.infer(model, item, time.monotonic() + 60)
            done += 1

    tasks = [asyncio.create_task(one_at_a_time()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    pid = link.status["pid"]
    d0, e0, f0, t0 = done, cpu_s(pid), time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    d1, e1, f1, t1 = done, cpu_s(pid), time.process_time(), time.monotonic()
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    return d1 - d0, t1 - t0, e1 - e0, f1 - f0


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
                    images, elapsed, engine_s, feeder_s = await drive(
                        link, args.model, item, concurrency, args.warmup, args.seconds
                    )
                    row = {
                        "input": kind,
                        "concurrency": concurrency,
                        "img_s": images / elapsed,
                        "engine_us_per_image": 1e6 * engine_s / images,
                        "engine_cores": engine_s / elapsed,
                        "feeder_us_per_image": 1e6 * feeder_s / images,
                    }
                    print(format_rows([row]).splitlines()[-1], flush=True)
                    rows.append(row)
        finally:
            await link.stop()
            arena.close()
            engine.proc.terminate()
            engine.proc.wait(timeout=60)
    return rows


ROW_HEADER = ["input", "in flight", "img/s", "engine µs CPU/img", "engine cores"]


def row_cells(r: dict[str, Any]) -> list[str]:
    """A row's input, level, rate and the engine's CPU, as the console and the docs show them."""
    return [
        r["input"],
        str(r["concurrency"]),
        f"{r['img_s']:,.0f}",
        f"{r['engine_us_per_image']:.0f}",
        f"{r['engine_cores']:.2f}",
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

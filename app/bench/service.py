"""``vitserve bench service``: end-to-end speed of the running service, dense vs compressed.

The forward-pass benchmark (``app.bench.models``) says what a model could do; this says
what the service does with it: HTTP, decoding, queueing and dynamic batching included.
A closed-loop asyncio client keeps ``c`` requests in flight for each concurrency level
and model, the models interleaved per level so drift hits them alike; each request is a
multipart upload of ``--images-per-request`` images. Per level it reports images/s,
latency percentiles, the mean batch the server formed (``/metrics`` deltas) and where an
image's time went: the server's decode stage, queue and forward pass, the device time per
image, and the rest (HTTP, parsing, encoding, client). The request-path ceiling -- the
server's own decode stage alone (nvjpeg or Pillow, as configured) on the same images, in
batches, no model, no HTTP -- shows how close to its plumbing's limit the service runs.

``--litserve`` adds LitServe serving the reference model with its own batching
(``app.bench.litserve_baseline``), driven by the same client with the same images, one
image per request (all LitServe takes).

Closed loop, same machine: the client shares the CPU with the server, so on CPU the
numbers are a floor; on a GPU host the client costs little.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import numpy as np

from app.bench.decode_ceiling import decode_ceiling, stage_times
from app.bench.images import load_images
from app.bench.load_client import Client, Load
from app.bench.server import running_server
from app.bench.service_levels import Level, format_steps, format_table, measure_level, plot
from app.environment import environment, server_settings
from app.timing import timing_device

DEFAULT_CONCURRENCY = (1, 4, 16, 64)


def speedups(best: dict[str, float], reference: str) -> dict[str, float | None]:
    """Best throughput of each other model over the reference's (the first model given)."""
    ref = best.get(reference) or 0.0
    return {m: (v / ref if ref else None) for m, v in best.items() if m != reference}


def median_speedups(levels: Sequence[Level], reference: str) -> dict[str, dict[int, float]]:
    """Per concurrency, each model's median img/s over its repeated closed-loop levels over
    the reference's: on a noisy host, the figure that the best level alone overstates."""
    runs: dict[str, dict[int, list[float]]] = {}
    for lv in levels:
        if lv.offered_img_s is None:
            runs.setdefault(lv.model, {}).setdefault(lv.concurrency, []).append(lv.img_s)
    medians = {m: {c: float(np.median(v)) for c, v in by_c.items()} for m, by_c in runs.items()}
    ref = medians.get(reference, {})
    return {
        m: {c: v / ref[c] for c, v in by_c.items() if ref.get(c)}
        for m, by_c in medians.items()
        if m != reference
    }


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The serving settings under test, as the server's environment."""
    optional = {
        "VITSERVE_DTYPE": args.dtype,
        "VITSERVE_MAX_BATCH_SIZE": args.max_batch_size,
        "VITSERVE_QUEUE_SIZE": args.queue_size,
        "VITSERVE_WORKERS": args.workers,
        "VITSERVE_DECODE_WORKERS": args.decode_workers,
        "VITSERVE_DECODE_THREADS": args.decode_threads,
        "VITSERVE_ENGINE": args.engine,
        "VITSERVE_REPLICA_DEVICES": args.replica_devices,
        "VITSERVE_ENGINES_PER_DEVICE": args.engines_per_device,
        "VITSERVE_GPU_DECODE": None if args.gpu_decode is None else str(args.gpu_decode).lower(),
    }
    given = {k: str(v) for k, v in optional.items() if v is not None}
    bench = {
        "VITSERVE_STORE_DIR": str(args.store),
        "VITSERVE_DEFAULT_MODEL": args.models[0],
        "VITSERVE_MODELS": json.dumps(sorted(set(args.models))),
        "VITSERVE_DEVICE": args.device,
    }
    # settings the caller set around the command (an A/B run's switches, a script's engine
    # set-up) reach the server too, under the bench's own and its flags: recorded with them
    return {**server_settings(), **bench, **given}


def decoding_processes(settings: Any) -> dict[str, int]:
    """Who decodes in the server: each engine (``engines_per_device`` per device) on its
    decode threads, or, inline, every HTTP worker on one thread."""
    if settings.engine == "process":
        return {
            "processes": len(settings.replica_devices or [None]) * settings.engines_per_device,
            "threads": settings.decode_threads,
        }
    return {"processes": settings.workers, "threads": 1}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app.config import Settings
    from app.store import ModelStore

    env = server_env(args)
    with mock.patch.dict(os.environ, env):  # read exactly as the server will read them
        settings = Settings()
    store = ModelStore(args.store)
    load = Load(load_images(args.images, count=args.generated), args.images_per_request)
    # The request path alone (its ceiling, and where its time goes step by step), before
    # the server starts: it must not compete for CPU. Once per distinct preprocessing:
    # models that share one (dense and its compressed variants) share the decode stage.
    preprocessing = {m: store.manifest(m).preprocessing for m in args.models}
    request_path: dict[str, tuple[float, dict[str, Any]]] = {}
    for pre in preprocessing.values():
        key = pre.model_dump_json()
        if key not in request_path:
            common = {"device": args.device, "batch_size": settings.max_batch_size}
            request_path[key] = (
                decode_ceiling(
                    pre,
                    settings,
                    load.images,
                    seconds=args.ceiling_seconds,
                    **decoding_processes(settings),
                    **common,
                ),
                stage_times(pre, settings, load.images, **common),
            )
    ceilings = {m: request_path[p.model_dump_json()][0] for m, p in preprocessing.items()}
    stages = {m: request_path[p.model_dump_json()][1] for m, p in preprocessing.items()}
    levels: list[Level] = []
    names = list(args.models)
    with contextlib.closing(Client(args.client_processes)) as client:
        with running_server(env, timeout_s=args.start_timeout, workers=settings.workers) as base:
            info = {m["name"]: m for m in httpx.get(f"{base}/models", timeout=30).json()["models"]}
            for k, concurrency in enumerate(args.concurrency):
                # alternate the order per level, so neither model always runs first
                order = args.models if k % 2 == 0 else list(reversed(args.models))
                for model in order:
                    level = measure_level(
                        client, base, model, load, concurrency, args.seconds, args.warmup
                    )
                    levels.append(level)
                    print(f"  {model} c={concurrency}: {level.img_s:.1f} img/s", flush=True)
            for model in args.models if args.half_load else ():
                best = max(lv.img_s for lv in levels if lv.model == model)
                level = measure_level(
                    client,
                    base,
                    model,
                    load,
                    2 * max(args.concurrency),
                    args.half_load_seconds or args.seconds,
                    args.warmup,
                    offered_img_s=best / 2,
                )
                levels.append(level)
                print(f"  {model} open loop at {best / 2:.0f} img/s: p99 {level.p99_ms} ms")
        if args.litserve:  # after ours has stopped: nothing else on the device
            from app.bench.litserve_baseline import run_litserve  # litserve is optional

            names.append(run_litserve(args, settings, client, Load(load.images), levels))
    levels.sort(
        key=lambda lv: (names.index(lv.model), lv.offered_img_s is not None, lv.concurrency)
    )
    best = {m: max(lv.img_s for lv in levels if lv.model == m) for m in names}
    ratios = speedups({m: best[m] for m in args.models}, args.models[0])
    env_facts = environment(timing_device(args.device))
    result = {
        **env_facts,
        "batch": settings.max_batch_size,
        "dtype": info[args.models[0]].get("dtype"),
        "models": {
            m: {k: info[m].get(k) for k in ("architecture", "variant", "compression")}
            for m in args.models
        },
        "reference": args.models[0],
        "concurrency": list(args.concurrency),
        "seconds_per_level": args.seconds,
        "half_load_seconds": args.half_load_seconds or args.seconds,
        "images": len(load.images),
        "images_dir": str(args.images) if args.images else None,
        "images_per_request": args.images_per_request,
        "server": {k: v for k, v in env.items() if k != "VITSERVE_STORE_DIR"},
        "decode_ceiling_img_s": ceilings,
        "decode_ceiling_processes": decoding_processes(settings),
        "decode_stage_steps": stages,
        "best_img_s": best,
        "speedups": ratios,
        "speedup": next(iter(ratios.values()), None),
        "median_speedups": median_speedups(
            [lv for lv in levels if lv.model in args.models], args.models[0]
        ),
        "half_load": {
            lv.model: {"offered_img_s": lv.offered_img_s, "img_s": lv.img_s, "p99_ms": lv.p99_ms}
            for lv in levels
            if lv.offered_img_s
        },
        "levels": [asdict(lv) for lv in levels],
    }
    if args.litserve:
        litserve = names[-1]
        result["litserve"] = {
            "model": litserve,
            "workers_per_device": args.litserve_workers,
            "api_servers": args.litserve_api_servers,
            "decode_threads": args.litserve_decode_threads,
            "max_batch_size": args.litserve_max_batch_size or settings.max_batch_size,
            "batch_timeout_s": (args.litserve_timeout_ms or settings.max_delay_ms) / 1000,
            "images_per_request": 1,
            "ours_over_litserve": best[args.models[0]] / best[litserve] if best[litserve] else None,
        }
    return result


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
    p.add_argument("--queue-size", dest="queue_size", type=int, help="images a model queues")
    p.add_argument("--workers", type=int, help="server worker processes (default 1)")
    p.add_argument(
        "--engine", choices=["process", "inline"], help="where models run (server default: inline)"
    )
    p.add_argument(
        "--decode-threads", dest="decode_threads", type=int, help="an engine's decode threads"
    )
    p.add_argument(
        "--images-per-request",
        dest="images_per_request",
        type=int,
        default=1,
        help="images in each multipart request",
    )
    p.add_argument(
        "--gpu-decode",
        dest="gpu_decode",
        action=argparse.BooleanOptionalAction,
        help="nvjpeg on CUDA (server default: on)",
    )
    p.add_argument(
        "--replica-devices",
        dest="replica_devices",
        help='JSON list, one replica per device, e.g. \'["cuda:0","cuda:1"]\'',
    )
    p.add_argument(
        "--engines-per-device",
        dest="engines_per_device",
        type=int,
        help="engine processes per device (server default: 1)",
    )
    p.add_argument(
        "--litserve",
        action="store_true",
        help="also serve the reference model with LitServe (same client, images, batching)",
    )
    p.add_argument("--litserve-workers", dest="litserve_workers", type=int, default=1)
    p.add_argument("--litserve-api-servers", dest="litserve_api_servers", type=int, default=1)
    p.add_argument(
        "--litserve-decode-threads",
        dest="litserve_decode_threads",
        type=int,
        default=0,
        help="0: LitServe decodes each request in decode_request; N: in batch(), on N threads",
    )
    p.add_argument(
        "--litserve-max-batch-size",
        dest="litserve_max_batch_size",
        type=int,
        help="default: the server's --max-batch-size",
    )
    p.add_argument(
        "--litserve-timeout-ms",
        dest="litserve_timeout_ms",
        type=float,
        help="LitServe's batch timeout; default: the server's max delay",
    )
    p.add_argument(
        "--half-load",
        dest="half_load",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="finish with an open-loop level at half the best throughput (latency at half load)",
    )
    p.add_argument(
        "--half-load-seconds",
        dest="half_load_seconds",
        type=float,
        help="measured seconds of the half-load level (default: --seconds); its p99 rests "
        "on 1%% of its requests, so a longer level gives a steadier figure",
    )
    p.add_argument(
        "--client-processes",
        dest="client_processes",
        type=int,
        default=1,
        help="client processes sharing each concurrency level (one tops out ~2k req/s)",
    )
    p.add_argument("--ceiling-seconds", dest="ceiling_seconds", type=float, default=3.0)
    p.add_argument("--start-timeout", dest="start_timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=Path("bench/results/service"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.images_per_request < 1:
        raise SystemExit("--concurrency levels and --images-per-request must be >= 1")
    result = run(args)
    levels = [Level(**lv) for lv in result["levels"]]
    print(format_table(levels, result["decode_ceiling_img_s"]))
    print(format_steps(result["decode_stage_steps"]))
    if result["speedup"] is not None:
        print(f"speedup {result['speedups']} (best img/s over {result['reference']})")
        print(f"median speedup {result['median_speedups']} (per concurrency, over its repeats)")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = result["device_type"]
    path = args.out / f"service-{slug}-{stamp}.json"
    plots = {}
    for model in result["best_img_s"]:
        png = args.out / f"service-{slug}-{stamp}-{model.replace(':', '-')}.png"
        plot(levels, model, result["decode_ceiling_img_s"].get(model), png)
        plots[model] = png.name
    result["plots"] = plots
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path} and {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

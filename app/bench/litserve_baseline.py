"""LitServe serving one store model: the fair baseline for the service benchmark.

Our service's speed means little on its own; this serves the *same* weights with the same
timm eval transform and dtype policy (bfloat16 on CUDA, float32 on CPU) behind LitServe's
own dynamic batching, so a comparison on one machine, with one client and one image set,
measures the serving stack and nothing else.

Configuration, idiomatic for LitServe 0.2.x: batching set on the ``LitAPI``
(``max_batch_size``, ``batch_timeout``); one device with ``workers_per_device`` inference
processes, each with torch limited to its share of the cores (torch's default, every core
in every process, oversubscribes them); as many uvicorn API processes as inference workers
(LitServe's default);
ZeroMQ responses (``fast_queue``, which its docs advise above ~100 requests/s); uvicorn
access logs off, like ``running_server``'s servers. Each request's image is decoded in
``decode_request``, one after another in the inference worker (LitServe's default path), or
with ``decode_threads`` set, ``decode_request`` only reads the bytes and ``batch`` decodes the
whole batch on that many threads (Pillow and torch release the GIL while they work).
``POST /classify`` takes one image as the multipart field ``file`` and answers top-1 in our
JSON shape; ``GET /health`` is 200 once every worker has loaded and warmed up the model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO, Any

import httpx
import litserve as ls
import torch
from PIL import Image
from timm.data import create_transform

from app.bench.load_client import Client, Load
from app.bench.server import REPO, ServerURL, free_port
from app.bench.service_levels import Level, measure_level
from app.devices import resolve_dtype
from app.serving.labels import class_names
from app.store import ModelStore
from app.timing import timing_device


class DeiTClassifierAPI(ls.LitAPI):
    """Decode + transform per request, one forward per batch, top-1 per image.

    LitServe reads ``decode_request``'s ``request`` annotation and ``encode_response``'s
    return annotation as the endpoint's FastAPI types, so those two stay unannotated.
    """

    def __init__(
        self, store: Path, model: str, threads: int, decode_threads: int, **config: object
    ) -> None:
        super().__init__(api_path="/classify", **config)
        self.store, self.model_name, self.threads = Path(store), model, threads
        self.decode_threads = decode_threads

    def setup(self, device: str) -> None:
        # Each worker process decodes and transforms on the CPU with torch: left at torch's
        # default (every core per process) several workers oversubscribe the cores.
        torch.set_num_threads(self.threads)
        loaded = ModelStore(self.store).load(self.model_name)
        manifest = loaded.manifest
        self.device = device  # LitServe sets it only after setup; the warm-up needs it
        self.dtype = resolve_dtype("auto", torch.device(device))
        self.model = loaded.module.eval().to(device=device, dtype=self.dtype)
        self.transform = create_transform(**manifest.preprocessing.timm_data_config())
        self.labels = class_names(manifest.labels)
        if self.decode_threads:
            self.decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        # Warm up like our service (batch 1 and the largest batch) before /health says ok.
        for size in {1, self.max_batch_size}:
            self.predict(torch.randn(size, *manifest.preprocessing.input_size))

    def decode_request(self, request) -> torch.Tensor | bytes:
        # LitServe hands a multipart body over as Starlette FormData: "file" is an UploadFile.
        upload = request["file"].file
        return upload.read() if self.decode_threads else self.decode(upload)

    def decode(self, image: IO[bytes]) -> torch.Tensor:
        return self.transform(Image.open(image).convert("RGB"))

    def batch(self, inputs: list[torch.Tensor | bytes]) -> torch.Tensor:
        """The batch's images stacked; with ``decode_threads``, decoded here first, on them."""
        if self.decode_threads:
            inputs = list(self.decode_pool.map(lambda data: self.decode(io.BytesIO(data)), inputs))
        return torch.stack(inputs)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> list[tuple[int, float]] | tuple[int, float]:
        """[B,3,H,W] (LitServe's default ``batch`` stacks the tensors) → (index, score) each;
        at ``max_batch_size=1`` LitServe skips batching and passes one [3,H,W] image."""
        single = x.dim() == 3
        logits = self.model(x.reshape(-1, *x.shape[-3:]).to(self.device).to(self.dtype))
        scores, indices = logits.float().softmax(dim=-1).max(dim=-1)
        top1 = list(zip(indices.tolist(), scores.tolist(), strict=True))
        return top1[0] if single else top1

    def encode_response(self, output: tuple[int, float]):
        index, score = output
        prediction = {"index": index, "label": self.labels[index], "score": score}
        return {"results": [{"predictions": [prediction]}]}


@dataclass(frozen=True)
class Baseline:
    """What the LitServe baseline serves, and how: one object for the CLI, the server and
    the process that runs it."""

    store: Path
    model: str
    device: str = "cpu"
    max_batch_size: int = 64
    batch_timeout: float = 0.005  # seconds
    workers_per_device: int = 1
    api_servers: int = 1  # LitServe's HTTP processes, in front of its inference workers
    decode_threads: int = 0  # 0: decode_request decodes; N: batch() decodes on N threads

    def __post_init__(self) -> None:
        if self.decode_threads and self.max_batch_size < 2:
            # at batch 1 LitServe skips batch() and hands decode_request's bytes to predict
            raise ValueError("decode_threads needs max_batch_size >= 2 (batch() decodes)")

    def flags(self) -> list[str]:
        """The CLI flags that rebuild this object in ``main``."""
        return [
            f"--{name.replace('_', '-')}={getattr(self, name)!s}"
            for name in (f.name for f in fields(self))
        ]


def build_server(baseline: Baseline) -> ls.LitServer:
    """The configured server (batching on the LitAPI: LitServer's own arguments for it are
    deprecated since 0.2 and removed in 0.3)."""
    api = DeiTClassifierAPI(
        baseline.store,
        baseline.model,
        threads=max(1, (os.cpu_count() or 1) // baseline.workers_per_device),
        decode_threads=baseline.decode_threads,
        max_batch_size=baseline.max_batch_size,
        batch_timeout=baseline.batch_timeout,
    )
    return ls.LitServer(
        api,
        accelerator=baseline.device,
        devices=1,
        workers_per_device=baseline.workers_per_device,
        fast_queue=True,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="Model store folder.")
    parser.add_argument("--model", required=True, help="Store entry to serve.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="Seconds.")
    parser.add_argument("--workers-per-device", type=int, default=1)
    parser.add_argument("--api-servers", type=int, default=1)
    parser.add_argument("--decode-threads", type=int, default=0)
    parser.add_argument(
        "--log-level", default="warning", help="warning: no per-request access log."
    )
    args = vars(parser.parse_args(argv))
    server = build_server(Baseline(**{f.name: args[f.name] for f in fields(Baseline)}))
    # generate_client_file would write a client.py into the working directory.
    server.run(
        host=args["host"],
        port=args["port"],
        log_level=args["log_level"],
        num_api_servers=args["api_servers"],
        generate_client_file=False,
    )


@contextmanager
def running_litserve(baseline: Baseline, timeout_s: float = 300) -> Iterator[ServerURL]:
    """Yield the base URL once ``/health`` answers 200; stop the whole process group after:
    LitServe's manager, API and inference processes included (it stops only the ones it
    tracks, and only on Ctrl+C: SIGTERM to its main process orphans them all)."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "app.bench.litserve_baseline", "--port", str(port)),
        *baseline.flags(),
    ]
    # A file, not a pipe: nobody reads the output while it runs, and a full pipe would
    # block a logging process.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        base = ServerURL(f"http://127.0.0.1:{port}")
        base.proc = proc
        try:
            _wait_healthy(base, proc, log, timeout_s)
            yield base
        finally:
            _stop_group(proc)


def _wait_healthy(base: str, proc: subprocess.Popen, log: IO[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise RuntimeError(f"litserve exited {proc.returncode}: {output[-8000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"litserve did not become healthy in {timeout_s:.0f}s")
        time.sleep(0.2)


def _stop_group(proc: subprocess.Popen) -> None:
    """Ctrl+C to the group (LitServe's graceful path), then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


if __name__ == "__main__":
    main()


def run_litserve(
    args: argparse.Namespace, settings: Any, client: Client, load: Load, levels: list[Level]
) -> str:
    """``vitserve bench service --litserve``: the reference model behind LitServe at the
    same levels, driven by the same client; returns its row name."""
    name = f"litserve:{args.models[0]}"
    baseline = Baseline(
        args.store,
        args.models[0],
        device="cuda" if timing_device(args.device).type == "cuda" else "cpu",
        max_batch_size=args.litserve_max_batch_size or settings.max_batch_size,
        batch_timeout=(args.litserve_timeout_ms or settings.max_delay_ms) / 1000,
        workers_per_device=args.litserve_workers,
        api_servers=args.litserve_api_servers,
        decode_threads=args.litserve_decode_threads,
    )
    with running_litserve(baseline, timeout_s=args.start_timeout) as base:
        for concurrency in args.concurrency:
            level = measure_level(
                client,
                base,
                args.models[0],
                load,
                concurrency,
                args.seconds,
                args.warmup,
                baseline=True,
            )
            levels.append(replace(level, model=name))
            print(f"  {name} c={concurrency}: {level.img_s:.1f} img/s", flush=True)
    return name

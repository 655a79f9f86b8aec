"""Classify a labelled image folder through the HTTP API, per device, and compare.

``python -m app.bench.http_eval --images DIR --store DIR`` serves the store on CUDA (bf16)
and on CPU (fp32) in turn, sends every image over HTTP, and reports top-1 accuracy per
device and how often the two devices agree; the JSON lands in ``bench/results/fidelity/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from app.bench.server import running_server
from app.bench.tables import write_result
from app.environment import environment
from app.train.data import list_images, read_labels


def classify_folder(
    base: str, files: list[Path], *, model: str | None = None, per_request: int = 25
) -> dict[str, int]:
    """file name → top-1 class index, sending ``per_request`` images per multipart request."""
    top1: dict[str, int] = {}
    params = {"top_k": 1, **({"model": model} if model else {})}
    with httpx.Client(base_url=base, timeout=300) as http:
        for start in tqdm(range(0, len(files), per_request), desc="classify", unit="req"):
            chunk = files[start : start + per_request]
            parts = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in chunk]
            response = http.post("/classify", files=parts, params=params)
            response.raise_for_status()
            for result in response.json()["results"]:
                top1[result["filename"]] = result["predictions"][0]["index"]
    return top1


def accuracy(top1: dict[str, int], labels: dict[str, int]) -> float:
    return sum(top1[f] == labels[f] for f in top1) / len(top1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder with labels.csv")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fidelity"))
    args = parser.parse_args()
    labels = read_labels(args.images)
    files = list_images(args.images)
    devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    runs = {}
    for device in devices:
        env = {
            "VITSERVE_STORE_DIR": str(args.store),
            "VITSERVE_DEFAULT_MODEL": args.model,
            "VITSERVE_DEVICE": device,
            "VITSERVE_MODELS": json.dumps([args.model]),
        }
        with running_server(env) as base:
            started = time.perf_counter()
            top1 = classify_folder(base, files, model=args.model)
            seconds = time.perf_counter() - started
            info = next(m for m in httpx.get(f"{base}/models").json()["models"])
        runs[device] = {
            "dtype": info["dtype"],
            "top1_accuracy": accuracy(top1, labels),
            "images": len(top1),
            "seconds": seconds,
            "top1": top1,
        }
        print(f"{device:5s} {info['dtype']:9s} top-1 {runs[device]['top1_accuracy']:.1%}")
    result = {**environment(), "model": args.model, "images_dir": args.images.name, "runs": runs}
    if len(runs) == 2:
        a, b = (runs[d]["top1"] for d in devices)
        result["top1_agreement_cuda_vs_cpu"] = sum(a[f] == b[f] for f in a) / len(a)
        print(f"top-1 agreement cuda vs cpu: {result['top1_agreement_cuda_vs_cpu']:.1%}")
    write_result(args.out, f"http-eval-{'-'.join(devices)}", result)


if __name__ == "__main__":
    main()

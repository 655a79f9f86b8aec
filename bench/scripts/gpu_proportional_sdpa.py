"""Device step for issue #25: which form and SDPA backend take proportional attention fastest.

  1. SDPA alone on [64, 6, N, D] under cuDNN, PyTorch's flash and the memory-efficient
     kernel: 64-wide heads with no bias, the bias as an extra head column (72 wide, the GPU
     form until 2026-12-07) and the bias as a [B, 1, 1, N] additive mask (flash takes none);
  2. whole models at batch 64 from CUDA graphs, each copy captured under one backend (the
     choice is baked in at capture), dense and the prop-off schedule beside them.
Run on an H100 on 2026-12-07 (bench/results/kernels/proportional-sdpa-20261207-012058.json)
at commit 45c4bd5, where step 2 also timed the head form: the mask form won whole models,
and became the only one (app/vit/merge.py).
    source bench/scripts/device_site.sh; python3 bench/scripts/gpu_proportional_sdpa.py $OUT
(about 2 min on an H100; carry .whl for the wheels device_site.sh installs)
"""

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.bench.arch import build_arch_models
from app.environment import environment
from app.timing import prepare, time_interleaved

BATCH = 64
CONFIGS = tuple(
    os.environ.get("CONFIGS", "merge=47@0,47@4,47@8 merge=35@0,35@3,35@6,35@9 merge=13").split()
)
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def time_sdpa(q, k, v, backend, mask=None, calls=50, windows=5) -> float | None:
    """Median microseconds of one SDPA call under ``backend`` (None if it refuses)."""
    try:
        with sdpa_kernel(backend):
            for _ in range(10):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            start, end, times = torch.cuda.Event(True), torch.cuda.Event(True), []
            for _ in range(windows):
                start.record()
                for _ in range(calls):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / calls * 1000)
    except RuntimeError as exc:
        print(f"  {backend}: refused ({str(exc)[:80]})")
        return None
    return sorted(times)[windows // 2]


def main(out_dir: Path) -> None:
    device = torch.device("cuda")
    rows, refused = [], set()
    for n in (197, 150, 103, 56):
        qkv = [torch.randn(BATCH, 6, n, 72, device=device, dtype=torch.bfloat16) for _ in range(3)]
        mask = torch.randn(BATCH, 1, 1, n, device=device, dtype=torch.bfloat16)
        for width, form in ((64, "none"), (72, "head"), (64, "mask")):
            q, k, v = (t[..., :width].contiguous() for t in qkv)
            for name, backend in BACKENDS.items():
                us = time_sdpa(q, k, v, backend, mask if form == "mask" else None)
                print(f"sdpa N={n} width={width} bias={form} {name}: {us} us")
                if us is None:
                    refused.add((form, name))
                rows.append(
                    {
                        "kind": "sdpa",
                        "tokens": n,
                        "width": width,
                        "bias": form,
                        "backend": name,
                        "us": us,
                    }
                )
    x = torch.randn(BATCH, 3, 224, 224, device=device, dtype=torch.bfloat16)
    for arch in ("deit_small_patch16_224", "deit_tiny_patch16_224"):
        configs = [*CONFIGS, "merge=47@0,47@4,47@8;proportional=off"]
        built = build_arch_models(arch, configs)
        models = {
            "dense": prepare(
                built.dense, device=device, dtype="bfloat16", compiled=False, cuda_graphs=True
            )
        }
        models["dense"](x)
        for config in configs:
            variants = {"default": None}
            if "proportional=off" not in config:
                variants |= {b: BACKENDS[b] for b in BACKENDS if ("mask", b) not in refused}
            for name, backend in variants.items():
                model = prepare(
                    copy.deepcopy(built.compressed[config]),
                    device=device,
                    dtype="bfloat16",
                    compiled=False,
                    cuda_graphs=True,
                )
                try:
                    if backend is None:
                        model(x)  # captured here, with the default choice
                    else:
                        with sdpa_kernel(backend):  # no fallback: the label holds
                            model(x)
                except RuntimeError as exc:  # the plain blocks refused by this backend
                    print(f"{arch} {config} [{name}]: capture failed ({str(exc)[:80]})")
                    continue
                models[f"{config} [{name}]"] = model
        timings = time_interleaved(
            models, batch_size=BATCH, device=device, dtype="bfloat16", warmup=5, repeats=20
        )
        dense_ms = timings["dense"].median_ms
        for name, timing in timings.items():
            ms = getattr(timing, "median_ms", None)
            speedup = dense_ms / ms if ms else None
            print(f"{arch} b{BATCH} graphs {name}: {ms} ms, {speedup}x")
            rows.append(
                {
                    "kind": "model",
                    "arch": arch,
                    "batch": BATCH,
                    "mode": "graphs",
                    "name": name,
                    "median_ms": ms,
                    "speedup": speedup,
                }
            )
    result = {**environment(device), "dtype": "bfloat16", "batch": BATCH, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"proportional-sdpa-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/kernels"))

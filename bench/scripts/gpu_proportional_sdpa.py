"""Device step for issue #25, prepared 2026-12-07 and not yet run (the session's device time
ran out): which SDPA backend takes proportional attention's padded heads fastest.

Proportional attention carries log(size) in an extra head column, so DeiT's 64-wide heads
become 72 wide; on an H100 cuDNN then runs its 128-wide flash kernel, and merge-3x47 served
at batch 64 loses ~13% of its speed to it (1.21x dense with it, 1.38x without;
bench/results/models/models-nvidia-h100-80gb-hbm3-20261206-234356.json). This times
  1. SDPA alone on [64, 6, N, 72] under cuDNN, PyTorch's flash (96-wide for 72, if it
     rounds up in 32s as FlashAttention-2 does) and the memory-efficient kernel, beside
     64-wide heads with no bias and 64-wide heads with the bias as a [B, 1, 1, N] additive
     mask (cuDNN and the memory-efficient kernel take one; flash does not);
  2. whole models at batch 64 from CUDA graphs, each copy captured under one form (head or
     mask) and one backend (the choice is baked in at capture), dense and the prop-off
     schedule beside them.
    source bench/scripts/device_site.sh; python3 bench/scripts/gpu_proportional_sdpa.py $OUT
(about 2 min on an H100; carry .whl for the wheels device_site.sh installs)
"""

import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import app.vit.merge as merge
from app.bench.arch import build_arch_models
from app.timing import environment, prepare, time_interleaved

BATCH = 64
CONFIGS = tuple(
    os.environ.get("CONFIGS", "merge=47@0,47@4,47@8 merge=35@0,35@3,35@6,35@9 merge=13").split()
)
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


@contextlib.contextmanager
def bias_form(form: str):
    """Proportional attention on the GPU in ``form``: "head" (the bias as an extra head
    column, the default) or "mask" (an additive [B, 1, 1, N] mask, the CPU's form)."""
    saved = merge.bias_in_qkv, merge.head_bias_attention
    if form == "mask":
        merge.bias_in_qkv = lambda device: False
        merge.head_bias_attention = merge.mask_bias_attention
    try:
        yield
    finally:
        merge.bias_in_qkv, merge.head_bias_attention = saved


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
            variants = [("default", "head", None)]
            if "proportional=off" not in config:
                variants += [(f"head {b}", "head", BACKENDS[b]) for b in BACKENDS]
                variants += [("mask", "mask", None)]
                variants += [(f"mask {b}", "mask", BACKENDS[b]) for b in BACKENDS]
                variants = [v for v in variants if (v[1], v[0].split()[-1]) not in refused]
            for name, form, backend in variants:
                model = prepare(
                    copy.deepcopy(built.compressed[config]),
                    device=device,
                    dtype="bfloat16",
                    compiled=False,
                    cuda_graphs=True,
                )
                try:
                    with bias_form(form):
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

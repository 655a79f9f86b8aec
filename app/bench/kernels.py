"""Where a forward's GPU time goes, kernel by kernel: the question a speed ratio raises.

``vitserve bench models`` says *how much* faster a config is; this says *why not more*.
Each model (dense first) is prepared as the sweep prepares it (eager or compiled), warmed
up, and profiled for a few forwards with ``torch.profiler``; the device time of every kernel
is summed per forward and grouped into categories (matrix products, attention, the token
mixing kernel, fused elementwise/normalisation kernels, the rest). The table lists each
model's GPU time per forward, its categories and its costliest kernels; a JSON keeps all.

GPU time, not wall time: launches and host work are left out on purpose (the server replays
CUDA graphs, where a forward costs exactly its kernels).
"""

from __future__ import annotations

import argparse
import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from app.bench.arch import DENSE, build_arch_models, fmt, release
from app.bench.models import mode_name, resolve_configs
from app.bench.tables import write_result
from app.environment import device_slug, environment
from app.timing import prepare, random_inputs

# First match wins; names are lower-cased. cuBLAS/CUTLASS GEMMs, SDPA back-ends, ours.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("token_mix", ("token_mix",)),
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "sm90", "sm100", "matmul", "mm_")),
    ("fused (triton)", ("triton",)),
)
OTHER = "other"
TOP_KERNELS = 8


def categorise(kernel: str) -> str:
    name = kernel.lower()
    for category, needles in CATEGORIES:
        if any(needle in name for needle in needles):
            return category
    return OTHER


def kernel_times(model: nn.Module, inputs: Sequence[torch.Tensor], forwards: int) -> dict[str, Any]:
    """GPU microseconds per forward, per kernel name, over ``forwards`` profiled calls."""
    with torch.inference_mode():
        for x in inputs:  # warm-up: compilation, autotuning, caches
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(forwards):
                model(inputs[i % len(inputs)])
            torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            entry = per_kernel[event.name]
            entry[0] += event.time_range.elapsed_us()
            entry[1] += 1
    kernels = sorted(
        (
            {
                "kernel": name,
                "category": categorise(name),
                "us_per_forward": us / forwards,
                "calls_per_forward": calls / forwards,
            }
            for name, (us, calls) in per_kernel.items()
        ),
        key=lambda k: -k["us_per_forward"],
    )
    by_category: dict[str, float] = defaultdict(float)
    for k in kernels:
        by_category[k["category"]] += k["us_per_forward"]
    return {
        "gpu_ms_per_forward": sum(k["us_per_forward"] for k in kernels) / 1e3,
        "categories_ms": {c: us / 1e3 for c, us in sorted(by_category.items())},
        "kernels": kernels,
    }


def profile_models(
    models: Mapping[str, nn.Module],
    *,
    input_shape: Sequence[int],
    device: torch.device,
    dtype: str,
    batch: int,
    compiled: bool,
    forwards: int,
) -> dict[str, dict[str, Any]]:
    """Profile each model in turn (one device copy at a time); failures become errors."""
    inputs = random_inputs(batch, input_shape, device=device, dtype=dtype)
    results: dict[str, dict[str, Any]] = {}
    for name, master in models.items():
        try:
            model = prepare(copy.deepcopy(master), device=device, dtype=dtype, compiled=compiled)
            results[name] = kernel_times(model, inputs, forwards)
        except Exception as exc:  # one failing config must not hide the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            release(device, compiled)
    return results


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Per model: GPU ms per forward, ratio to dense, the categories, the top kernels."""
    dense_ms = results.get(DENSE, {}).get("gpu_ms_per_forward")
    categories = [c for c, _ in CATEGORIES] + [OTHER]
    head = f"{'model':34s} {'GPU ms':>7s} {'ratio':>6s} " + " ".join(
        f"{c:>15s}" for c in categories
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:34s} error: {r['error'][:100]}")
            continue
        ms = r["gpu_ms_per_forward"]
        ratio = dense_ms / ms if dense_ms else None
        cats = " ".join(f"{fmt(r['categories_ms'].get(c), '.3f'):>15s}" for c in categories)
        lines.append(f"{name[:34]:34s} {ms:7.3f} {fmt(ratio, '.2f'):>6s} {cats}")
    for name, r in results.items():
        if "error" in r:
            continue
        lines.append(f"\n{name}: costliest kernels (us per forward, calls)")
        for k in r["kernels"][:TOP_KERNELS]:
            lines.append(
                f"  {k['us_per_forward']:8.1f} {k['calls_per_forward']:5.0f}  "
                f"{k['category']:15s} {k['kernel'][:90]}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench.kernels",
        description="GPU time per forward by kernel and category, dense vs compressed.",
    )
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument("--configs", nargs="+", required=True, help="presets or config texts")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="torch.compile (default mode), as served with VITSERVE_COMPILE=1",
    )
    parser.add_argument("--forwards", type=int, default=10, help="profiled forwards per model")
    parser.add_argument("--out-dir", default="bench/results/kernels")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: it profiles GPU kernels")
    device = torch.device("cuda")
    names = resolve_configs(args.configs)
    arch_models = build_arch_models(args.arch, names)
    models = {names.get(text, text): m for text, m in arch_models.all().items()}
    results = profile_models(
        models,
        input_shape=arch_models.input_shape,
        device=device,
        dtype=args.dtype,
        batch=args.batch,
        compiled=args.compiled,
        forwards=args.forwards,
    )
    print(format_table(results))
    mode = mode_name(args.compiled, cuda_graphs=False)
    report = {
        **environment(device),
        "arch": args.arch,
        "dtype": args.dtype,
        "batch": args.batch,
        "compiled": args.compiled,
        "configs": {names[t]: t for t in names},
        "results": results,
    }
    write_result(Path(args.out_dir), f"kernels-{device_slug(device)}-{mode}", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

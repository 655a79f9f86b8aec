"""Sweep: dense vs compressed DeiT throughput, every config timed in the same run.

A speedup is only meaningful when both sides share the machine state, so for each
(arch, dtype, batch, compiled) the dense model and every compressed config are timed
interleaved in one loop (see :mod:`app.timing`) and each ratio comes from that loop.
Weights are random: speed does not depend on their values, only on their not being the
zeros/constants of a fresh init (see :func:`randomize_compressed_layers`).

The per-layer section (:mod:`app.bench.layers`) explains a whole-model speedup: one dense
block vs the same block with static attention, the aggregation cost of each token stage,
dense blocks at each reduced token count, and from those a per-config prediction along
``tokens_per_block``.

Rows run eager first (cheap, most wanted) and the JSON is rewritten after every group, so
a run cut short by a time limit still leaves every finished row on disk.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from tqdm import tqdm

from app.bench.arch import (
    DENSE,
    ArchModels,
    build_arch_models,
    fmt,
    release,
)
from app.bench.layers import format_per_layer, per_layer_bench
from app.environment import device_slug, environment
from app.timing import (
    COMPILE_MODES,
    Failure,
    Timing,
    default_counts,
    dtype_name,
    prepare,
    time_interleaved,
    timing_device,
)
from app.vit.builder import PRESETS, resolve_config
from app.vit.merge import matching_kernels

WEIGHTS_LABEL = "random (speed only)"
DEFAULT_ARCHS = ("deit_small_patch16_224",)
CPU_THREADS = 2


@dataclass(frozen=True)
class DeviceDefaults:
    """What a sweep runs when the caller does not say: the GPU serving grid, or a CPU
    grid small enough to finish in minutes (CPU compile is slow and rarely served)."""

    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    compiled: tuple[bool, ...]
    threads: int | None

    @classmethod
    def for_device(cls, device: torch.device) -> DeviceDefaults:
        if device.type == "cuda":
            return cls(("bfloat16", "float32"), (1, 32, 256), (False, True), None)
        return cls(("float32",), (1, 16), (False,), CPU_THREADS)


def resolve_configs(configs: Iterable[str]) -> dict[str, str]:
    """``{canonical config text: display name}``; preset names are kept as names, the
    dense config is dropped (dense is always the baseline), duplicates are merged."""
    out: dict[str, str] = {}
    for item in configs:
        text = str(resolve_config(item))
        if text != DENSE:
            out.setdefault(text, item if item in PRESETS else text)
    return out


def _timing_rows(
    results: Mapping[str, Timing | Failure], names: Mapping[str, str], **fields: Any
) -> list[dict[str, Any]]:
    """One row per model (``fields``: arch, dtype, batch, compiled, compile_mode);
    ``speedup`` is against the dense model of the same interleaved loop."""
    dense = results[DENSE]
    rows = []
    for text, result in results.items():
        row = {"config": text, "name": names.get(text, text), **fields}
        if isinstance(result, Timing):
            speedup = result.img_s / dense.img_s if isinstance(dense, Timing) else None
            row |= {
                "img_s": result.img_s,
                "median_ms": result.median_ms,
                "p10_ms": result.p10_ms,
                "p90_ms": result.p90_ms,
                "speedup": speedup,
                "error": None if speedup is not None else "dense baseline failed",
            }
        else:
            row |= dict.fromkeys(("img_s", "median_ms", "p10_ms", "p90_ms", "speedup"))
            row["error"] = result.error
        rows.append(row)
    return rows


@contextmanager
def _threads(count: int | None):
    """Set torch's intra-op threads for the sweep and restore them after."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_json(path: Path, report: Mapping[str, Any]) -> None:
    """Write through a temporary file so a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def mode_name(compiled: bool, cuda_graphs: bool) -> str:
    """eager, graphs (eager replayed from CUDA graphs), compiled, or compiled+graphs."""
    if compiled:
        return "compiled+graphs" if cuda_graphs else "compiled"
    return "graphs" if cuda_graphs else "eager"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain fixed-width table of sweep rows (no dependency for one printout)."""
    arch_w = max([4, *(len(r["arch"]) for r in rows)])
    name_w = max([6, *(len(r["name"]) for r in rows)])
    head = (
        f"{'arch':<{arch_w}} {'config':<{name_w}} {'dtype':<8} {'batch':>5} {'mode':>15} "
        f"{'img/s':>9} {'ms':>8} {'speedup':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['arch']:<{arch_w}} {r['name']:<{name_w}} {r['dtype']:<8} {r['batch']:>5} "
            f"{mode_name(r['compiled'], r.get('cuda_graphs', False)):>15} "
            f"{fmt(r['img_s'], '.1f'):>9} "
            f"{fmt(r['median_ms'], '.3f'):>8} {fmt(r['speedup'], '.3f'):>7}"
            + (f"  ERROR {r['error'][:80]}" if r["error"] else "")
        )
    return "\n".join(lines)


def _sweep_group(
    models: ArchModels,
    names: Mapping[str, str],
    *,
    device: torch.device,
    dtype: str,
    batches: Sequence[int],
    compiled: bool,
    compile_mode: str,
    warmup: int,
    repeats: int,
    cuda_graphs: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """Rows of one (arch, dtype, compiled) group, one list per batch size.

    Device copies are prepared once and reused across batch sizes, so a compiled model
    only recompiles for the new shape instead of being traced afresh.
    """
    prepared = {
        text: prepare(
            copy.deepcopy(m),
            device=device,
            dtype=dtype,
            compiled=compiled,
            compile_mode=compile_mode,
            cuda_graphs=cuda_graphs,
        )
        for text, m in models.all().items()
    }
    try:
        for batch in batches:
            results = time_interleaved(
                prepared,
                batch_size=batch,
                device=device,
                dtype=dtype,
                warmup=warmup,
                repeats=repeats,
                input_shape=models.input_shape,
            )
            yield _timing_rows(
                results,
                names,
                arch=models.arch,
                dtype=dtype,
                batch=batch,
                compiled=compiled,
                compile_mode=compile_mode if compiled else None,
                cuda_graphs=cuda_graphs,
            )
    finally:
        prepared.clear()
        release(device, compiled)


def _plan(
    compiled: bool,
    dtypes: Sequence[str],
    batches: Sequence[int],
    compiled_dtypes: Sequence[str] | None,
    compiled_batches: Sequence[int] | None,
) -> list[tuple[str, list[int]]]:
    """(dtype, batches) pairs of one pass; the compiled pass may be restricted."""
    keep_dtypes = {
        dtype_name(d) for d in (compiled_dtypes if compiled and compiled_dtypes else dtypes)
    }
    keep_batches = set(compiled_batches if compiled and compiled_batches else batches)
    pairs = [(d, [b for b in batches if b in keep_batches]) for d in dtypes if d in keep_dtypes]
    return [(d, bs) for d, bs in pairs if bs]


def run_models_bench(
    configs: Sequence[str],
    *,
    archs: Sequence[str] = DEFAULT_ARCHS,
    dtypes: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    compiled: Sequence[bool] | None = None,
    device: str | torch.device = "auto",
    per_layer: bool = True,
    out_dir: Path = Path("bench/results/models"),
    repeats: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    compile_mode: str = "default",
    compiled_batches: Sequence[int] | None = None,
    compiled_dtypes: Sequence[str] | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Time dense and every config for each arch and (dtype, batch, compiled); write JSON.

    ``None`` picks the device's defaults (:class:`DeviceDefaults`; CPU: fp32, batches 1
    and 16, eager only, 2 threads, fewer repeats). ``compiled_batches`` / ``compiled_dtypes``
    restrict the compiled rows (compile time dominates a GPU sweep). ``arch_kwargs`` go to
    ``timm.create_model`` (e.g. a tiny ``img_size``/``depth`` for tests). The per-layer
    section runs in the eager pass, at the largest batch, for each (arch, dtype).
    ``cuda_graphs`` (CUDA only) adds, for each of eager and compiled, a pass of the same
    models replayed from CUDA graphs, as the server runs them: a forward then costs its GPU
    time, not its kernel launches or the host's work at graph breaks.

    Returns the report as written to ``out_dir/models-<device>-<YYYYMMDD-HHMMSS>.json``,
    plus ``"path"``, the file written.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, not {compile_mode!r}")
    dev = timing_device(device)
    defaults = DeviceDefaults.for_device(dev)
    dtypes = [dtype_name(d) for d in (dtypes or defaults.dtypes)]
    batches = list(batches or defaults.batches)
    if cuda_graphs and dev.type != "cuda":
        raise ValueError("CUDA graph rows need a CUDA device")
    # (compiled, cuda_graphs): eager, graphs, compiled, compiled+graphs
    passes = [
        (c, g)
        for c in sorted(set(defaults.compiled if compiled is None else compiled))
        for g in ((False, True) if cuda_graphs else (False,))
    ]
    default_warmup, default_repeats = default_counts(dev)
    warmup = default_warmup if warmup is None else warmup
    repeats = default_repeats if repeats is None else repeats
    names = resolve_configs(configs)
    plans = {c: _plan(c, dtypes, batches, compiled_dtypes, compiled_batches) for c, _ in passes}
    total_rows = (
        (1 + len(names)) * len(archs) * sum(len(bs) for c, _ in passes for _, bs in plans[c])
    )

    with _threads(threads or defaults.threads):
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(out_dir) / f"models-{device_slug(dev)}-{stamp}.json"
        report: dict[str, Any] = {
            **environment(dev),
            "weights": WEIGHTS_LABEL,
            "method": {
                "timer": "CUDA events per call" if dev.type == "cuda" else "time.perf_counter",
                "warmup": warmup,
                "repeats": repeats,
                "statistic": "median (p10, p90) per call",
                "inputs": "3 random normal sets, rotated per round",
                "precision": "model.to(dtype) and inputs in dtype, no autocast",
                "interleaved": "dense and every config round-robin in one loop per row group",
                "compile": {"mode": compile_mode, "dynamic": False},
                "merge_matching": matching_kernels(dev),
                "cuda_graphs": "rows with cuda_graphs: the eager or compiled model replayed from "
                "one CUDA graph per batch size, captured in warm-up (the server's predict stage)",
            },
            "archs": list(archs),
            "configs": dict(names),
            "rows": [],
            "per_layer": [],
            "complete": False,
        }
        masters: dict[str, ArchModels] = {}
        bar = tqdm(total=total_rows, desc="bench rows", unit="row", disable=not progress)
        for is_compiled, graphs in passes:
            for arch in archs:
                if arch not in masters:
                    masters[arch] = build_arch_models(arch, names, arch_kwargs)
                for dtype, dtype_batches in plans[is_compiled]:
                    bar.set_postfix_str(f"{arch} {dtype} {mode_name(is_compiled, graphs)}")
                    for rows in _sweep_group(
                        masters[arch],
                        names,
                        device=dev,
                        dtype=dtype,
                        batches=dtype_batches,
                        compiled=is_compiled,
                        compile_mode=compile_mode,
                        warmup=warmup,
                        repeats=repeats,
                        cuda_graphs=graphs,
                    ):
                        report["rows"].extend(rows)
                        bar.update(len(rows))
                        _write_json(path, report)
                    if per_layer and not is_compiled and not graphs:
                        section = per_layer_bench(
                            masters[arch],
                            names,
                            device=dev,
                            dtype=dtype,
                            batch=max(dtype_batches),
                            warmup=warmup,
                            repeats=repeats,
                        )
                        report["per_layer"].append(section)
                        _write_json(path, report)
        bar.close()
        report["complete"] = True
        _write_json(path, report)
    if report["per_layer"]:
        print(format_per_layer(report["per_layer"], report["rows"]))
    print(format_table(report["rows"]))  # last: the end of a captured log is what survives
    print(f"wrote {path}")
    return {**report, "path": str(path)}


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench.models",
        description="Time dense vs compressed DeiT (random weights) in the same run.",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[name for name in PRESETS if name != DENSE],
        help="preset names or config text (default: every compressed preset)",
    )
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--dtypes", nargs="+", help="default: bfloat16 float32 (CPU: float32)")
    parser.add_argument("--batches", nargs="+", type=int, help="default: 1 32 256 (CPU: 1 16)")
    parser.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        help="eager rows, compiled rows or both (default: both on CUDA, off on CPU)",
    )
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="add rows of the eager (and compiled) models replayed from CUDA graphs, as served",
    )
    parser.add_argument("--compiled-batches", nargs="+", type=int, help="batches compiled rows use")
    parser.add_argument("--compiled-dtypes", nargs="+", help="dtypes compiled rows use")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default on CPU: 2)")
    parser.add_argument("--repeats", type=int, help="timed calls per model (CUDA 50, CPU 10)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (CUDA 10, CPU 3)")
    parser.add_argument("--no-per-layer", action="store_true", help="skip the per-layer section")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/models"))
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    compiled = {None: None, "off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    run_models_bench(
        args.configs,
        archs=args.archs,
        dtypes=args.dtypes,
        batches=args.batches,
        compiled=compiled,
        device=args.device,
        per_layer=not args.no_per_layer,
        out_dir=args.out_dir,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        compile_mode=args.compile_mode,
        compiled_batches=args.compiled_batches,
        compiled_dtypes=args.compiled_dtypes,
        progress=not args.no_progress,
        cuda_graphs=args.cuda_graphs,
    )


if __name__ == "__main__":
    main()

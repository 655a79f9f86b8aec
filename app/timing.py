"""Timing forward passes the same way on CPU and CUDA.

Why it is built this way:

* CUDA work is asynchronous, so each timed call is bracketed by CUDA events (a host clock
  would measure the launch, not the work); on CPU ``time.perf_counter`` is exact enough.
* Warm-up calls keep module loading, cuBLAS handle creation and torch.compile out of the
  numbers; the median (with p10/p90 for spread) of many repeats resists the odd slow call.
* Inputs are random (zeros can run faster than real data) and rotate among several sets,
  so a small batch is not measured straight out of the L2 cache.
* Precision is ``model.to(dtype)`` with inputs in the same dtype, never autocast: bf16
  weights and inputs is the serving path, and autocast would time casts the server never
  performs.
* Ratios come from models timed interleaved in one loop (A, B, A, B, ...), so clock and
  thermal drift during the run hits every model alike.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from app.devices import resolve_device, resolve_dtype
from app.environment import device_name
from app.serving.cuda_graphs import GraphedForward

# "reduce-overhead" and "max-autotune" replay CUDA graphs: small-token blocks of a
# compressed model are launch-bound otherwise, so graphs are how it is served at speed.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
GRAPH_CAPTURING_MODES = ("reduce-overhead", "max-autotune")
INPUT_SETS = 3
IMAGE_SHAPE = (3, 224, 224)
# Enough cache entries for every (batch size x model) a sweep compiles, see _strict_dynamo.
RECOMPILE_LIMIT = 64
ERROR_CHARS = 400


class BenchError(RuntimeError):
    """A model could not be timed (compile failure, out of memory, ...)."""


@dataclass(frozen=True)
class Timing:
    """Per-call latency statistics of one model at one batch size."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    img_s: float

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], batch_size: int) -> Timing:
        p10, median, p90 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [10, 50, 90])
        return cls(float(median), float(p10), float(p90), batch_size * 1e3 / float(median))


@dataclass(frozen=True)
class Failure:
    """Why a model has no timing; sweeps report it as a row instead of crashing."""

    error: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> Failure:
        text = f"{type(exc).__name__}: {exc}".strip()
        return cls(text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + " ...")


def timing_device(device: str | torch.device = "auto") -> torch.device:
    """Only CPU and CUDA have a trustworthy timer here."""
    resolved = resolve_device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"cannot time on {resolved.type!r}: use cpu or cuda")
    return resolved


def dtype_name(dtype: str | torch.dtype) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def default_counts(device: torch.device) -> tuple[int, int]:
    """(warm-up, repeats): CPU calls are slow and steady, so fewer of them suffice."""
    return (10, 50) if device.type == "cuda" else (3, 10)


def prepare(
    model: nn.Module,
    *,
    device: torch.device,
    dtype: str | torch.dtype,
    compiled: bool,
    compile_mode: str = "default",
    cuda_graphs: bool = False,
) -> nn.Module:
    """Cast and move ``model`` in place (as ``nn.Module.to`` does), optionally compile it,
    and optionally (CUDA only) replay it from CUDA graphs as the server does.

    Compilation is lazy: a compile error surfaces at the first call, which the timing loop
    catches. ``dynamic=False`` keeps one specialised graph per batch size, the kernels a
    server with fixed batch sizes would run. A compiled model replayed from CUDA graphs is
    what the server runs with ``VITSERVE_COMPILE=1``: Inductor's kernels, and no host work
    between them (graph breaks included); modes that capture graphs themselves are refused.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, not {compile_mode!r}")
    if cuda_graphs and device.type != "cuda":
        raise ValueError("CUDA graph rows need a CUDA device")
    if cuda_graphs and compiled and compile_mode in GRAPH_CAPTURING_MODES:
        raise ValueError(f"compile mode {compile_mode!r} captures CUDA graphs itself")
    model = model.to(device=device, dtype=resolve_dtype(dtype)).eval()
    if compiled:
        mode = None if compile_mode == "default" else compile_mode
        model = torch.compile(model, mode=mode, dynamic=False)
    return GraphReplay(model) if cuda_graphs else model


class GraphReplay(nn.Module):
    """``model`` replayed from one CUDA graph per batch size, captured at its first call
    (a warm-up round): the server's predict stage, where a forward costs no launches."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._graphs: dict[int, GraphedForward] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        graphed = self._graphs.get(x.shape[0])
        if graphed is None:
            graphed = self._graphs[x.shape[0]] = GraphedForward(
                self.model,
                device=x.device,
                dtype=x.dtype,
                input_size=tuple(x.shape[1:]),
                buckets=(x.shape[0],),
            )
        return graphed(x)


def random_inputs(
    batch_size: int,
    input_shape: Sequence[int],
    *,
    device: torch.device,
    dtype: str | torch.dtype,
    sets: int = INPUT_SETS,
    seed: int = 0,
) -> list[torch.Tensor]:
    """``sets`` different standard-normal batches (normalised images look like this)."""
    if sets < INPUT_SETS:
        raise ValueError(f"rotate among at least {INPUT_SETS} input sets, not {sets}")
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch_size, *input_shape)
    return [
        torch.randn(shape, generator=gen, device=device, dtype=resolve_dtype(dtype))
        for _ in range(sets)
    ]


@contextlib.contextmanager
def _strict_dynamo() -> Iterator[None]:
    """Make a compiled model that hits Dynamo's recompile limit fail instead of silently
    running eager, and raise the limit so that a sweep's batch sizes and sibling models
    (which share ``forward`` code objects) all fit: a "compiled" number must be compiled.
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    # Older torch spells them cache_size_limit / fail_on_cache_limit_hit (2.6), or lacks
    # the fail switch (< 2.6): there the raised limit is the only guard.
    limit_key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    changes: dict[str, Any] = {limit_key: max(getattr(cfg, limit_key), RECOMPILE_LIMIT)}
    for fail_key in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, fail_key):
            changes[fail_key] = True
            break
    with cfg.patch(changes):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Milliseconds of one forward; on CUDA the device time between two events."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(
    models: Mapping[str, nn.Module],
    *,
    batch_size: int,
    device: torch.device,
    dtype: str | torch.dtype,
    warmup: int,
    repeats: int,
    input_shape: Sequence[int] = IMAGE_SHAPE,
) -> dict[str, Timing | Failure]:
    """Time already prepared models round-robin on the same rotating inputs.

    Each model first gets one call on its own (compilation happens there, and a model that
    fails is dropped with its error), then ``warmup`` interleaved rounds, then ``repeats``
    timed rounds. Round ``r`` feeds input set ``r mod sets`` to every model.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    inputs = random_inputs(batch_size, input_shape, device=device, dtype=dtype)
    results: dict[str, Timing | Failure] = {}
    samples: dict[str, list[float]] = {name: [] for name in models}

    def call(name: str, r: int, timed: bool) -> None:
        if name in results:
            return
        try:
            x = inputs[r % len(inputs)]
            if timed:
                samples[name].append(_timed_call(models[name], x, device))
            else:
                models[name](x)
                _sync(device)
        except Exception as exc:  # a failing model becomes an error row, not a crash
            results[name] = Failure.from_exception(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    with _strict_dynamo(), torch.inference_mode():
        for name in models:
            call(name, 0, timed=False)
        for r in range(warmup):
            for name in models:
                call(name, r, timed=False)
        for r in range(repeats):
            for name in models:
                call(name, r, timed=True)
    return {
        name: results[name] if name in results else Timing.from_samples(samples[name], batch_size)
        for name in models
    }


def time_forward(
    model: nn.Module,
    *,
    batch_size: int,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    compiled: bool = False,
    warmup: int | None = None,
    repeats: int | None = None,
    input_shape: Sequence[int] = IMAGE_SHAPE,
    compile_mode: str = "default",
) -> Timing:
    """Latency and throughput of one model; raises :class:`BenchError` if it cannot run."""
    dev = timing_device(device)
    default_warmup, default_repeats = default_counts(dev)
    prepared = prepare(model, device=dev, dtype=dtype, compiled=compiled, compile_mode=compile_mode)
    result = time_interleaved(
        {"model": prepared},
        batch_size=batch_size,
        device=dev,
        dtype=dtype,
        warmup=default_warmup if warmup is None else warmup,
        repeats=default_repeats if repeats is None else repeats,
        input_shape=input_shape,
    )["model"]
    if isinstance(result, Failure):
        raise BenchError(result.error)
    return result


def throughput_ratio(
    dense: nn.Module,
    compressed: nn.Module,
    *,
    batch_size: int,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    compiled: bool = False,
    warmup: int | None = None,
    repeats: int | None = None,
    input_shape: Sequence[int] = IMAGE_SHAPE,
    compile_mode: str = "default",
) -> dict[str, Any]:
    """Speedup of ``compressed`` over ``dense``, both timed interleaved in this one run.

    Never raises for a model that fails to compile or run: ``speedup`` is then None and
    ``error`` says why. Both models are cast and moved in place.
    """
    dev = timing_device(device)
    default_warmup, default_repeats = default_counts(dev)
    models = {
        name: prepare(m, device=dev, dtype=dtype, compiled=compiled, compile_mode=compile_mode)
        for name, m in (("dense", dense), ("compressed", compressed))
    }
    results = time_interleaved(
        models,
        batch_size=batch_size,
        device=dev,
        dtype=dtype,
        warmup=default_warmup if warmup is None else warmup,
        repeats=default_repeats if repeats is None else repeats,
        input_shape=input_shape,
    )
    d, c = results["dense"], results["compressed"]
    ok = isinstance(d, Timing) and isinstance(c, Timing)
    errors = [f"{n}: {r.error}" for n, r in results.items() if isinstance(r, Failure)]
    return {
        "speedup": c.img_s / d.img_s if ok else None,
        "dense_img_s": d.img_s if isinstance(d, Timing) else None,
        "compressed_img_s": c.img_s if isinstance(c, Timing) else None,
        "dense_median_ms": d.median_ms if isinstance(d, Timing) else None,
        "compressed_median_ms": c.median_ms if isinstance(c, Timing) else None,
        "batch_size": batch_size,
        "dtype": dtype_name(dtype),
        "compiled": compiled,
        "compile_mode": compile_mode if compiled else None,
        "device": device_name(dev),
        "error": "; ".join(errors) or None,
    }

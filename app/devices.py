"""Device and dtype names used by the service, the benchmarks and distillation alike."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a
    silent fallback, so a GPU deployment never quietly runs on the CPU."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere (CPU bf16 matmuls are slow)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (use one of {sorted(DTYPES)})") from None

"""What a result records about where it was measured: the device's name, the software's
versions, the cores it could use, the commit of the code, so a reader can judge a figure or
reproduce it."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import timm
import torch

from app.devices import resolve_device


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def device_slug(device: torch.device) -> str:
    """File-name friendly device label, e.g. ``nvidia-h200`` or ``cpu-intel-r-xeon-...``."""
    name = device_name(device).lower()
    if device.type == "cpu":
        name = "cpu-" + name
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:48]


CODE_ROOT = Path(__file__).resolve().parents[1]


def code_version(root: Path = CODE_ROOT) -> str | None:
    """The commit of the code being measured, ``+changes`` where tracked files differ from
    it; None outside a git checkout (a copy without history, an installed package)."""
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True)
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True
        )
    except OSError:  # no git
        return None
    if head.returncode or changes.returncode:
        return None
    return head.stdout.decode().strip() + ("+changes" if changes.stdout.strip() else "")


def server_settings() -> dict[str, str]:
    """The ``VITSERVE_*`` variables set in this process's environment, by name: how the
    caller set up the server a figure was measured on, recorded beside it."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("VITSERVE_")}


def environment(device: str | torch.device = "auto") -> dict[str, Any]:
    """The facts a reader needs to judge or reproduce a number measured on ``device``."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "cuda_version": torch.version.cuda if cuda else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        # the cores this process may run on (taskset, cgroups): what a pinned run measured
        "usable_cpus": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": code_version(),
    }

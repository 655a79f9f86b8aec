"""Optimizer, two-phase rate schedule and checkpoints of a distillation run, apart from its loop."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.train.options import DistillOptions
from app.vit.builder import CompressedViT

# The options that define the stream of views; a resumed run must keep them.
STREAM_KEYS = ("batch_size", "seed", "views", "augment", "views_on")


# ---- optimizer, schedule, phases -------------------------------------------------------------


def compression_params(student: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters that compression introduced, by kind (empty for a dense student)."""
    if not isinstance(student, CompressedViT):
        return {"static": [], "aggregation": []}
    return {
        "static": [m.attn_matrix for m in student.static_attention().values()],
        "aggregation": [m.weight for m in student.aggregations().values()],
    }


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm gains, position table and CLS token: decaying them only hurts."""
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))


def phase_factor(step: int, start: int, length: int, warmup: int) -> float:
    """Rate multiplier ``step`` steps into a phase: linear warm-up, then cosine to zero."""
    s = step - start
    warm = min(warmup, max(length - 1, 0))
    if s < warm:
        return (s + 1) / warm
    progress = (s - warm) / max(length - warm, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class Schedule:
    """Which parameters train when, and at what rate."""

    steps: int
    phase1: int  # 0 when there is nothing compression-specific to train
    warmup: int

    def compression_factor(self, step: int) -> float:
        if step >= self.steps:
            return 0.0
        if step < self.phase1:
            return phase_factor(step, 0, self.phase1, self.warmup)
        return phase_factor(step, self.phase1, self.steps - self.phase1, self.warmup)

    def backbone_factor(self, step: int) -> float:
        return 0.0 if step < self.phase1 else self.compression_factor(step)


def build_optimizer(
    student: nn.Module, opts: DistillOptions, schedule: Schedule
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with four named groups: static matrices and aggregation maps (own rates, no
    decay, trained in both phases), inherited matrices (decayed) and inherited vectors."""
    special = compression_params(student)
    special_ids = {id(p) for ps in special.values() for p in ps}
    decay, plain = [], []
    for name, p in student.named_parameters():
        if id(p) not in special_ids:
            (plain if _no_decay(name, p) else decay).append(p)
    groups = [
        {"name": "static", "params": special["static"], "lr": opts.static_lr, "weight_decay": 0.0},
        {"name": "aggregation", "params": special["aggregation"], "lr": opts.aggregation_lr},
        {"name": "decay", "params": decay, "lr": opts.lr, "weight_decay": opts.weight_decay},
        {"name": "no_decay", "params": plain, "lr": opts.lr},
    ]
    groups = [{"weight_decay": 0.0, **g} for g in groups if g["params"]]
    fused = next(student.parameters()).is_cuda
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=fused)

    def factor(group: dict[str, Any]) -> Callable[[int], float]:
        trains_early = group["name"] in special
        fn = schedule.compression_factor if trains_early else schedule.backbone_factor
        return lambda step: fn(step)  # a plain function, which LambdaLR.state_dict skips

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g) for g in groups])


def set_phase(student: nn.Module, step: int, schedule: Schedule) -> None:
    """Freeze everything inherited during phase 1 (no gradients computed for it)."""
    special = {id(p) for ps in compression_params(student).values() for p in ps}
    train_all = step >= schedule.phase1
    for p in student.parameters():
        p.requires_grad_(train_all or id(p) in special)


# ---- checkpoints -----------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path,
    *,
    step: int,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: list[dict[str, float]],
    opts: DistillOptions,
    ema: nn.Module | None = None,
) -> None:
    """Everything a resumed run needs, written to a temp file then renamed (never torn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "step": step,
            "student": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "history": history,
            "options": opts.model_dump(mode="json"),
            **({} if ema is None else {"ema": ema.state_dict()}),
        },
        tmp,
    )
    tmp.replace(path)


def load_checkpoint(path: Path, opts: DistillOptions) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain data only) and check it fits these options.

    Loaded to CPU: RNG states must stay there, and ``load_state_dict`` of the student and
    of the optimizer copies every tensor to its parameter's device anyway."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    now = opts.model_dump(mode="json")
    # a checkpoint older than an option was made with that option's default
    made = {**DistillOptions().model_dump(mode="json"), **ckpt["options"]}
    changed = [k for k in STREAM_KEYS if made[k] != now[k]]
    if changed:
        raise ValueError(f"{path} was made with different {changed}; cannot resume with these")
    return ckpt

"""Label-free distillation of a compressed ViT from its dense teacher.

Why the recipe looks like this (plain logit KL plateaus near 76 % top-1 agreement):

* The teacher labels every view itself, so the photo pool is stretched into many views
  (crops, flips, RandAugment, mixes of two photos: :mod:`app.train.data`) and the student
  matches the teacher's whole softened distribution, not a hard label.
* Everything but the compressed layers starts as the teacher's weights and is already
  right. Phase 1 trains only the static attention matrices and the token aggregation
  maps (a few hundred thousand numbers, little room to overfit a small pool); phase 2
  then lets all weights adapt, with its own warm-up and cosine decay.
* Besides the logits the student gets dense targets at every block: its tokens are
  matched to the teacher's block outputs (aggregated with the student's own maps where
  the student has fewer tokens; CLS only after ToMe merging, whose tokens vary per
  image) and its pre-logit feature to the teacher's; each static
  matrix is pulled towards the teacher's per-image attention of that block (DGSSA's
  dynamic guidance). All terms are per-sample means, so a batch split over DDP ranks
  gives the same gradient as one process.
* Two extras, off by default: ``adversarial_share`` of each batch is first nudged one
  signed-gradient step up the teacher-student KL (views where the two disagree say most
  about the teacher's decision boundaries; under DDP each rank nudges that share of its
  own part), and ``ema_decay`` returns a moving average of the weights.

Under ``torchrun`` each rank takes its share of every global batch and DDP averages the
gradients; only rank 0 prints, logs and writes checkpoints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm.data
import torch
import torch.distributed as dist
from pydantic import BaseModel
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from app.train.data import DistillViews, StepBatches, normalize_views
from app.train.device_views import DeviceViews
from app.train.losses import (
    distill_loss,
    nudge_towards_disagreement,
    static_layers,
    tapped,
)
from app.train.options import DistillOptions
from app.train.schedule import (
    Schedule,
    _set_rng_state,
    build_optimizer,
    compression_params,
    load_checkpoint,
    save_checkpoint,
    set_phase,
)
from app.vit.builder import CompressedViT

CHECKPOINT_FILE = "last.pt"


class DistillResult(BaseModel):
    """What a run did; ``history`` has one entry per ``log_every`` steps (rank 0's view)."""

    steps_done: int
    final_loss: float | None
    stopped: Literal["completed", "time_budget"]
    elapsed_s: float
    history: list[dict[str, float | int]]


# ---- distributed context ---------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0"))


def training_device(name: str) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> a device; under torchrun, CUDA means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup_distributed(device: str) -> Distributed:
    """Join torchrun's process group when its env vars are set (nccl on CUDA, gloo on CPU)."""
    dev = training_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(0, 1, dev, owns_group=False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), dev, owns_group=owns)


# ---- the loop --------------------------------------------------------------------------------


@dataclass
class _Running:
    """Sums over the current logging window, kept on the device until flushed."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    n: int = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n += 1

    def flush(self) -> dict[str, float]:
        out = {k: float(v) / max(self.n, 1) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


def _views_loader(
    train_images: Sequence[Path],
    data_config: dict[str, Any],
    opts: DistillOptions,
    start: int,
    ctx: Distributed,
) -> Iterable[torch.Tensor]:
    """Each remaining step's uint8 views for this rank, from loader workers or the device."""
    if opts.views_on == "device":
        views = DeviceViews(
            train_images,
            data_config,
            opts.augment,
            seed=opts.seed,
            views=opts.views,
            device=ctx.device,
        )
        return views.stream(start, opts.steps, opts.batch_size, rank=ctx.rank, world=ctx.world)
    views = DistillViews(train_images, data_config, opts.augment, seed=opts.seed, views=opts.views)
    batches = StepBatches(start, opts.steps, opts.batch_size, rank=ctx.rank, world=ctx.world)
    # Augmenting views is the CPU's job and can bound the step time: use every core this
    # process may run on, but one per rank (which feeds its GPU).
    workers = opts.num_workers
    if workers is None:
        workers = max(len(os.sched_getaffinity(0)) // ctx.world - 1, 1)
    return DataLoader(
        views,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def _wrap(student: nn.Module, ctx: Distributed) -> nn.Module:
    """DDP over the parameters that currently train (re-wrapped when the phase changes)."""
    if ctx.world == 1:
        return student
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=ids, broadcast_buffers=False)


def _budget_spent(ctx: Distributed, elapsed: float, step_s: float, budget: float | None) -> bool:
    """Would one more step overrun the budget? Rank 0 decides for all, so ranks stop together."""
    if budget is None:
        return False
    spent = elapsed + step_s > budget
    if ctx.world > 1:
        flag = torch.tensor([float(spent)], device=ctx.device)
        dist.broadcast(flag, src=0)
        spent = bool(flag.item())
    return spent


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_images: Sequence[Path],
    opts: DistillOptions,
    *,
    data_config: dict[str, Any] | None = None,
) -> DistillResult:
    """Train ``student`` (in place, left on ``opts.device`` in eval mode) to mimic ``teacher``.

    ``data_config`` (timm's: input size, mean, std) defaults to the teacher's pretrained one.
    """
    started = time.monotonic()
    data_config = data_config or timm.data.resolve_model_data_config(teacher)
    ctx = setup_distributed(opts.device)
    try:
        return _run(teacher, student, train_images, opts, data_config, ctx, started)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _run(
    teacher: nn.Module,
    student: nn.Module,
    train_images: Sequence[Path],
    opts: DistillOptions,
    data_config: dict[str, Any],
    ctx: Distributed,
    started: float,
) -> DistillResult:
    device = ctx.device
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = student.to(device).train()
    has_special = any(compression_params(student).values())
    schedule = Schedule(opts.steps, min(opts.phase1_steps, opts.steps) * has_special, opts.warmup)
    optimizer, scheduler = build_optimizer(student, opts, schedule)

    step, history, ckpt = 0, [], {}
    ckpt_path = opts.checkpoint_dir / CHECKPOINT_FILE if opts.checkpoint_dir else None
    if opts.resume and ckpt_path and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, opts)
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        step, history = ckpt["step"], ckpt["history"]
    # The average starts from the weights the run starts from (a checkpoint without an
    # average, made before ema_decay was set, starts it from its weights).
    ema = ModelEmaV3(student, decay=opts.ema_decay) if opts.ema_decay else None
    if ema is not None and "ema" in ckpt:
        ema.module.load_state_dict(ckpt["ema"])

    def checkpoint() -> None:
        if ckpt_path and ctx.is_main:
            save_checkpoint(
                ckpt_path,
                step=step,
                student=student,
                optimizer=optimizer,
                scheduler=scheduler,
                history=history,
                opts=opts,
                ema=None if ema is None else ema.module,
            )

    static = sorted(static_layers(student))
    blocks = range(len(student.blocks)) if opts.feature_weight else range(0)
    aligned = bool(opts.feature_weight) and opts.merged_features == "aligned"
    if isinstance(student, CompressedViT):
        student.track_token_sources = aligned
    use_amp = opts.amp and device.type == "cuda"
    nudge_C = torch.tensor(data_config["std"], device=device).reciprocal() * opts.adversarial_step
    set_phase(student, step, schedule)
    model = _wrap(student, ctx)
    running, stopped = _Running(), "completed"
    last_loss: torch.Tensor | None = None
    step_s = 0.0  # moving average of one step's wall time (data wait included), for the budget
    bar = tqdm(total=opts.steps, initial=step, desc="distill", unit="step", disable=not ctx.is_main)
    loader = _views_loader(train_images, data_config, opts, step, ctx)
    mark = time.monotonic()
    with tapped(teacher, blocks, static) as t_taps, tapped(student, blocks) as s_taps:
        for views_u8 in loader:
            if _budget_spent(ctx, time.monotonic() - started, step_s, opts.time_budget_s):
                stopped = "time_budget"
                break
            if step == schedule.phase1 and step > 0:  # phase 2: everything trains from here
                set_phase(student, step, schedule)
                model = _wrap(student, ctx)
            x = normalize_views(views_u8.to(device, non_blocking=True), data_config)
            x = nudge_towards_disagreement(
                teacher,
                student,
                x,
                opts.adversarial_share,
                nudge_C,
                temperature=opts.temperature,
                amp=use_amp,
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                with torch.no_grad():
                    t_BK = teacher(x)
                s_BK = model(x)
                loss = distill_loss(student, t_BK, s_BK, t_taps, s_taps, opts)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            if opts.grad_clip:
                trained = [p for p in student.parameters() if p.requires_grad]
                nn.utils.clip_grad_norm_(trained, opts.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if ema is not None:
                ema.update(student, step=step)
            last_loss = loss.parts["loss"]
            running.add(loss.parts)
            now = time.monotonic()
            step_s = now - mark if step_s == 0 else 0.9 * step_s + 0.1 * (now - mark)
            mark = now
            if step % opts.log_every == 0 or step == opts.steps:
                rates = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
                history.append({"step": step, **rates, **running.flush()})
                bar.set_postfix(
                    loss=f"{history[-1]['loss']:.4f}", agree=f"{history[-1]['agree']:.3f}"
                )
            bar.update(1)
            if step % opts.checkpoint_every == 0:
                checkpoint()
    bar.close()
    if step % opts.checkpoint_every or stopped != "completed":
        checkpoint()
    if ema is not None:
        student.load_state_dict(ema.module.state_dict())
    if isinstance(student, CompressedViT):
        student.track_token_sources = False
    student.eval()
    return DistillResult(
        steps_done=step,
        final_loss=None if last_loss is None else float(last_loss),
        stopped=stopped,
        elapsed_s=time.monotonic() - started,
        history=history,
    )

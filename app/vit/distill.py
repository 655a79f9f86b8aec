"""Label-free distillation of a compressed ViT from its dense teacher.

Why the recipe looks like this (plain logit KL plateaus near 76 % top-1 agreement):

* The teacher labels every view itself, so the photo pool is stretched into many views
  (crops, flips, RandAugment, mixes of two photos: :mod:`app.vit.data`) and the student
  matches the teacher's whole softened distribution, not a hard label.
* Everything but the compressed layers starts as the teacher's weights and is already
  right. Phase 1 trains only the static attention matrices and the token aggregation
  maps (a few hundred thousand numbers, little room to overfit a small pool); phase 2
  then lets all weights adapt, at a lower rate, with its own warm-up and cosine decay.
* Besides the logits the student gets dense targets at every block: its tokens are
  matched to the teacher's block outputs (aggregated with the student's own maps where
  the student has fewer tokens) and its pre-logit feature to the teacher's; each static
  matrix is pulled towards the teacher's per-image attention of that block (DGSSA's
  dynamic guidance). All terms are per-sample means, so a batch split over DDP ranks
  gives the same gradient as one process.

Under ``torchrun`` each rank takes its share of every global batch and DDP averages the
gradients; only rank 0 prints, logs and writes checkpoints.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm.data
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from app.vit.attention_maps import attention_probs
from app.vit.builder import CompressedViT
from app.vit.data import DistillViews, StepBatches, ViewAugment, normalize_views

CHECKPOINT_FILE = "last.pt"
# The options that define the stream of views; a resumed run must keep them.
STREAM_KEYS = ("batch_size", "seed", "views", "augment")


class DistillOptions(BaseModel):
    """Every knob of a distillation run (defaults: DeiT-Tiny on one H200, ~1.5k photos)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(3000, ge=1, description="Optimizer steps in total, both phases.")
    batch_size: int = Field(256, ge=1, description="Global views per step (split over ranks).")
    lr: float = Field(2e-4, gt=0, description="Peak rate of the inherited weights (phase 2).")
    static_lr: float = Field(
        1e-4, ge=0, description="Peak rate of static matrices; entries are ~1/N, keep it small."
    )
    aggregation_lr: float = Field(1e-3, ge=0, description="Peak rate of aggregation maps.")
    weight_decay: float = Field(0.05, ge=0, description="On inherited matrices only.")
    warmup: int = Field(100, ge=0, description="Linear warm-up steps at the start of each phase.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the logit KL.")
    attn_weight: float = Field(1.0, ge=0, description="Static matrix vs teacher attention.")
    feature_weight: float = Field(1.0, ge=0, description="Block tokens and pre-logits.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm.")
    seed: int = 0
    views: int = Field(4, ge=1, description="Views of one photo side by side in a batch.")
    augment: ViewAugment = Field(default_factory=ViewAugment)
    phase1_steps: int = Field(
        500, ge=0, description="First steps that train only static matrices + aggregation maps."
    )
    time_budget_s: float | None = Field(
        None, ge=0, description="Stop (and checkpoint) before this much wall time is spent."
    )
    checkpoint_dir: Path | None = None
    checkpoint_every: int = Field(500, ge=1)
    resume: bool = Field(False, description="Continue from checkpoint_dir/last.pt if present.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' (under torchrun: per rank).")
    amp: bool = Field(True, description="bfloat16 autocast on CUDA (CPU always runs fp32).")
    num_workers: int = Field(
        default_factory=lambda: min(8, os.cpu_count() or 1), ge=0, description="Loader procs."
    )
    log_every: int = Field(25, ge=1, description="Steps per history entry / progress update.")


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


# ---- hooks: what the loss needs from inside both networks ------------------------------------


@dataclass
class Taps:
    """Filled by hooks during one forward: block outputs, attention maps, pre-logits."""

    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # i -> [B, N_i, C]
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # i -> [B, H, N, N]
    pre_logits: torch.Tensor | None = None  # [B, C], the head's input


@contextmanager
def tapped(
    model: nn.Module, blocks: Sequence[int], attention: Sequence[int] = ()
) -> Iterator[Taps]:
    """Hooks on ``model`` (a timm ViT or CompressedViT) for as long as the context lasts."""
    taps = Taps()

    def keep_block(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, out_BNC: torch.Tensor) -> None:
            taps.blocks[i] = out_BNC

        return hook

    def keep_attention(i: int) -> Callable[..., None]:
        def hook(attn: nn.Module, args: tuple) -> None:
            taps.attention[i] = attention_probs(attn, args[0])

        return hook

    def keep_pre_logits(_m: nn.Module, args: tuple) -> None:
        taps.pre_logits = args[0]

    with ExitStack() as stack:
        handles = [model.head.register_forward_pre_hook(keep_pre_logits)]
        handles += [model.blocks[i].register_forward_hook(keep_block(i)) for i in blocks]
        handles += [
            model.blocks[i].attn.register_forward_pre_hook(keep_attention(i)) for i in attention
        ]
        for handle in handles:
            stack.callback(handle.remove)
        yield taps


# ---- the loss ------------------------------------------------------------------------------


def logit_kl(t_BK: torch.Tensor, s_BK: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, times T² (Hinton et al.)."""
    log_t = F.log_softmax(t_BK.float() / temperature, dim=-1)
    log_s = F.log_softmax(s_BK.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2


def attention_guidance(static_HNN: torch.Tensor, teacher_BHNN: torch.Tensor) -> torch.Tensor:
    """Squared error of the static matrix to each image's teacher attention, relative to
    that attention's energy (scale-free: 1.0 for an all-zero matrix), averaged over images."""
    err_B = (static_HNN.float().unsqueeze(0) - teacher_BHNN).pow(2).sum((1, 2, 3))
    return (err_B / teacher_BHNN.pow(2).sum((1, 2, 3))).mean()


def feature_match(s_BNC: torch.Tensor, t_BNC: torch.Tensor) -> torch.Tensor:
    """MSE of layer-normalised features: robust to ViTs' few huge activation channels."""
    c = s_BNC.shape[-1]
    return F.mse_loss(F.layer_norm(s_BNC.float(), (c,)), F.layer_norm(t_BNC.float(), (c,)))


def patch_maps(student: nn.Module) -> dict[int, torch.Tensor]:
    """Block -> ``[P_i, P_0]``: all aggregations up to block i chained (detached), mapping
    the teacher's patch tokens onto the student's; blocks before the first one are absent."""
    maps: dict[int, torch.Tensor] = {}
    chain_QP: torch.Tensor | None = None
    aggs = student.aggregations() if isinstance(student, CompressedViT) else {}
    for i in range(len(student.blocks)):
        if i in aggs:
            w_QP = aggs[i].weight.detach().float()
            chain_QP = w_QP if chain_QP is None else w_QP @ chain_QP
        if chain_QP is not None:
            maps[i] = chain_QP
    return maps


def aggregate_like(t_BNC: torch.Tensor, map_QP: torch.Tensor | None) -> torch.Tensor:
    """Teacher tokens with the patch part mapped by ``map`` (CLS kept, as GLAD keeps it)."""
    if map_QP is None:
        return t_BNC
    patches_BQC = torch.einsum("qp,bpc->bqc", map_QP, t_BNC[:, 1:].float())
    return torch.cat([t_BNC[:, :1].float(), patches_BQC], dim=1)


def static_layers(student: nn.Module) -> dict[int, nn.Module]:
    return student.static_attention() if isinstance(student, CompressedViT) else {}


@dataclass
class LossParts:
    """The loss to minimise and, detached (no device sync until logged), its parts."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def distill_loss(
    student: nn.Module,
    t_BK: torch.Tensor,
    s_BK: torch.Tensor,
    t_taps: Taps,
    s_taps: Taps,
    opts: DistillOptions,
) -> LossParts:
    """KL on logits + ``attn_weight`` x guidance + ``feature_weight`` x feature matching."""
    kd = logit_kl(t_BK, s_BK, opts.temperature)
    total, parts = kd, {"kd": kd.detach()}
    static = static_layers(student)
    if opts.attn_weight and static:
        attn = torch.stack(
            [attention_guidance(m.attn_matrix, t_taps.attention[i]) for i, m in static.items()]
        ).mean()
        total = total + opts.attn_weight * attn
        parts["attn"] = attn.detach()
    if opts.feature_weight:
        maps = patch_maps(student)
        terms = [
            feature_match(s_BNC, aggregate_like(t_taps.blocks[i], maps.get(i)))
            for i, s_BNC in s_taps.blocks.items()
        ]
        terms.append(feature_match(s_taps.pre_logits, t_taps.pre_logits))
        feat = torch.stack(terms).mean()
        total = total + opts.feature_weight * feat
        parts["feat"] = feat.detach()
    parts["loss"] = total.detach()
    parts["agree"] = (t_BK.argmax(-1) == s_BK.argmax(-1)).float().mean()
    return LossParts(total, parts)


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
        return lambda step: fn(step)  # a plain function: LambdaLR does not pickle it

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
        },
        tmp,
    )
    tmp.replace(path)


def load_checkpoint(path: Path, opts: DistillOptions, device: torch.device) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain data only) and check it fits these options."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    now = opts.model_dump(mode="json")
    changed = [k for k in STREAM_KEYS if ckpt["options"][k] != now[k]]
    if changed:
        raise ValueError(f"{path} was made with different {changed}; cannot resume with these")
    return ckpt


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
) -> DataLoader:
    views = DistillViews(train_images, data_config, opts.augment, seed=opts.seed, views=opts.views)
    batches = StepBatches(start, opts.steps, opts.batch_size, rank=ctx.rank, world=ctx.world)
    return DataLoader(
        views,
        batch_sampler=batches,
        num_workers=opts.num_workers,
        pin_memory=ctx.device.type == "cuda",
        prefetch_factor=4 if opts.num_workers else None,
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

    step, history = 0, []
    ckpt_path = opts.checkpoint_dir / CHECKPOINT_FILE if opts.checkpoint_dir else None
    if opts.resume and ckpt_path and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, opts, device)
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        step, history = ckpt["step"], ckpt["history"]

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
            )

    static = sorted(static_layers(student))
    blocks = range(len(student.blocks)) if opts.feature_weight else range(0)
    use_amp = opts.amp and device.type == "cuda"
    set_phase(student, step, schedule)
    model = _wrap(student, ctx)
    running, stopped = _Running(), "completed"
    last_loss: torch.Tensor | None = None
    step_s = 0.0  # moving average of one step's wall time, for the budget
    bar = tqdm(total=opts.steps, initial=step, desc="distill", unit="step", disable=not ctx.is_main)
    loader = _views_loader(train_images, data_config, opts, step, ctx)
    with tapped(teacher, blocks, static) as t_taps, tapped(student, blocks) as s_taps:
        for views_u8 in loader:
            if _budget_spent(ctx, time.monotonic() - started, step_s, opts.time_budget_s):
                stopped = "time_budget"
                break
            t0 = time.monotonic()
            if step == schedule.phase1 and step > 0:  # phase 2: everything trains from here
                set_phase(student, step, schedule)
                model = _wrap(student, ctx)
            x = normalize_views(views_u8.to(device, non_blocking=True), data_config)
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
            last_loss = loss.parts["loss"]
            running.add(loss.parts)
            took = time.monotonic() - t0
            step_s = took if step_s == 0 else 0.9 * step_s + 0.1 * took
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
    student.eval()
    return DistillResult(
        steps_done=step,
        final_loss=None if last_loss is None else float(last_loss),
        stopped=stopped,
        elapsed_s=time.monotonic() - started,
        history=history,
    )

"""The options of a distillation run, apart from the run itself so that its losses and
schedule can name them without importing the training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.train.data import ViewAugment


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
    hard_weight: float = Field(
        0.0, ge=0, description="Cross-entropy to the teacher's top-1 (DeiT's hard distillation)."
    )
    attn_weight: float = Field(1.0, ge=0, description="Static matrix vs teacher attention.")
    feature_weight: float = Field(1.0, ge=0, description="Block tokens and pre-logits.")
    merged_features: Literal["cls", "aligned"] = Field(
        "cls",
        description="Blocks after a merge: match the CLS token only ('cls'), or every token "
        "against the teacher's tokens merged as the student merged them, size-weighted "
        "('aligned').",
    )
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm.")
    seed: int = 0
    views: int = Field(4, ge=1, description="Views of one photo side by side in a batch.")
    augment: ViewAugment = Field(default_factory=ViewAugment)
    views_on: Literal["loader", "device"] = Field(
        "loader",
        description="Where views are made: 'loader' (CPU workers, timm's PIL transforms) or "
        "'device' (the training device, batched: crops, flips, colour jitter, mixes; no "
        "RandAugment), which a GPU whose host cores set the pace runs several times faster.",
    )
    phase1_steps: int = Field(
        500, ge=0, description="First steps that train only static matrices + aggregation maps."
    )
    time_budget_s: float | None = Field(
        None,
        ge=0,
        description="Stop (and checkpoint) before this much wall time is spent. The rate "
        "schedule still spans `steps`, so size `steps` to fit; the budget is a guard.",
    )
    checkpoint_dir: Path | None = None
    checkpoint_every: int = Field(500, ge=1)
    resume: bool = Field(False, description="Continue from checkpoint_dir/last.pt if present.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' (under torchrun: per rank).")
    amp: bool = Field(True, description="bfloat16 autocast on CUDA (CPU always runs fp32).")
    num_workers: int | None = Field(
        None, ge=0, description="Loader processes per rank; None: the CPU cores, shared by ranks."
    )
    log_every: int = Field(25, ge=1, description="Steps per history entry / progress update.")
    adversarial_share: float = Field(
        0.0, ge=0, le=1, description="Share of each batch nudged to where the two disagree."
    )
    adversarial_step: float = Field(
        2 / 255, gt=0, description="That nudge's size in pixel units (0-1 scale)."
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="Return an exponential moving average of the weights."
    )

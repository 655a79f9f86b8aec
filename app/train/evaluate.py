"""Fidelity of a compressed student to its dense teacher on held-out images.

The goal of compression is to answer like the dense model, so the headline figure is
top-1 agreement with the teacher (not accuracy, which needs labels and mixes in the
teacher's own mistakes); KL and top-5 overlap show how close the full distributions are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from app.devices import resolve_dtype
from app.train.data import EvalImages, eval_transform


class Fidelity(BaseModel):
    """Student vs teacher on ``n_images``; accuracies only over images with a label."""

    n_images: int
    agreement_top1: float
    top5_overlap: float
    mean_kl: float
    n_labelled: int = 0
    student_top1_acc: float | None = None
    teacher_top1_acc: float | None = None


class _Tally:
    """Running sums over batches, so memory does not grow with the number of images."""

    def __init__(self) -> None:
        self.n = self.agree = self.n_labelled = self.student_ok = self.teacher_ok = 0
        self.overlap = self.kl = 0.0

    def add(self, t_BK: torch.Tensor, s_BK: torch.Tensor, label_B: torch.Tensor) -> None:
        """``t``/``s`` are float32 logits; ``label`` holds -1 where an image has no label."""
        t_top5, s_top5 = t_BK.topk(5, dim=-1).indices, s_BK.topk(5, dim=-1).indices
        t1, s1 = t_top5[:, 0], s_top5[:, 0]
        self.n += t_BK.shape[0]
        self.agree += int((t1 == s1).sum())
        shared_B = (t_top5.unsqueeze(-1) == s_top5.unsqueeze(-2)).any(-1).sum(-1)
        self.overlap += float(shared_B.sum()) / 5
        log_t, log_s = F.log_softmax(t_BK, dim=-1), F.log_softmax(s_BK, dim=-1)
        self.kl += float((log_t.exp() * (log_t - log_s)).sum())
        known = label_B >= 0
        self.n_labelled += int(known.sum())
        self.student_ok += int((s1 == label_B)[known].sum())
        self.teacher_ok += int((t1 == label_B)[known].sum())

    def result(self) -> Fidelity:
        n = max(self.n, 1)
        labelled = self.n_labelled > 0
        return Fidelity(
            n_images=self.n,
            agreement_top1=self.agree / n,
            top5_overlap=self.overlap / n,
            mean_kl=self.kl / n,
            n_labelled=self.n_labelled,
            student_top1_acc=self.student_ok / self.n_labelled if labelled else None,
            teacher_top1_acc=self.teacher_ok / self.n_labelled if labelled else None,
        )


@torch.inference_mode()
def evaluate(
    teacher: nn.Module | torch.Tensor,
    student: nn.Module,
    images: Sequence[Path],
    labels: Mapping[str, int] | None,
    data_config: dict[str, Any],
    *,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    num_workers: int = 0,
) -> Fidelity:
    """Run both models (put in eval mode on ``device``) on the eval transform of ``images``.

    ``labels`` maps file names to class indices (``read_labels``); images it lacks count
    for agreement but not accuracy. A non-fp32 ``dtype`` (or its name, e.g. ``"bfloat16"``)
    runs under autocast. ``teacher`` may be its logits on ``images`` already (``logits``),
    so that scoring many students runs the teacher once.
    """
    if not images:
        raise ValueError("no images to evaluate on")
    dev, dtype = torch.device(device), resolve_dtype(dtype)
    student = student.eval().to(dev)
    cached = teacher if isinstance(teacher, torch.Tensor) else None
    if cached is not None and cached.shape[0] != len(images):
        raise ValueError(f"{cached.shape[0]} teacher logits for {len(images)} images")
    if cached is None:
        teacher = teacher.eval().to(dev)
    label_of = dict(labels or {})
    label_N = torch.tensor([label_of.get(p.name, -1) for p in images])
    loader = DataLoader(
        EvalImages(images, eval_transform(data_config)),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
    )
    tally = _Tally()
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    for x_B3HW, idx_B in tqdm(loader, desc="evaluate", unit="batch", leave=False):
        x_B3HW = x_B3HW.to(dev, non_blocking=True)
        with autocast:
            s_BK = student(x_B3HW)
            t_BK = cached[idx_B] if cached is not None else teacher(x_B3HW)
        tally.add(t_BK.float().cpu(), s_BK.float().cpu(), label_N[idx_B])
    return tally.result()


@torch.inference_mode()
def logits(
    model: nn.Module,
    images: Sequence[Path],
    data_config: dict[str, Any],
    *,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> torch.Tensor:
    """``model``'s float32 logits (N x classes, on the CPU) on the eval transform of
    ``images``, in order: the teacher's side of ``evaluate``, computed once."""
    dev, dtype = torch.device(device), resolve_dtype(dtype)
    model = model.eval().to(dev)
    loader = DataLoader(EvalImages(images, eval_transform(data_config)), batch_size=batch_size)
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    out = []
    for x_B3HW, _ in tqdm(loader, desc="teacher logits", unit="batch", leave=False):
        with autocast:
            out.append(model(x_B3HW.to(dev)).float().cpu())
    return torch.cat(out)

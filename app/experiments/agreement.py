"""How far two variants' predictions for one image are apart.

Compare mode and shadow mode both reduce a pair of probability vectors to the same
figures, so a dashboard can put the two side by side:

- ``top1_match``: the argmax classes are equal (what a user of the top answer sees);
- ``top5_overlap``: the share of the reference's top 5 classes also in the candidate's;
- ``total_variation``: ½·Σ|p − q|, in [0, 1]: the most probability mass any set of
  classes can gain or lose between the two;
- ``js_divergence``: Jensen-Shannon divergence in bits, in [0, 1], finite even where one
  vector has zeros;
- ``symmetric_kl``: KL(p‖q) + KL(q‖p) in nats, after smoothing both vectors by
  ``KL_EPSILON`` — softmax in float32 underflows to exact zeros, which would make the
  unsmoothed value infinite and useless on a dashboard.

Everything is computed in float64 so that identical inputs give exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOP_K = 5
KL_EPSILON = 1e-10


@dataclass(frozen=True)
class Agreement:
    top1_match: bool
    top5_overlap: float
    total_variation: float
    js_divergence: float
    symmetric_kl: float


def agreement(reference: torch.Tensor, candidate: torch.Tensor) -> Agreement:
    """Figures for two probability vectors over the same classes (each sums to 1)."""
    if reference.shape != candidate.shape or reference.dim() != 1:
        raise ValueError(
            f"need two 1-D vectors of one shape, got {tuple(reference.shape)} "
            f"and {tuple(candidate.shape)}"
        )
    p, q = reference.double(), candidate.double()
    k = min(TOP_K, p.numel())
    top_p = set(p.topk(k).indices.tolist())
    top_q = set(q.topk(k).indices.tolist())
    return Agreement(
        top1_match=int(p.argmax()) == int(q.argmax()),
        top5_overlap=len(top_p & top_q) / k,
        total_variation=float(0.5 * (p - q).abs().sum()),
        js_divergence=js_divergence_bits(p, q),
        symmetric_kl=symmetric_kl(p, q),
    )


def js_divergence_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    m = 0.5 * (p + q)
    # xlogy(0, 0) = 0: classes where p (or q) is zero contribute nothing, as they should.
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum()
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum()
    return max(0.0, float(0.5 * (kl_pm + kl_qm)) / math.log(2))


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p = (p + KL_EPSILON) / (1 + KL_EPSILON * p.numel())
    q = (q + KL_EPSILON) / (1 + KL_EPSILON * q.numel())
    return max(0.0, float(((p - q) * (p.log() - q.log())).sum()))


@dataclass(frozen=True)
class AgreementSummary:
    """Means over the images of one request (top-1 agreement is then a rate)."""

    images: int
    top1_agreement: float
    top5_overlap: float
    total_variation: float
    js_divergence: float
    symmetric_kl: float


def summarize(per_image: list[Agreement]) -> AgreementSummary:
    n = len(per_image)
    if n == 0:
        raise ValueError("nothing to summarize: no images")

    def mean(values) -> float:
        return sum(values) / n

    return AgreementSummary(
        images=n,
        top1_agreement=mean(a.top1_match for a in per_image),
        top5_overlap=mean(a.top5_overlap for a in per_image),
        total_variation=mean(a.total_variation for a in per_image),
        js_divergence=mean(a.js_divergence for a in per_image),
        symmetric_kl=mean(a.symmetric_kl for a in per_image),
    )

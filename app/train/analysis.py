"""Where can a dense ViT be compressed? Measure the two observations the method rests on.

(a) Early blocks attend in nearly the same pattern for every image, so their attention
can be one static matrix (DGSSA). Measured per block and head as the mean pairwise
cosine similarity of the flattened ``[N, N]`` maps across images, and as the consistency
``1 - rms ||A - mean A|| / ||mean A||`` (1: identical for every image).

(b) Late blocks' attention maps are low rank: every query mixes the same few directions,
so fewer tokens carry the same information (GLAD's token pyramid). Measured as the
effective rank (exp of the entropy of the normalised singular values, Roy & Vetterli
2007) and the energy share of the top 10 % singular values, for each attention map and
for each block's output token matrix.

From these, a :class:`CompressionConfig` is proposed: the first token reduction where the
attention rank has clearly dropped, halving the patch tokens every few blocks after it,
and static attention for the leading similar blocks before it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from app.train.data import EvalImages, eval_transform
from app.vit.attention_maps import capture_attention, capture_tokens
from app.vit.config import CompressionConfig, TokenStage

TOP_SHARE = 0.1  # energy is reported for the top 10 % of singular values
REPORT_FILE = "analysis.json"


class HeadStats(BaseModel):
    similarity: float  # mean pairwise cosine of the flattened maps across images
    consistency: float  # 1 - ||A - mean A|| / ||mean A||, averaged over images
    attn_eff_rank: float  # mean over images
    attn_energy_top: float  # energy share of the top 10 % singular values


class BlockStats(BaseModel):
    block: int
    tokens: int
    heads: list[HeadStats]
    similarity: float  # mean over heads
    attn_rank_ratio: float  # mean effective rank over heads / tokens
    token_eff_rank: float
    token_rank_ratio: float  # token effective rank / min(tokens, channels)
    token_energy_top: float


class AnalysisReport(BaseModel):
    n_images: int
    blocks: list[BlockStats]
    compression: CompressionConfig
    proposed: str  # the compact text form, e.g. ``static=0-2;tokens=99@3,50@6,26@9``
    reasons: list[str]
    thresholds: dict[str, float]
    files: list[str]


def effective_rank(sv: torch.Tensor) -> torch.Tensor:
    """``exp(entropy(sv / sum sv))`` over the last axis: 1 for rank one, n for a flat spectrum."""
    p = sv / sv.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum(-1))


def energy_top(sv: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """Share of ``sum sv²`` in the largest ``ceil(share * n)`` singular values (sorted input)."""
    k = max(1, math.ceil(share * sv.shape[-1]))
    energy = sv.pow(2)
    return energy[..., :k].sum(-1) / energy.sum(-1).clamp_min(1e-12)


class _BlockAccumulator:
    """Running sums for one block, so memory stays flat in the number of images."""

    def __init__(self) -> None:
        self.n = self.tokens = self.channels = 0
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def add(self, attn_BHNN: torch.Tensor, tokens_BNC: torch.Tensor) -> None:
        a_BHF = attn_BHNN.double().flatten(2)
        self._add("unit_HF", (a_BHF / a_BHF.norm(dim=-1, keepdim=True).clamp_min(1e-12)).sum(0))
        self._add("map_HF", a_BHF.sum(0))
        self._add("sq_norm_H", a_BHF.pow(2).sum(-1).sum(0))
        sv_BHN = torch.linalg.svdvals(attn_BHNN.float())
        self._add("attn_rank_H", effective_rank(sv_BHN).sum(0))
        self._add("attn_energy_H", energy_top(sv_BHN).sum(0))
        sv_BK = torch.linalg.svdvals(tokens_BNC.float())
        self._add("token_rank", effective_rank(sv_BK).sum())
        self._add("token_energy", energy_top(sv_BK).sum())
        self.n += attn_BHNN.shape[0]
        self.tokens, self.channels = tokens_BNC.shape[1], tokens_BNC.shape[2]

    def result(self, block: int) -> BlockStats:
        n, s = self.n, self.sums
        # sum over pairs i != j of <u_i, u_j> = ||sum u||^2 - n, as every u has norm 1
        similarity_H = (s["unit_HF"].pow(2).sum(-1) - n) / (n * (n - 1))
        mean_HF = s["map_HF"] / n
        mean_sq_H = mean_HF.pow(2).sum(-1)
        # E||A - mean||^2 = E||A||^2 - ||mean||^2
        rms_dev_H = (s["sq_norm_H"] / n - mean_sq_H).clamp_min(0).sqrt()
        consistency_H = 1 - rms_dev_H / mean_sq_H.sqrt()
        rank_H, energy_H = s["attn_rank_H"] / n, s["attn_energy_H"] / n
        heads = [
            HeadStats(
                similarity=float(similarity_H[h]),
                consistency=float(consistency_H[h]),
                attn_eff_rank=float(rank_H[h]),
                attn_energy_top=float(energy_H[h]),
            )
            for h in range(similarity_H.shape[0])
        ]
        token_rank = float(s["token_rank"]) / n
        return BlockStats(
            block=block,
            tokens=self.tokens,
            heads=heads,
            similarity=float(similarity_H.mean()),
            attn_rank_ratio=float(rank_H.mean()) / self.tokens,
            token_eff_rank=token_rank,
            token_rank_ratio=token_rank / min(self.tokens, self.channels),
            token_energy_top=float(s["token_energy"]) / n,
        )


def propose(
    blocks: Sequence[BlockStats],
    *,
    similarity_threshold: float,
    rank_drop: float,
    stage_every: int,
    max_shrink: int,
) -> tuple[CompressionConfig, list[str]]:
    """A config and the reasons for it, from per-block statistics.

    Tokens first shrink before the first block (from block 1 on) whose attention rank
    ratio is below ``rank_drop`` x the highest ratio of the blocks before it; then the
    patch tokens halve every ``stage_every`` blocks while at least ``1/max_shrink`` of
    them remain. Static attention goes to the leading run of blocks whose similarity is
    at least ``similarity_threshold``, cut off before the first reduction.
    """
    reasons: list[str] = []
    depth, num_tokens = len(blocks), blocks[0].tokens
    ratios = [b.attn_rank_ratio for b in blocks]
    start = next((i for i in range(1, depth) if ratios[i] < rank_drop * max(ratios[:i])), None)
    stages: list[TokenStage] = []
    if start is None:
        reasons.append(
            f"attention rank never falls below {rank_drop:.2f} x its earlier peak: "
            "no token reduction"
        )
    else:
        reasons.append(
            f"block {start}: attention rank ratio {ratios[start]:.3f} < {rank_drop:.2f} x "
            f"peak {max(ratios[:start]):.3f} of blocks 0-{start - 1}: tokens shrink from here"
        )
        patches, floor = num_tokens - 1, (num_tokens - 1) / max_shrink
        for layer in range(start, depth, stage_every):
            if math.ceil(patches / 2) < max(floor, 1):
                reasons.append(f"stop halving at {patches} patch tokens (>= 1/{max_shrink} kept)")
                break
            patches = math.ceil(patches / 2)
            stages.append(TokenStage(layer=layer, tokens=patches + 1))
        reasons.append(
            "halve patch tokens every "
            f"{stage_every} blocks: " + ", ".join(f"{s.tokens}@{s.layer}" for s in stages)
        )
    limit = stages[0].layer if stages else depth
    static: list[int] = []
    for b in blocks[:limit]:
        if b.similarity < similarity_threshold:
            reasons.append(
                f"block {b.block}: similarity {b.similarity:.3f} < {similarity_threshold:.2f}: "
                "static attention stops before it"
            )
            break
        static.append(b.block)
    if static:
        reasons.append(
            f"blocks {static[0]}-{static[-1]}: similarity across images >= "
            f"{similarity_threshold:.2f}: static attention"
        )
    if len(static) == limit < depth and blocks[limit].similarity >= similarity_threshold:
        reasons.append(
            f"block {limit} is similar too, but static blocks must precede the first reduction"
        )
    return CompressionConfig(static_layers=tuple(static), token_schedule=tuple(stages)), reasons


def _plot_layers(report: AnalysisReport, path: Path) -> None:
    """Per-block curves: the paper's picture (early similar, late low rank)."""
    stats = report.blocks
    blocks = [b.block for b in stats]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.plot(blocks, [b.similarity for b in stats], "o-", label="attention similarity")
    ax.plot(blocks, [b.attn_rank_ratio for b in stats], "s-", label="attention rank / N")
    ax.plot(blocks, [b.token_rank_ratio for b in stats], "^-", label="token rank / min(N,C)")
    for layer in report.compression.static_layers:
        ax.axvspan(layer - 0.5, layer + 0.5, color="tab:blue", alpha=0.08)
    for stage in report.compression.token_schedule:
        ax.axvline(stage.layer - 0.5, color="tab:red", ls="--", lw=1)
        ax.text(stage.layer - 0.45, 1.02, str(stage.tokens), color="tab:red", fontsize=8)
    ax.set(xlabel="block", ylim=(0, 1.1), title=f"proposed: {report.proposed}")
    ax.set_xticks(blocks)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_heads(report: AnalysisReport, path: Path) -> None:
    """Block x head heat maps of similarity and of the attention rank ratio."""
    sim = [[h.similarity for h in b.heads] for b in report.blocks]
    rank = [[h.attn_eff_rank / b.tokens for h in b.heads] for b in report.blocks]
    fig = Figure(figsize=(9, 0.35 * len(sim) + 1.8))
    for ax, data, title in zip(
        fig.subplots(1, 2), (sim, rank), ("similarity", "attention rank / N"), strict=True
    ):
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set(title=title, xlabel="head", ylabel="block")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.inference_mode()
def analyze(
    model: nn.Module,
    images: Sequence[Path],
    out_dir: Path,
    data_config: dict[str, Any],
    *,
    max_images: int = 64,
    batch_size: int = 16,
    device: str = "cpu",
    similarity_threshold: float = 0.6,
    rank_drop: float = 0.7,
    stage_every: int = 3,
    max_shrink: int = 8,
) -> AnalysisReport:
    """Measure a dense timm ViT on up to ``max_images`` images, write ``analysis.json`` and
    two PNGs to ``out_dir``, and propose a compression config (see :func:`propose`).

    Default thresholds: measured on DeiT-Tiny (blocks 0-3 have mean similarity 0.64-0.88,
    block 4 0.49; attention rank falls to ~0.67 of its peak at block 3, ~0.25 by block 5)
    they give ``static=0-2;tokens=99@3,50@6,26@9``, the shape of the paper's pyramid.
    """
    paths = list(images)[:max_images]
    if len(paths) < 2:
        raise ValueError("similarity across images needs at least 2 images")
    dev = torch.device(device)
    model = model.eval().to(dev)
    depth = len(model.blocks)
    accs = [_BlockAccumulator() for _ in range(depth)]
    loader = DataLoader(EvalImages(paths, eval_transform(data_config)), batch_size=batch_size)
    for x_B3HW, _ in tqdm(loader, desc="analyze", unit="batch", leave=False):
        x_B3HW = x_B3HW.to(dev)
        maps = capture_attention(model, x_B3HW, range(depth))
        tokens = capture_tokens(model, x_B3HW, range(depth))
        for i, acc in enumerate(accs):
            acc.add(maps[i].cpu(), tokens[i].cpu())
    stats = [acc.result(i) for i, acc in enumerate(accs)]
    thresholds = {
        "similarity_threshold": similarity_threshold,
        "rank_drop": rank_drop,
        "stage_every": stage_every,
        "max_shrink": max_shrink,
    }
    cfg, reasons = propose(
        stats,
        similarity_threshold=similarity_threshold,
        rank_drop=rank_drop,
        stage_every=stage_every,
        max_shrink=max_shrink,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [REPORT_FILE, "layers.png", "heads.png"]
    report = AnalysisReport(
        n_images=len(paths),
        blocks=stats,
        compression=cfg,
        proposed=str(cfg),
        reasons=reasons,
        thresholds=thresholds,
        files=[str(out_dir / f) for f in files],
    )
    _plot_layers(report, out_dir / "layers.png")
    _plot_heads(report, out_dir / "heads.png")
    (out_dir / REPORT_FILE).write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    return report

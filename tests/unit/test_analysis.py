"""Attention analysis: the statistics mean what they say, the proposal follows the
measured curves, and a run on a tiny ViT writes JSON + plots with a usable config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.train.analysis import (
    REPORT_FILE,
    BlockStats,
    HeadStats,
    analyze,
    effective_rank,
    energy_top,
    propose,
)
from app.vit.builder import compress
from app.vit.config import CompressionConfig
from tests.unit.test_evaluate import DATA_CONFIG, tiny_teacher, write_images


def block(i: int, similarity: float, rank_ratio: float, tokens: int = 197) -> BlockStats:
    rank = rank_ratio * tokens
    head = HeadStats(similarity=similarity, consistency=0, attn_eff_rank=rank, attn_energy_top=0.5)
    return BlockStats(
        block=i,
        tokens=tokens,
        heads=[head],
        similarity=similarity,
        attn_rank_ratio=rank_ratio,
        token_eff_rank=100.0,
        token_rank_ratio=0.5,
        token_energy_top=0.8,
    )


def test_effective_rank_and_energy() -> None:
    flat, single = torch.ones(8), torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])
    assert float(effective_rank(flat)) == pytest.approx(8.0)
    assert float(effective_rank(single)) == pytest.approx(1.0)
    assert float(energy_top(single)) == pytest.approx(1.0)
    assert float(energy_top(flat)) == pytest.approx(1 / 8)  # top 10 % of 8 = 1 value


def test_proposal_follows_deit_tiny_curves() -> None:
    """Per-block means measured on DeiT-Tiny (64 imagenet-dev photos)."""
    sims = [0.64, 0.79, 0.88, 0.69, 0.49, 0.73, 0.54, 0.53, 0.52, 0.59, 0.59, 0.21]
    ranks = [0.45, 0.65, 0.69, 0.46, 0.38, 0.17, 0.18, 0.14, 0.10, 0.08, 0.05, 0.03]
    stats = [block(i, s, r) for i, (s, r) in enumerate(zip(sims, ranks, strict=True))]
    thresholds = dict(similarity_threshold=0.6, rank_drop=0.7, stage_every=3, max_shrink=8)
    cfg, reasons = propose(stats, **thresholds)
    assert cfg == CompressionConfig.parse("static=0-2;tokens=99@3,50@6,26@9")
    assert any("block 3" in r for r in reasons)
    stricter, _ = propose(stats, **{**thresholds, "similarity_threshold": 0.7})
    assert stricter.static_layers == () and stricter.token_schedule == cfg.token_schedule
    flat, reasons = propose([block(i, 0.3, 0.5) for i in range(12)], **thresholds)
    assert flat == CompressionConfig() and "no token reduction" in reasons[0]


def test_analyze_tiny_vit(tmp_path: Path) -> None:
    model = tiny_teacher()
    photos = write_images(tmp_path / "photos", 7)
    report = analyze(model, photos, tmp_path / "out", DATA_CONFIG, max_images=6, batch_size=4)
    assert report.n_images == 6 and len(report.blocks) == 4
    for stats in report.blocks:
        assert stats.tokens == 17 and len(stats.heads) == 4
        assert -1.0 <= stats.similarity <= 1.0
        assert 1.0 <= min(h.attn_eff_rank for h in stats.heads) <= 17.0
        assert 0.0 < stats.token_energy_top <= 1.0
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert CompressionConfig.model_validate(saved["compression"]) == report.compression
    assert saved["proposed"] == str(report.compression) and saved["reasons"]
    for name in ("layers.png", "heads.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student = compress(model, report.compression)  # the proposal builds and runs
    assert student(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

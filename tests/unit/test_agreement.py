"""Agreement figures against values worked out by hand or with plain numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.experiments.agreement import agreement, summarize


def numpy_figures(p: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """The textbook definitions, written independently of the code under test."""
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log(a[mask] / b[mask])))

    return {
        "total_variation": 0.5 * float(np.abs(p - q).sum()),
        "js_divergence": (kl(p, m) + kl(q, m)) / 2 / math.log(2),
        "symmetric_kl": kl(p, q) + kl(q, p),
    }


def test_identical_vectors_agree_fully_at_distance_zero():
    p = torch.softmax(torch.randn(1000, generator=torch.Generator().manual_seed(0)), 0)
    a = agreement(p, p.clone())
    assert a.top1_match and a.top5_overlap == 1.0
    assert a.total_variation == a.js_divergence == a.symmetric_kl == 0.0


def test_disjoint_one_hot_vectors_are_maximally_apart():
    p, q = torch.zeros(10), torch.zeros(10)
    p[0], q[1] = 1.0, 1.0
    a = agreement(p, q)
    assert not a.top1_match
    assert a.total_variation == pytest.approx(1.0)
    assert a.js_divergence == pytest.approx(1.0)  # one bit: the maximum
    assert math.isfinite(a.symmetric_kl) and a.symmetric_kl > 20  # smoothed, not infinite


def test_two_class_case_worked_by_hand():
    a = agreement(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1]))
    assert a.total_variation == pytest.approx(0.4)
    # KL(p||q) + KL(q||p) = (0.5-0.9)·ln(0.5/0.9) + (0.5-0.1)·ln(0.5/0.1)
    assert a.symmetric_kl == pytest.approx(-0.4 * math.log(0.5 / 0.9) + 0.4 * math.log(5), 1e-6)
    assert a.top5_overlap == 1.0  # k = 2 classes: both sets are {0, 1}


@pytest.mark.parametrize("seed", range(5))
def test_random_vectors_match_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(1000, generator=g), 0)
    q = torch.softmax(3 * torch.randn(1000, generator=g), 0)
    a = agreement(p, q)
    expected = numpy_figures(p.double().numpy(), q.double().numpy())
    assert a.total_variation == pytest.approx(expected["total_variation"], rel=1e-9)
    assert a.js_divergence == pytest.approx(expected["js_divergence"], rel=1e-9)
    # the ε-smoothing that keeps KL finite moves it a little where probabilities are tiny
    assert a.symmetric_kl == pytest.approx(expected["symmetric_kl"], rel=1e-3)
    assert agreement(q, p).total_variation == pytest.approx(a.total_variation)
    assert agreement(q, p).js_divergence == pytest.approx(a.js_divergence)


def test_top5_overlap_counts_shared_classes():
    p = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.09, 0.0, 0.0, 0.0, 0.08, 0.08])
    q = torch.tensor([0.3, 0.2, 0.15, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.15])
    a = agreement(p / p.sum(), q / q.sum())
    assert a.top1_match
    assert a.top5_overlap == pytest.approx(3 / 5)  # {0, 1, 2} of {0..4} vs {0, 1, 2, 8, 9}


def test_shapes_must_match():
    with pytest.raises(ValueError):
        agreement(torch.ones(3) / 3, torch.ones(4) / 4)


def test_summary_is_the_mean_over_images():
    same = agreement(torch.tensor([0.7, 0.3]), torch.tensor([0.7, 0.3]))
    other = agreement(torch.tensor([0.7, 0.3]), torch.tensor([0.2, 0.8]))
    s = summarize([same, other, other, other])
    assert s.images == 4 and s.top1_agreement == 0.25
    assert s.total_variation == pytest.approx(3 * 0.5 / 4)
    with pytest.raises(ValueError):
        summarize([])

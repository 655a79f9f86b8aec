"""CUDA graphs in the predict stage: the buckets (CPU), and on a GPU that a graphed forward
is the eager forward at every batch size, and that a model that cannot be captured still
serves eagerly."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from torch import nn

from app.serving.cuda_graphs import GraphedForward, bucket_sizes
from app.serving.runner import ModelRunner
from tests.helpers import TINY_VIT

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")


@pytest.mark.parametrize("max_batch", [1, 5, 32, 100, 256])
def test_buckets_cover_every_batch_with_at_most_half_again_padding(max_batch: int) -> None:
    buckets = bucket_sizes(max_batch)
    assert buckets[0] == 1 and buckets[-1] == max_batch
    assert list(buckets) == sorted(set(buckets))
    for n in range(1, max_batch + 1):
        bucket = next(b for b in buckets if b >= n)
        assert bucket <= max(n * 1.5, n + 1)


def test_cpu_runner_ignores_graph_buckets() -> None:
    runner = ModelRunner(
        nn.Linear(4, 2),
        device=torch.device("cpu"),
        dtype=torch.float32,
        input_size=(4,),
        graph_buckets=(1, 2),
    )
    runner.warm_up((2,))
    assert runner.graph_buckets == () and runner.graphed is None


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", num_classes=10, **TINY_VIT).eval()


@pytest.mark.gpu
@needs_cuda
def test_graphed_forward_equals_eager_at_every_batch_size() -> None:
    device = torch.device("cuda")
    model = tiny_vit().to(device, torch.bfloat16)
    graphed = GraphedForward(
        model, device=device, dtype=torch.bfloat16, input_size=(3, 32, 32), buckets=(1, 4, 8)
    )
    with torch.inference_mode():
        for n in (1, 3, 4, 7, 8):
            x = torch.randn(n, 3, 32, 32, device=device, dtype=torch.bfloat16)
            got, expected = graphed(x).clone(), model(x)
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
        with pytest.raises(ValueError, match="larger than the largest graph"):
            graphed(torch.randn(9, 3, 32, 32, device=device, dtype=torch.bfloat16))


@pytest.mark.gpu
@needs_cuda
def test_runner_with_graphs_predicts_as_the_eager_runner() -> None:
    common = {"device": torch.device("cuda"), "dtype": torch.bfloat16, "input_size": (3, 32, 32)}
    graphed = ModelRunner(tiny_vit(), graph_buckets=bucket_sizes(16), **common)
    eager = ModelRunner(tiny_vit(), **common)
    graphed.warm_up((1, 16))
    assert graphed.graphed is not None
    x = torch.randn(11, 3, 32, 32)
    torch.testing.assert_close(graphed.predict(x), eager.predict(x), atol=0, rtol=0)


class HostSync(nn.Module):
    """Reads a value on the host mid-forward, which a CUDA graph cannot capture."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * float(x.sum() > 0)


@pytest.mark.gpu
@needs_cuda
def test_a_model_that_cannot_be_captured_serves_eagerly(caplog) -> None:
    runner = ModelRunner(
        HostSync(),
        device=torch.device("cuda"),
        dtype=torch.float32,
        input_size=(2,),
        graph_buckets=(1, 2),
    )
    with caplog.at_level(logging.WARNING):
        runner.warm_up((2,))
    assert runner.graphed is None and "runs eagerly" in caplog.text
    torch.testing.assert_close(runner.predict(torch.ones(2, 2)), torch.full((2, 2), 0.5))
    torch.randn(4, device="cuda")  # the aborted capture left the device's RNG usable

"""A model's forward as CUDA graphs, one per batch-size bucket: one launch per batch.

Launching an eager ViT forward is a few hundred kernel launches, each needing the GIL. In a
server the inference thread shares the GIL with the event loop (HTTP parsing) and the
decode stage, so it waits for it between launches: on an H200, a DeiT-S batch of 21 took
16 ms of wall time, against 15 ms for a batch of 249. A graph replay is one call, so the
forward's wall time becomes its GPU time.

Graphs have fixed shapes, so a batch runs in the smallest bucket that holds it, padded with
whatever the bucket's input buffer held before (each row is independent, the extra rows
are never read). Buckets step by at most 1.5x, so padding costs at most a third more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x between), then the maximum."""
    sizes = {1}
    power = 2
    while power < max_batch_size:
        sizes.update({power, power * 3 // 2})
        power *= 2
    return tuple(sorted(size for size in sizes if size < max_batch_size)) + (max_batch_size,)


def end_rng_capture(device: torch.device) -> None:
    """Take the device's random generator out of capture mode after an aborted capture.

    A capture that fails never reaches the step that ends the generator's capture, and
    then every random op on the device raises ("Offset increment outside graph capture",
    torch 2.11). A capture of one trivial kernel begins and ends it again, cleanly.
    """
    with torch.cuda.device(device):
        scratch = torch.zeros(1, device=device)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            scratch.add_(1)


class GraphedForward:
    """``forward`` captured once per bucket on ``device``; call it like the forward.

    All graphs share one memory pool and one input buffer (a bucket's input is the buffer's
    first rows), so their cost is about one largest-batch forward. Replays must not overlap
    and a result must be read before the next call: the runner's single inference thread
    does both, as :meth:`~app.serving.runner.ModelRunner.predict` copies it to the host.
    """

    def __init__(
        self,
        forward: Forward,
        *,
        device: torch.device,
        dtype: torch.dtype,
        input_size: Sequence[int],
        buckets: Sequence[int],
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.buckets, self.device = tuple(sorted(buckets)), device
        self._inputs = torch.zeros(self.buckets[-1], *input_size, device=device, dtype=dtype)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        side = torch.cuda.Stream(device)
        with torch.inference_mode(), torch.cuda.device(device):  # streams on the right GPU
            for size in reversed(self.buckets):  # largest first: the pool grows once
                x = self._inputs[:size]
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm-up off the capture, as CUDA requires
                    forward(x)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                try:
                    # thread_local: other threads (a model already serving) keep using CUDA
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        out = forward(x)
                except Exception:
                    end_rng_capture(device)
                    raise
                pool = graph.pool()
                self._graphs[size] = (graph, out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, ...] -> forward's output [n, ...]``, valid until the next call."""
        n = x.shape[0]
        size = next((s for s in self.buckets if s >= n), None)
        if size is None:
            raise ValueError(f"batch of {n} is larger than the largest graph ({self.buckets[-1]})")
        graph, out = self._graphs[size]
        with torch.cuda.device(self.device):  # a replica on cuda:1 replays there
            self._inputs[:n].copy_(x)
            graph.replay()
        return out[:n]

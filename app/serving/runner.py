"""Predict stage: one model on one device, batch in → probabilities out.

CUDA runs in bfloat16 by default, CPU in float32, and on CUDA the forward is replayed from
CUDA graphs (:mod:`app.serving.cuda_graphs`) captured at warm-up. An eager CUDA
out-of-memory error splits the batch in halves and retries, so one oversized batch never
takes the model down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from app.serving.cuda_graphs import GraphedForward

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class ModelRunner:
    """Owns a module on its device; ``predict`` is called from one inference thread."""

    def __init__(
        self,
        module: nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        input_size: tuple[int, int, int],
        compile: bool = False,
        graph_buckets: Sequence[int] = (),
    ) -> None:
        """``graph_buckets``: batch sizes to capture as CUDA graphs at warm-up (CUDA only;
        empty: eager). A model that cannot be captured stays eager, with a warning."""
        self.device, self.dtype, self.input_size = device, dtype, input_size
        module = module.eval().to(device=device, dtype=dtype)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(module) if compile else module
        )
        self.graph_buckets = tuple(graph_buckets) if device.type == "cuda" else ()
        self.graphed: GraphedForward | None = None

    @torch.inference_mode()
    def predict(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] (any device, any float dtype) → float32 probabilities [B, classes]
        on the CPU. The decode stage hands them over already on the device, in its dtype."""
        try:
            x = images_B3HW.to(self.device, non_blocking=True).to(self.dtype)
            logits = (self.graphed or self.forward)(x)
            return logits.float().softmax(dim=-1).cpu()
        except Exception as exc:
            if not is_out_of_memory(exc) or images_B3HW.shape[0] == 1:
                raise
            half = images_B3HW.shape[0] // 2
            log.warning("out of memory at batch %d: retrying as two halves", len(images_B3HW))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return torch.cat([self.predict(images_B3HW[:half]), self.predict(images_B3HW[half:])])

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run random inputs once per batch size: kernels selected, compile done, graphs
        captured, before traffic."""
        for size in batch_sizes:
            self.predict(torch.randn(size, *self.input_size))
        if self.graph_buckets and self.graphed is None:
            try:
                self.graphed = GraphedForward(
                    self.forward,
                    device=self.device,
                    dtype=self.dtype,
                    input_size=self.input_size,
                    buckets=self.graph_buckets,
                )
            except Exception as exc:  # noqa: BLE001 - eager still serves, only slower
                log.warning("CUDA graph capture failed (%s); the model runs eagerly", exc)
                return
            self.predict(torch.randn(batch_sizes[-1], *self.input_size))

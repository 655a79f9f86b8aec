"""The models a sweep times: a seeded random dense DeiT and its compressed copies.

Shared by the whole-model sweep (:mod:`app.bench.models`) and the per-layer section
(:mod:`app.bench.layers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from app.vit.builder import CompressedViT, compress, create_model
from app.vit.config import CompressionConfig
from app.vit.static_attention import StaticAttention
from app.vit.token_pyramid import TokenAggregation

DENSE = "dense"


@dataclass
class ArchModels:
    """CPU fp32 masters of one architecture; each timing group works on device copies."""

    arch: str
    dense: VisionTransformer
    compressed: dict[str, CompressedViT]  # canonical config text -> model
    input_shape: tuple[int, ...] = field(init=False)
    num_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        embed = self.dense.patch_embed
        self.input_shape = (embed.proj.in_channels, *embed.img_size)
        self.num_tokens = embed.num_patches + self.dense.num_prefix_tokens

    def all(self) -> dict[str, nn.Module]:
        return {DENSE: self.dense, **self.compressed}


@torch.no_grad()
def randomize_compressed_layers(model: nn.Module, seed: int) -> None:
    """Give static matrices and aggregation weights random row-stochastic values.

    A fresh config holds a uniform matrix and a mostly-zero pooling matrix; zeros and
    constants can run faster than trained values on a GPU, and calibrated attention or a
    fine-tuned aggregation is a dense row-stochastic matrix like this one.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, StaticAttention):
            param = module.attn_matrix
        elif isinstance(module, TokenAggregation):
            param = module.weight
        else:
            continue
        param.copy_(torch.randn(param.shape, generator=gen).softmax(dim=-1))


def build_arch_models(
    arch: str, configs: Iterable[str], arch_kwargs: Mapping[str, Any] | None = None
) -> ArchModels:
    """Seeded random dense model of ``arch`` plus one compressed copy per config text."""
    torch.manual_seed(0)
    dense = create_model(arch, **dict(arch_kwargs or {})).eval()
    compressed = {}
    for i, text in enumerate(configs):
        model = compress(dense, CompressionConfig.parse(text)).eval()
        randomize_compressed_layers(model, seed=i)
        compressed[text] = model
    return ArchModels(arch, dense, compressed)


def release(device: torch.device, compiled: bool) -> None:
    """Drop compiled graphs and cached blocks so one group cannot weigh on the next."""
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(value: float | None, spec: str = ".1f") -> str:
    """A figure for a table; "-" where there is none."""
    return "-" if value is None else format(value, spec)

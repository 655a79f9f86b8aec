"""Patch embedding as one matrix product instead of a strided convolution.

A ViT's patch embedding is a ``Conv2d`` whose kernel equals its stride: every output is the
dot product of one non-overlapping ``p x p`` patch with a filter, i.e. a plain GEMM on the
patchified image. cuDNN does not see it that way: on an H200 (bf16, batch 256) DeiT-S's
embedding ran cuDNN's ``implicit_convolve_sgemm`` for 1.65 ms of an 8.8 ms compiled forward
-- a fifth of the dense model and a third of a compressed one, for 30 GFLOP a GEMM does in
well under 0.1 ms. :class:`PatchProjection` reshapes the image into patches and runs
``F.linear`` with the same weights (same parameter names and shapes, so checkpoints load
unchanged), returning the convolution's ``[B, C, H/p, W/p]`` layout as a view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchProjection(nn.Module):
    """Drop-in for a ``Conv2d(kernel_size=p, stride=p)`` with no padding, dilation or groups."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not is_patchify_conv(conv):
            raise ValueError(f"not a patchify convolution (kernel == stride, no padding): {conv}")
        self.patch_h, self.patch_w = conv.kernel_size
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = conv.weight  # [C, Cin, p, p]: the conv's own parameter, same name
        self.bias = conv.bias

    def forward(self, x_BIHW: torch.Tensor) -> torch.Tensor:
        """``[B, Cin, H, W] -> [B, C, H/p, W/p]`` (a view of the GEMM's ``[B, P, C]`` output,
        which timm's ``flatten(2).transpose(1, 2)`` turns back without a copy)."""
        B, cin, H, W = x_BIHW.shape
        ph, pw = self.patch_h, self.patch_w
        gh, gw = H // ph, W // pw  # a conv drops a remainder the same way
        x_BIHW = x_BIHW[..., : gh * ph, : gw * pw]
        patches_BPK = (
            x_BIHW.reshape(B, cin, gh, ph, gw, pw)
            .permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, Cin, ph, pw]: the filter's (Cin, y, x) order
            .reshape(B, gh * gw, cin * ph * pw)
        )
        out_BPC = F.linear(patches_BPK, self.weight.flatten(1), self.bias)
        return out_BPC.transpose(1, 2).unflatten(2, (gh, gw))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, patch=({self.patch_h}, {self.patch_w})"


def is_patchify_conv(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == module.stride
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def use_patch_gemm(model: nn.Module) -> nn.Module:
    """Swap ``model.patch_embed.proj`` for a :class:`PatchProjection` (in place) when it is a
    patchify convolution; anything else is left as it is. Returns ``model``."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and is_patchify_conv(getattr(embed, "proj", None)):
        embed.proj = PatchProjection(embed.proj)
    return model

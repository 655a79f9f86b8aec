"""The eval transform's Resize + CenterCrop for a whole batch of differently sized images,
as two batched matrix products.

An antialiased resize is separable: every output row is a fixed weighted sum of input rows,
and every output column of input columns. With the crop folded in, image ``k``'s result is
``W_rows[k] @ image[k] @ W_cols[k]ᵀ``, with ``W_rows`` ``[224, H]`` and ``W_cols`` ``[224, W]``.
Padding the images to one canvas (and the weights with zero columns) makes that two
``matmul`` calls for the batch, where resizing image by image costs one interpolate per
image: ImageNet photos rarely share a size, and on a GPU those small launches took as long
as nvjpeg's decode itself. The weights are torchvision's (``F.interpolate(antialias=True)``:
the same filter, support and normalisation), so results match it to float rounding: at
most one grey level on a few pixels after rounding to whole levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torchvision import transforms

# Most canvas pixels (images x max height x max width) one matrix product takes: a batch
# holding a few huge photos is split, so one 12-megapixel image does not pad 255 others
# (32 M pixels: a 384 MB float canvas).
MAX_CANVAS_PIXELS = 32 * 1024 * 1024


def _bilinear(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """torch's antialiasing cubic (a = -0.5, as PIL), not the a = -0.75 of plain bicubic."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}  # kernel, half-support


@lru_cache(maxsize=4096)
def axis_weights(in_size: int, out_size: int, start: int, count: int, mode: str) -> np.ndarray:
    """``[count, in_size]`` float32: output pixels ``start .. start+count`` of an antialiased
    resize from ``in_size`` to ``out_size`` along one axis, as torch computes them."""
    kernel, half_support = FILTERS[mode]
    scale = in_size / out_size
    support = half_support * max(scale, 1.0)
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((count, in_size), dtype=np.float64)
    for row, i in enumerate(range(start, start + count)):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = kernel((np.arange(lo, hi) - center + 0.5) * inv_scale)
        total = taps.sum()
        weights[row, lo:hi] = taps / total if total != 0 else taps
    return weights.astype(np.float32)


class BatchResizeCrop:
    """uint8 images ``[3, H, W]`` of any sizes → float crops ``[N, 3, h, w]`` in whole grey
    levels 0..255, on the images' device: ``resize_crop`` (Resize + CenterCrop) batched."""

    def __init__(self, resize_crop: transforms.Compose) -> None:
        resize, crop = resize_crop.transforms
        if not isinstance(resize, transforms.Resize) or not isinstance(crop, transforms.CenterCrop):
            raise TypeError(f"expected Resize + CenterCrop, got {resize_crop}")
        if resize.max_size is not None:
            raise ValueError("Resize(max_size=...) is not supported on the GPU path")
        self.mode = resize.interpolation.value
        if self.mode not in FILTERS:
            raise ValueError(f"interpolation {self.mode!r} is not supported on the GPU path")
        self.size, self.crop = resize.size, tuple(crop.size)

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's output size: an int (or 1-list) sets the shorter side."""
        size = [self.size] if isinstance(self.size, int) else list(self.size)
        if len(size) == 2:
            return size[0], size[1]
        short, long = sorted((height, width))
        new_short, new_long = size[0], int(size[0] * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def _weights(self, in_size: int, out_size: int, crop: int) -> np.ndarray:
        if crop > out_size:
            raise ValueError(f"crop {self.crop} is larger than the resized size {out_size}")
        start = int(round((out_size - crop) / 2.0))
        return axis_weights(in_size, out_size, start, crop, self.mode)

    def __call__(self, images_3HW: Sequence[torch.Tensor]) -> torch.Tensor:
        out_N3hw = torch.empty(len(images_3HW), 3, *self.crop, device=images_3HW[0].device)
        for chunk in _chunks([tuple(image.shape[-2:]) for image in images_3HW]):
            out_N3hw[chunk] = self._resize_crop([images_3HW[k] for k in chunk])
        return out_N3hw.clamp_(0, 255).round_()

    def _resize_crop(self, images_3HW: Sequence[torch.Tensor]) -> torch.Tensor:
        (ch, cw), device = self.crop, images_3HW[0].device
        height = max(image.shape[-2] for image in images_3HW)
        width = max(image.shape[-1] for image in images_3HW)
        canvas_N3HW = torch.zeros(len(images_3HW), 3, height, width, device=device)
        rows_NhH = torch.zeros(len(images_3HW), 1, ch, height)
        cols_NWw = torch.zeros(len(images_3HW), 1, width, cw)
        for k, image in enumerate(images_3HW):
            h, w = image.shape[-2:]
            nh, nw = self.resized(h, w)
            canvas_N3HW[k, :, :h, :w] = image
            rows_NhH[k, 0, :, :h] = torch.from_numpy(self._weights(h, nh, ch))
            cols_NWw[k, 0, :w] = torch.from_numpy(self._weights(w, nw, cw).T)
        rows_NhH = rows_NhH.to(device, non_blocking=True)
        cols_NWw = cols_NWw.to(device, non_blocking=True)
        return rows_NhH @ canvas_N3HW @ cols_NWw  # [N,1,h,H] @ [N,3,H,W] @ [N,1,W,w]


def _chunks(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Image indices in groups whose padded canvas stays under ``MAX_CANVAS_PIXELS``
    (smallest images first, so similar sizes pad together)."""
    chunks: list[list[int]] = []
    height = width = 0
    for k in sorted(range(len(sizes)), key=lambda k: math.prod(sizes[k])):
        h, w = max(height, sizes[k][0]), max(width, sizes[k][1])
        if chunks and (len(chunks[-1]) + 1) * h * w <= MAX_CANVAS_PIXELS:
            chunks[-1].append(k)
            height, width = h, w
        else:
            chunks.append([k])
            height, width = sizes[k]
    return chunks

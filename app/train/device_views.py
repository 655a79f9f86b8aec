"""Distillation views made on the training device instead of in CPU loader workers.

On a GPU, a merged DeiT-Tiny student and its teacher take a few milliseconds a step at 256
views, while timm's PIL pipeline (a crop, a flip and colour jitter per view) takes ~0.4 s
of CPU a step: CPU workers set the pace, and several runs side by side share one host's
cores. Here the photo pool lives on the device once, as one padded canvas, and every step
is a handful of batched kernels: ``torchvision.ops.roi_align`` crops and resizes all views
at once (bilinear, averaging several samples per output pixel when it shrinks, as an
antialiasing resize does), then flips, colour jitter and mixes run on the whole batch.

The same views as the loader's in distribution, not pixel for pixel:
RandomResizedCrop's sampling (ten tries, then a centre crop), a horizontal flip,
brightness, contrast and saturation in a random order per view (hue untouched, as timm's
``color_jitter`` float), and mixup / CutMix of a second photo. RandAugment has no device
form and is refused. Every random number of step ``s`` comes from one generator seeded by
``(seed, s)`` for the whole global batch, so a resumed run or a run split over DDP ranks
makes the views one uninterrupted process would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import roi_align

from app.train.data import ViewAugment, ViewOrder, derive_seed, load_rgb

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's "L" and torchvision
ASPECT = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios
CROP_TRIES = 10


def crop_boxes(
    rng: np.random.Generator, hw_V2: np.ndarray, scale: tuple[float, float]
) -> np.ndarray:
    """RandomResizedCrop's boxes ``[V, 4]`` (x0, y0, x1, y1 in pixels) for photos of sizes
    ``hw_V2``: an area share in ``scale`` and a log-uniform aspect in 3/4..4/3, the first of
    ten tries that fits, else a centre crop at the nearest allowed aspect."""
    V = len(hw_V2)
    h_V, w_V = hw_V2[:, 0].astype(np.float64), hw_V2[:, 1].astype(np.float64)
    area_VT = (h_V * w_V)[:, None] * rng.uniform(*scale, size=(V, CROP_TRIES))
    aspect_VT = np.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1]), (V, CROP_TRIES)))
    cw_VT = np.round(np.sqrt(area_VT * aspect_VT))
    ch_VT = np.round(np.sqrt(area_VT / aspect_VT))
    fits_VT = (cw_VT > 0) & (cw_VT <= w_V[:, None]) & (ch_VT > 0) & (ch_VT <= h_V[:, None])
    first_V = fits_VT.argmax(axis=1)
    rows = np.arange(V)
    cw_V, ch_V = cw_VT[rows, first_V], ch_VT[rows, first_V]
    # offsets: uniform over the integer positions that keep the crop inside
    u0_V, u1_V = rng.random(V), rng.random(V)
    y0_V = np.floor(u0_V * (h_V - ch_V + 1))
    x0_V = np.floor(u1_V * (w_V - cw_V + 1))
    # fallback: the whole photo, cut to the nearest allowed aspect, centred
    ratio_V = w_V / h_V
    fw_V = np.where(ratio_V > ASPECT[1], np.round(h_V * ASPECT[1]), w_V)
    fh_V = np.where(ratio_V < ASPECT[0], np.round(w_V / ASPECT[0]), h_V)
    fh_V = np.minimum(fh_V, h_V)
    none_V = ~fits_VT.any(axis=1)
    cw_V, ch_V = np.where(none_V, fw_V, cw_V), np.where(none_V, fh_V, ch_V)
    x0_V = np.where(none_V, np.floor((w_V - cw_V) / 2), x0_V)
    y0_V = np.where(none_V, np.floor((h_V - ch_V) / 2), y0_V)
    return np.stack([x0_V, y0_V, x0_V + cw_V, y0_V + ch_V], axis=1)


def _gray(x_V3HW: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GRAY_WEIGHTS, dtype=x_V3HW.dtype, device=x_V3HW.device).view(1, 3, 1, 1)
    return (x_V3HW * w).sum(dim=1, keepdim=True)


def jitter_colours(
    x_V3HW: torch.Tensor, factors_V3: torch.Tensor, order_V3: torch.Tensor
) -> torch.Tensor:
    """Brightness, contrast and saturation (``factors_V3``, 1 = unchanged) in each view's
    order (``order_V3``, a permutation of 0..2), clamped to 0..255 after each, as
    torchvision's ColorJitter on images in 0..255."""
    for t in range(3):
        op_V = order_V3[:, t].view(-1, 1, 1, 1)
        f_V = factors_V3.gather(1, order_V3[:, t : t + 1]).view(-1, 1, 1, 1)
        mean_V = _gray(x_V3HW).mean(dim=(2, 3), keepdim=True)
        anchor = torch.where(op_V == 0, 0.0, torch.where(op_V == 1, mean_V, _gray(x_V3HW)))
        x_V3HW = (f_V * x_V3HW + (1 - f_V) * anchor).clamp_(0, 255)
    return x_V3HW


class DeviceViews:
    """The view stream of :class:`app.train.data.DistillViews`, made on ``device``.

    Photos are decoded once, turned landscape (a portrait photo is stored transposed and
    its views transposed back) and padded into one float32 ``[P, 3, H, W]`` canvas: 1,543
    photos of short side <= 256 and long side <= 608 take ~2.9 GB.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        data_config: dict[str, Any],
        augment: ViewAugment,
        *,
        seed: int,
        views: int,
        device: torch.device,
    ) -> None:
        if augment.rand_augment is not None:
            raise ValueError("views made on the device have no RandAugment: set rand_augment null")
        self.order = ViewOrder(len(paths), seed=seed, views=views)
        self.augment, self.seed, self.device = augment, seed, device
        self.size = int(data_config["input_size"][-1])
        photos = [torch.from_numpy(np.array(load_rgb(p))).permute(2, 0, 1) for p in paths]
        self.transposed_P = torch.tensor([p.shape[1] > p.shape[2] for p in photos])
        photos = [
            p.transpose(1, 2) if t else p for p, t in zip(photos, self.transposed_P, strict=True)
        ]
        self.hw_P2 = np.array([p.shape[1:] for p in photos])  # stored (landscape) sizes
        # float32: the CPU path's arithmetic on another device; in half precision the boxes
        # (photo index first, in the canvas's dtype) would be exact only up to 2048 photos
        H, W = self.hw_P2.max(axis=0)
        self.canvas_P3HW = torch.zeros(len(photos), 3, H, W, device=device)
        for i, p in enumerate(photos):
            self.canvas_P3HW[i, :, : p.shape[1], : p.shape[2]] = p.to(device, torch.float32)

    def _crops(self, rng: np.random.Generator, photo_V: np.ndarray) -> torch.Tensor:
        """A random resized crop of each listed photo, flipped or not, ``[V, 3, S, S]``."""
        transposed_V = self.transposed_P[photo_V].numpy()
        hw_V2 = self.hw_P2[photo_V]
        upright_V2 = np.where(transposed_V[:, None], hw_V2[:, ::-1], hw_V2)
        box_V4 = crop_boxes(rng, upright_V2, self.augment.crop_scale)
        # a transposed photo's box: x and y swap
        box_V4 = np.where(transposed_V[:, None], box_V4[:, [1, 0, 3, 2]], box_V4)
        flip_V = rng.random(len(photo_V)) < self.augment.hflip
        rois_V5 = torch.tensor(
            np.concatenate([photo_V[:, None], box_V4], axis=1),
            dtype=self.canvas_P3HW.dtype,
            device=self.device,
        )
        # aligned: pixel i covers [i, i + 1), so box edges are pixel edges; adaptive sampling
        crops_V3SS = roi_align(self.canvas_P3HW, rois_V5, self.size, aligned=True)
        transposed = torch.from_numpy(transposed_V).to(self.device).view(-1, 1, 1, 1)
        crops_V3SS = torch.where(transposed, crops_V3SS.transpose(2, 3), crops_V3SS)
        flip = torch.from_numpy(flip_V).to(self.device).view(-1, 1, 1, 1)
        return torch.where(flip, crops_V3SS.flip(3), crops_V3SS)

    def _jittered(self, rng: np.random.Generator, photo_V: np.ndarray) -> torch.Tensor:
        crops_V3SS = self._crops(rng, photo_V)
        j = self.augment.color_jitter
        if j <= 0:
            return crops_V3SS
        V = len(photo_V)
        factors_V3 = rng.uniform(max(0.0, 1 - j), 1 + j, size=(V, 3))
        order_V3 = np.argsort(rng.random((V, 3)), axis=1)
        return jitter_colours(
            crops_V3SS,
            torch.tensor(factors_V3, dtype=torch.float32, device=self.device),
            torch.from_numpy(order_V3).to(self.device),
        )

    def _mixed(self, rng: np.random.Generator, views_V3SS: torch.Tensor) -> torch.Tensor:
        """Mixup or CutMix with a second photo's view, for a ``mix_prob`` share of views."""
        a, kinds = self.augment, self.augment.mix_kinds()
        V = views_V3SS.shape[0]
        mixed_V = rng.random(V) < a.mix_prob
        if not kinds or not mixed_V.any():
            return views_V3SS
        rows = np.flatnonzero(mixed_V)
        partners = self._jittered(rng, rng.integers(self.order.photos, size=len(rows)))
        kind_M = rng.integers(len(kinds), size=len(rows))
        keep_M = np.ones(len(rows))  # share of the view kept where mixup blends
        box_M = np.zeros((len(rows), 4), dtype=np.int64)  # CutMix box, empty for mixup
        S = self.size
        for m, kind in enumerate(kind_M):
            if kinds[kind] == "mixup":
                keep_M[m] = rng.beta(a.mixup_alpha, a.mixup_alpha)
                continue
            cut = math.sqrt(1.0 - rng.beta(a.cutmix_alpha, a.cutmix_alpha))
            bh, bw = int(S * cut), int(S * cut)
            cy, cx = int(rng.integers(S)), int(rng.integers(S))
            box_M[m] = (max(cy - bh // 2, 0), min(cy + bh // 2, S), max(cx - bw // 2, 0),
                        min(cx + bw // 2, S))  # fmt: skip
        ys = torch.arange(S, device=self.device).view(1, S, 1)
        xs = torch.arange(S, device=self.device).view(1, 1, S)
        box = torch.from_numpy(box_M).to(self.device)
        inside_M1SS = (
            (ys >= box[:, 0, None, None])
            & (ys < box[:, 1, None, None])
            & (xs >= box[:, 2, None, None])
            & (xs < box[:, 3, None, None])
        ).unsqueeze(1)
        keep = torch.tensor(keep_M, dtype=torch.float32, device=self.device).view(-1, 1, 1, 1)
        own = views_V3SS[torch.from_numpy(rows).to(self.device)]
        blended = keep * own + (1 - keep) * partners
        out = views_V3SS.clone()
        out[torch.from_numpy(rows).to(self.device)] = torch.where(inside_M1SS, partners, blended)
        return out

    def step(self, step: int, global_batch: int, *, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's share of step ``step``'s views, uint8 ``[B / world, 3, S, S]``."""
        first = step * global_batch
        photo_V = np.array([self.order.locate(k)[1] for k in range(first, first + global_batch)])
        rng = np.random.default_rng(derive_seed(self.seed, step))
        views_V3SS = self._mixed(rng, self._jittered(rng, photo_V))
        local = global_batch // world
        return views_V3SS[rank * local : (rank + 1) * local].round_().to(torch.uint8)

    def stream(
        self, start: int, stop: int, global_batch: int, *, rank: int = 0, world: int = 1
    ) -> Iterator[torch.Tensor]:
        """Steps ``start..stop-1``, as :class:`app.train.data.StepBatches` over a loader."""
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by {world} processes")
        for step in range(start, stop):
            yield self.step(step, global_batch, rank=rank, world=world)

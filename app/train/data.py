"""Image folders, the eval dataset, and the reproducible view stream used for distillation.

Distillation needs no labels: the dense teacher labels every view itself, so a small pool
of photos is stretched into many different inputs (random crops, flips, RandAugment, and
mixes of two photos). Every view is a pure function of ``(seed, epoch, sample index)``,
so a resumed run or a run split over DDP ranks sees exactly the views a single
uninterrupted process would have seen.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field
from timm.data import create_transform
from torch.utils.data import Dataset, Sampler, get_worker_info

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LABELS_FILE = "labels.csv"

Transform = Callable[[Image.Image], torch.Tensor]


def list_images(folder: Path | str) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name so every run sees one order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_labels(folder: Path | str) -> dict[str, int] | None:
    """``{file name: class index}`` from the folder's ``labels.csv``; None when it has none."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return {row["file"]: int(row["class_index"]) for row in csv.DictReader(f)}


def load_rgb(path: Path) -> Image.Image:
    """Decode fully (so the file is closed) and upright, as three-channel RGB."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def eval_transform(data_config: dict[str, Any]) -> Transform:
    """timm's deterministic eval transform (resize, centre crop, normalise) for a data config."""
    return create_transform(**data_config, is_training=False)


class EvalImages(Dataset):
    """``i -> (image[3,H,W], i)`` through the eval transform; the index finds the label back."""

    def __init__(self, paths: Sequence[Path], transform: Transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.paths[i])), i


class ViewAugment(BaseModel):
    """How one distillation view is made from a photo.

    Crops keep at least ``crop_scale[0]`` of the area: the student is judged on centre
    crops, so tiny zoomed-in crops would spend capacity on inputs it never meets; mixes
    of two photos give the teacher genuinely new inputs to label, which a small pool
    needs most.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    crop_scale: tuple[float, float] = (0.25, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.3, ge=0, description="Used only when rand_augment is None.")
    rand_augment: str | None = Field(
        "rand-m7-n2-mstd0.5-inc1", description="timm RandAugment spec; None for colour jitter."
    )
    interpolation: str = Field(
        "bilinear",
        description="Teacher and student see the same view, so the eval interpolation is not "
        "needed here; bilinear makes RandAugment's geometric ops about a third cheaper.",
    )
    mix_prob: float = Field(0.5, ge=0, le=1, description="Share of views mixed with a 2nd photo.")
    mixup_alpha: float = Field(0.8, ge=0, description="Beta(a, a) for blending; 0 disables.")
    cutmix_alpha: float = Field(1.0, ge=0, description="Beta(a, a) for pasted boxes; 0 disables.")

    def mix_kinds(self) -> list[str]:
        """The ways of mixing two photos that are switched on."""
        alphas = {"mixup": self.mixup_alpha, "cutmix": self.cutmix_alpha}
        return [kind for kind, alpha in alphas.items() if alpha > 0]

    def transform(self, data_config: dict[str, Any]) -> Transform:
        """timm's training transform at the eval size and mean (RandAugment's fill), ending in a
        uint8 tensor: normalising on the accelerator keeps the CPU workers' share small."""
        return create_transform(
            input_size=data_config["input_size"],
            is_training=True,
            scale=self.crop_scale,
            hflip=self.hflip,
            color_jitter=self.color_jitter,
            auto_augment=self.rand_augment,
            interpolation=self.interpolation,
            mean=data_config["mean"],
            use_prefetcher=True,
        )


def normalize_views(views: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """uint8 views [B,3,H,W] (any device) -> float32 model input, normalised like eval."""
    mean = torch.tensor(data_config["mean"], device=views.device).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=views.device).view(1, 3, 1, 1)
    return (views.float() / 255.0 - mean) / std


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (SeedSequence, so nearby inputs diverge)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU) RNGs, which timm/torchvision transforms draw from.

    In the caller's process their states are put back afterwards so nothing else is
    perturbed; a loader worker owns its RNGs, so it skips that (it costs ~1 ms a view).
    """
    if get_worker_info() is not None:
        _seed_globals(seed)
        yield
        return
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    _seed_globals(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class ViewOrder:
    """Which photo global sample ``k`` shows: groups of ``views`` consecutive samples of one
    photo, photos in a fresh permutation per epoch (shared by both ways of making views)."""

    def __init__(self, photos: int, *, seed: int, views: int) -> None:
        if not photos:
            raise ValueError("no training images")
        if views < 1:
            raise ValueError("views must be >= 1")
        self.photos, self.seed, self.views = photos, seed, views
        self._orders: dict[int, list[int]] = {}  # epoch -> photo order

    def __len__(self) -> int:
        """Samples per epoch (every photo ``views`` times); the stream itself never ends."""
        return self.photos * self.views

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._orders[epoch] = torch.randperm(self.photos, generator=gen).tolist()
        return self._orders[epoch]

    def locate(self, k: int) -> tuple[int, int, int]:
        """``(epoch, photo index, index of the sample within its epoch)`` of global sample k."""
        epoch, within = divmod(k, len(self))
        return epoch, self._order(epoch)[within // self.views], within


class DistillViews(Dataset):
    """An endless stream of augmented views: global sample ``k -> uint8 view[3,H,W]``.

    Samples come in groups of ``views`` consecutive views of one photo (repeated
    augmentation: several views of a photo in one batch make the student match the
    teacher consistently across them); photos are visited in a fresh permutation per
    epoch. Photos are decoded once up front, so the pool must fit in memory (a few
    thousand photos take a few hundred MB).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        data_config: dict[str, Any],
        augment: ViewAugment,
        *,
        seed: int,
        views: int,
    ) -> None:
        self.order = ViewOrder(len(paths), seed=seed, views=views)
        self.images = [load_rgb(p) for p in paths]
        self.augment = augment
        self.transform = augment.transform(data_config)
        self.seed = seed

    def __len__(self) -> int:
        """Samples per epoch (every photo ``views`` times); the stream itself never ends."""
        return len(self.order)

    def locate(self, k: int) -> tuple[int, int, int]:
        """``(epoch, photo index, index of the sample within its epoch)`` of global sample k."""
        return self.order.locate(k)

    def _view(self, image: int, seed: int) -> torch.Tensor:
        with seeded_globals(seed):
            return self.transform(self.images[image])

    def __getitem__(self, k: int) -> torch.Tensor:
        epoch, image, within = self.locate(k)
        seed = derive_seed(self.seed, epoch, within)
        view = self._view(image, seed)  # [3,H,W]
        rng = np.random.default_rng(seed)
        a = self.augment
        kinds = a.mix_kinds()
        if not kinds or rng.random() >= a.mix_prob:
            return view
        partner = self._view(int(rng.integers(len(self.images))), derive_seed(seed, 1))
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "mixup":
            lam = float(rng.beta(a.mixup_alpha, a.mixup_alpha))
            return (lam * view + (1.0 - lam) * partner).round().to(torch.uint8)
        return _paste_box(view, partner, float(rng.beta(a.cutmix_alpha, a.cutmix_alpha)), rng)


def _paste_box(
    view: torch.Tensor, partner: torch.Tensor, lam: float, rng: np.random.Generator
) -> torch.Tensor:
    """CutMix: a box covering ``1 - lam`` of the view is replaced by the partner's pixels."""
    _, h, w = view.shape
    cut = (1.0 - lam) ** 0.5
    bh, bw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
    out = view.clone()
    out[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
    return out


class StepBatches(Sampler[list[int]]):
    """For each step in ``[start, stop)``, this rank's contiguous share of the global batch.

    Step ``s`` covers global samples ``[s*B, (s+1)*B)``; rank ``r`` of ``world`` takes the
    ``r``-th slice of ``B/world``, so the union over ranks is the single-process batch.
    """

    def __init__(
        self, start: int, stop: int, global_batch: int, *, rank: int = 0, world: int = 1
    ) -> None:
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by {world} processes")
        self.start, self.stop = start, stop
        self.global_batch, self.local = global_batch, global_batch // world
        self.rank = rank

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            first = step * self.global_batch + self.rank * self.local
            yield list(range(first, first + self.local))

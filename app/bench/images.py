"""Request bodies for load tests: real JPEGs from a folder, or photo-like ones made here.

Why not random noise: noise JPEGs are several times larger than photos of the same size
and decode slower, so they would skew both upload and decode time. The generated images
are smooth gradients with a few soft shapes and mild grain, at camera-like sizes and
JPEG quality, which compress and decode like ordinary photos. Generation is seeded, so a
run is reproducible without shipping image files.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from app.train.data import list_images

# (width, height): phone photo thumbnails to small web images, portrait and landscape.
SIZES = ((320, 240), (640, 480), (480, 640), (800, 600), (500, 375), (1024, 768))


def photo_like_jpeg(seed: int, size: tuple[int, int] | None = None, quality: int = 85) -> bytes:
    """One seeded, photo-like JPEG (gradient sky/ground, blurred shapes, grain)."""
    rng = np.random.default_rng(seed)
    width, height = size or SIZES[seed % len(SIZES)]
    top, bottom = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (1 - t) * top + t * bottom
    image = Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, x1 = sorted(rng.integers(0, width, size=2))
        y0, y1 = sorted(rng.integers(0, height, size=2))
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((x0, y0, x1 + 8, y1 + 8), fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(radius=3))
    grain = rng.normal(0.0, 6.0, size=(height, width, 3))
    noisy = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generated_images(count: int = 16, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` (file name, JPEG bytes) pairs made in memory."""
    return [(f"gen-{seed + i:04d}.jpg", photo_like_jpeg(seed + i)) for i in range(count)]


def folder_images(folder: Path, limit: int | None = None) -> list[tuple[str, bytes]]:
    """Image files of ``folder`` (sorted, not recursive), read once into memory so disk
    reads never show up in request latency."""
    files = list_images(folder)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return [(p.name, p.read_bytes()) for p in files[:limit]]


def load_images(folder: Path | str | None, count: int = 16) -> list[tuple[str, bytes]]:
    """A folder's images if one is given, else ``count`` generated ones."""
    if folder:
        return folder_images(Path(folder), limit=None)
    return generated_images(count)


def content_type(name: str) -> str:
    suffix = Path(name).suffix.lower().lstrip(".")
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg"}.get(suffix, f"image/{suffix}")

"""Shared test helpers: tiny store entries, a real uvicorn server, image generators."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.store import Manifest, ModelStore, Preprocessing, Source

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HF_CACHE = SHARED / "hf-cache"
DEV_IMAGES = SHARED / "images" / "imagenet-dev"

# A 1000-class ViT small enough to run many CPU batches in a test: 32x32 input, 16 patches.
TINY_ARCH = "vit_tiny_patch16_224"
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_PREPROCESSING = Preprocessing(input_size=(3, 32, 32), crop_pct=0.875)
# DeiT-Tiny's recipe shrunk for model-code tests: 32x32 images, 8x8 patches -> a 4x4 grid,
# 16 patches + CLS = 17 tokens, 4 blocks.
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}


def require_shared(*paths: Path) -> None:
    for path in paths or (SHARED,):
        if not path.exists():
            pytest.skip(f"needs {path} (the project's ../shared data folder) which is absent")


def tiny_manifest(name: str = "tiny", **update) -> Manifest:
    fields = dict(
        name=name,
        architecture=TINY_ARCH,
        architecture_kwargs=TINY_KWARGS,
        variant="dense",
        preprocessing=TINY_PREPROCESSING,
        source=Source(kind="import", ref="random init (tests)"),
    )
    fields.update(update)
    return Manifest(**fields)


def add_tiny_entry(store: ModelStore, name: str = "tiny", seed: int = 0, **update) -> Manifest:
    """A store entry with seeded random weights (tests only; never served by default)."""
    from app.store.store import build_module

    manifest = tiny_manifest(name, **update)
    torch.manual_seed(seed)
    store.write_entry(manifest, build_module(manifest).state_dict())
    return store.manifest(name)


def image_bytes(
    fmt: str = "JPEG", size=(64, 48), mode: str = "RGB", seed: int = 0, **save
) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}.get(mode)
    if mode in ("I;16",):
        arr = rng.integers(0, 65535, size=(size[1], size[0]), dtype=np.uint16)
        image = Image.fromarray(arr)
    else:
        shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
        image = Image.fromarray(rng.integers(0, 255, size=shape, dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def serve_env(store: ModelStore, default: str = "tiny", **settings: object) -> dict[str, str]:
    """Environment for a test server on ``store``: CPU, no auto-pull, plus ``settings``
    (``max_delay_ms=2`` becomes ``VITSERVE_MAX_DELAY_MS=2``)."""
    env = {
        "VITSERVE_STORE_DIR": str(store.root),
        "VITSERVE_DEFAULT_MODEL": default,
        "VITSERVE_AUTO_PULL": "false",
        "VITSERVE_DEVICE": "cpu",
    }
    return env | {f"VITSERVE_{key.upper()}": str(value) for key, value in settings.items()}


def add_deit_entry(store: ModelStore, name: str = "deit") -> Manifest:
    """DeiT-Tiny's real architecture with random weights (tests only): realistic compute."""
    return add_tiny_entry(
        store,
        name,
        architecture="deit_tiny_patch16_224",
        architecture_kwargs={},
        preprocessing=Preprocessing(crop_pct=0.9),
    )

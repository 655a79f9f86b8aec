"""Fidelity metrics and image-folder reading, on a tiny random ViT and generated photos.

The tiny-model and image helpers here are shared by the distillation, DDP and analysis
tests (imported from this module)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from timm.models.vision_transformer import VisionTransformer

from app.train.data import EvalImages, eval_transform, list_images, read_labels
from app.train.evaluate import evaluate
from tests.helpers import TINY_VIT

NUM_CLASSES = 10
# 32x32 input, 8x8 patches: a 4x4 grid, 16 patches + CLS = 17 tokens, 4 blocks.
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def tiny_teacher(seed: int = 0) -> VisionTransformer:
    """Random weights scaled up so logits and attention are far from uniform."""
    torch.manual_seed(seed)
    model = VisionTransformer(**TINY_VIT, num_classes=NUM_CLASSES)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.15)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(3.0)  # peaked attention
    return model.eval()


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photos with structure (background, boxes, ellipses, noise) in assorted sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(36, 64)), int(rng.integers(36, 64))
        image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            x1, y1 = x0 + int(rng.integers(6, w - x0 + 1)), y0 + int(rng.integers(6, h - y0 + 1))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=fill)
        noise = rng.integers(-20, 21, (h, w, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        path = folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_labels(folder: Path, labels: dict[str, int]) -> None:
    rows = [f"{name},{cls},n{cls:08d},class {cls}" for name, cls in labels.items()]
    (folder / "labels.csv").write_text("file,class_index,synset,name\n" + "\n".join(rows) + "\n")


@torch.no_grad()
def predictions(model: torch.nn.Module, paths: list[Path]) -> list[int]:
    ds = EvalImages(paths, eval_transform(DATA_CONFIG))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return model(x).argmax(-1).tolist()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("photos"), 10)


def test_list_images_and_labels(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    assert list_images(tmp_path) == sorted(paths)
    assert read_labels(tmp_path) is None
    write_labels(tmp_path, {"img000.jpg": 7, "img001.png": 0})
    assert read_labels(tmp_path) == {"img000.jpg": 7, "img001.png": 0}
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


def test_identical_student_agrees_fully(photos: list[Path]) -> None:
    teacher = tiny_teacher()
    fid = evaluate(teacher, copy.deepcopy(teacher), photos, None, DATA_CONFIG, batch_size=4)
    assert fid.n_images == len(photos)
    assert fid.agreement_top1 == 1.0
    assert fid.top5_overlap == 1.0
    assert fid.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert fid.student_top1_acc is None and fid.n_labelled == 0


def test_other_student_disagrees(photos: list[Path]) -> None:
    fid = evaluate(tiny_teacher(0), tiny_teacher(1), photos, None, DATA_CONFIG, batch_size=4)
    assert fid.agreement_top1 < 1.0
    assert fid.mean_kl > 0.01
    assert 0.0 <= fid.top5_overlap < 1.0


def test_labels_give_accuracy(photos: list[Path]) -> None:
    """Labels: the teacher's answer for 6 photos, a wrong one for 3, none for the last."""
    teacher, student = tiny_teacher(0), tiny_teacher(1)
    t_pred, s_pred = predictions(teacher, photos), predictions(student, photos)
    labels = {p.name: t for p, t in zip(photos[:6], t_pred[:6], strict=True)}
    labels |= {p.name: (t + 1) % NUM_CLASSES for p, t in zip(photos[6:9], t_pred[6:9], strict=True)}
    fid = evaluate(teacher, student, photos, labels, DATA_CONFIG, batch_size=3)
    assert fid.n_images == 10 and fid.n_labelled == 9
    assert fid.teacher_top1_acc == pytest.approx(6 / 9)
    student_right = sum(s_pred[i] == labels[p.name] for i, p in enumerate(photos[:9]))
    assert fid.student_top1_acc == pytest.approx(student_right / 9)
    assert fid.agreement_top1 == pytest.approx(np.mean(np.equal(t_pred, s_pred)))

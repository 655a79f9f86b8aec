"""Views made on the training device: RandomResizedCrop's boxes, upright and mirrored as
asked, colour jitter as torchvision's, the same stream for any split over ranks, and a
distillation that trains on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from app.train.data import ViewAugment
from app.train.device_views import DeviceViews, crop_boxes, jitter_colours
from app.train.distill import distill
from app.train.evaluate import evaluate
from app.vit.builder import compress
from tests.unit.test_distill import CFG, one_thread, quick_opts  # noqa: F401 - autouse fixture
from tests.unit.test_evaluate import DATA_CONFIG, tiny_teacher, write_images

PLAIN = ViewAugment(crop_scale=(1.0, 1.0), hflip=0.0, color_jitter=0.0, rand_augment=None,
                    mix_prob=0.0)  # fmt: skip
CPU = torch.device("cpu")


def save(folder: Path, name: str, pixels_HW3: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(pixels_HW3.astype(np.uint8)).save(path)
    return path


def halves(h: int, w: int, *, top_white: bool) -> np.ndarray:
    """White top (or left) half, black other half."""
    pixels = np.zeros((h, w, 3))
    if top_white:
        pixels[: h // 2] = 255
    else:
        pixels[:, : w // 2] = 255
    return pixels


def test_crop_boxes_follow_random_resized_crop() -> None:
    rng = np.random.default_rng(0)
    hw_V2 = np.array([[256, 384]] * 2000 + [[384, 256]] * 2000)
    box_V4 = crop_boxes(rng, hw_V2, (0.5, 1.0))
    w_V, h_V = box_V4[:, 2] - box_V4[:, 0], box_V4[:, 3] - box_V4[:, 1]
    assert (box_V4[:, :2] >= 0).all()
    assert (box_V4[:, 2] <= hw_V2[:, 1]).all() and (box_V4[:, 3] <= hw_V2[:, 0]).all()
    area_share = w_V * h_V / (hw_V2[:, 0] * hw_V2[:, 1])
    assert area_share.min() >= 0.49 and area_share.max() <= 1.0
    aspect = w_V / h_V
    assert aspect.min() >= 0.74 and aspect.max() <= 1.34
    # the first try that fits wins, so large crops are rarer than drawn: as torchvision's
    torch.manual_seed(0)
    image = torch.empty(3, 256, 384)
    tv_boxes = [
        RandomResizedCrop.get_params(image, [0.5, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)
    ]
    tv_share = np.array([h * w / (256 * 384) for _, _, h, w in tv_boxes])
    assert abs(np.median(area_share) - np.median(tv_share)) < 0.02


def test_a_square_photo_whole_is_a_plain_bilinear_resize(tmp_path: Path) -> None:
    """Scale 1 never fits a drawn aspect, so the fallback takes the whole photo: enlarged,
    the view is the photo upsampled as ``interpolate(bilinear, align_corners=False)`` does
    (shrunk, roi_align averages several samples per pixel instead)."""
    photo = write_images(tmp_path, 1)[0]
    pixels = np.array(Image.open(photo).convert("RGB").crop((0, 0, 16, 16)))
    path = save(tmp_path / "square", "sq.png", pixels)
    view = DeviceViews([path], DATA_CONFIG, PLAIN, seed=0, views=1, device=CPU).step(0, 1)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    expected = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    assert (view.float() - expected).abs().max() <= 1.0


def test_portrait_photos_stay_upright_and_flips_mirror(tmp_path: Path) -> None:
    tall = save(tmp_path, "tall.png", halves(96, 40, top_white=True))
    wide = save(tmp_path, "wide.png", halves(40, 96, top_white=False))
    views = DeviceViews([tall, wide], DATA_CONFIG, PLAIN, seed=0, views=1, device=CPU)
    assert views.transposed_P.tolist() == [True, False]
    for step in range(2):  # each epoch's order decides which photo comes first
        view = views.step(step, 2).float()
        (tall_view,) = [v for v in view if v[:, :, 0].std() > 50]  # down a column it changes
        assert tall_view[:, :4].mean() > 250 and tall_view[:, -4:].mean() < 5
    mirrored = DeviceViews([wide], DATA_CONFIG, PLAIN.model_copy(update={"hflip": 1.0}),
                           seed=0, views=1, device=CPU).step(0, 1).float()  # fmt: skip
    assert mirrored[..., :4].mean() < 5 and mirrored[..., -4:].mean() > 250


def test_colour_jitter_is_torchvisions_blend() -> None:
    x = torch.rand(1, 3, 8, 8) * 255
    keep = jitter_colours(x, torch.ones(1, 3), torch.tensor([[0, 1, 2]]))
    assert torch.allclose(keep, x, atol=1e-4)
    darker = jitter_colours(x, torch.tensor([[0.5, 1.0, 1.0]]), torch.tensor([[0, 1, 2]]))
    assert torch.allclose(darker, x / 2, atol=1e-4)
    grey = jitter_colours(x, torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[2, 0, 1]]))
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-3)
    flat = jitter_colours(x, torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1, 0, 2]]))
    assert flat.std() < 1e-3  # contrast 0: every pixel the mean grey


def test_views_are_one_stream_whatever_the_split(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 5)
    augment = ViewAugment(rand_augment=None, mix_prob=0.5)
    views = DeviceViews(paths, DATA_CONFIG, augment, seed=3, views=2, device=CPU)
    whole = views.step(4, 8)
    assert whole.shape == (8, 3, 32, 32) and whole.dtype == torch.uint8
    again = DeviceViews(paths, DATA_CONFIG, augment, seed=3, views=2, device=CPU)
    assert torch.equal(again.step(4, 8), whole)
    assert torch.equal(torch.cat([views.step(4, 8, rank=r, world=4) for r in range(4)]), whole)
    assert not torch.equal(views.step(5, 8), whole)
    resumed = list(views.stream(3, 5, 8))
    assert len(resumed) == 2 and torch.equal(resumed[1], whole)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_on_a_gpu_are_the_cpus(tmp_path: Path) -> None:
    """Same random numbers, same boxes, same float32 arithmetic in another order: a pixel
    may round the other way, by one step, and rarely."""
    paths = write_images(tmp_path, 5)
    augment = ViewAugment(rand_augment=None, mix_prob=0.5)
    on_cpu = DeviceViews(paths, DATA_CONFIG, augment, seed=3, views=2, device=CPU)
    on_gpu = DeviceViews(paths, DATA_CONFIG, augment, seed=3, views=2,
                         device=torch.device("cuda"))  # fmt: skip
    for step in range(3):
        diff = (on_cpu.step(step, 8).int() - on_gpu.step(step, 8).cpu().int()).abs()
        mean = diff.float().mean()
        assert diff.max() <= 1 and mean < 0.01, f"step {step}: max {diff.max()}, mean {mean}"


def test_rand_augment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RandAugment"):
        DeviceViews(write_images(tmp_path, 1), DATA_CONFIG, ViewAugment(), seed=0, views=1,
                    device=CPU)  # fmt: skip


def test_distillation_trains_on_device_views(tmp_path: Path) -> None:
    photos = write_images(tmp_path, 12)
    teacher = tiny_teacher()
    student = compress(teacher, CFG)
    before = evaluate(teacher, student, photos, None, DATA_CONFIG, batch_size=12)
    opts = quick_opts(
        steps=40, phase1_steps=10, views_on="device", augment=ViewAugment(rand_augment=None)
    )
    result = distill(teacher, student, photos, opts, data_config=DATA_CONFIG)
    after = evaluate(teacher, student, photos, None, DATA_CONFIG, batch_size=12)
    assert result.steps_done == 40 and after.mean_kl < 0.7 * before.mean_kl

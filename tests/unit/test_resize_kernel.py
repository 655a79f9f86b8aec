"""The resize kernel is the eval transform's Resize + CenterCrop, then Preprocessor.normalize,
for a whole batch of decoded images of any sizes in one launch: held here to the torch path
it replaces (``TensorResizeCrop`` in float, as it runs on a GPU, then ``normalize``).

The kernel tests (``test_triton_*``) run on CUDA, or on the CPU in Triton's interpreter,
which the last test starts in a subprocess when no GPU is present. Crops are small (16 px)
so the interpreter runs the whole file in well under a minute; on CUDA the ``test_cuda_*``
tests add photo sizes at DeiT's 224 crop and the decode stage on nvjpeg's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.serving.decode import BatchDecoder, Encoded, Pixels, Preprocessed, fused_resize
from app.serving.preprocess import Preprocessor, TensorResizeCrop
from app.store.manifest import Preprocessing
from tests.helpers import REPO, image_bytes
from tests.unit.test_decode import photo

try:
    from app.serving import resize_kernel
except ImportError:  # no Triton
    resize_kernel = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(resize_kernel is None, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MODES = ["bicubic", "bilinear"]
# Crop 16 after resizing the shorter side to floor(16 / 0.875) = 18.
SIZES = [
    (24, 32),  # downscale
    (33, 23),  # odd sizes, tall
    (12, 20),  # upscale: 12 -> 18
    (17, 17),  # one pixel short: upscale by 18/17
    (19, 70),  # one pixel over, wide: downscale by 18/19
    (18, 25),  # the shorter side is 18 already: no resize, only the crop
    (45, 60),  # a wide filter: scale 2.5, 11 taps a side
]
# What a photo becomes at DeiT's 224 crop (resize to 248): downscales up to 6.5x, upscales.
PHOTO_SIZES = [(375, 500), (500, 333), (683, 1024), (248, 300), (224, 224), (100, 150)]
PHOTO_SIZES += [(1200, 1600), (2000, 160)]


def small(mode: str = "bicubic") -> Preprocessor:
    return Preprocessor(
        Preprocessing(input_size=(3, 16, 16), crop_pct=0.875, interpolation=mode), 10**9
    )


def kernel_device() -> torch.device:
    """CUDA, or the CPU when Triton interprets the kernel; otherwise the test skips."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if INTERPRETED:
        return torch.device("cpu")
    pytest.skip("no CUDA: the Triton kernel runs on CPU only in TRITON_INTERPRET=1 (see below)")


def noise(sizes: list[tuple[int, int]], seed: int, device: torch.device) -> list[torch.Tensor]:
    """Random uint8 images [3, H, W]: any shift or wrong tap shows, and the cubic's
    overshoot needs the clamp. Every third one is an HWC view (strides (1, 3W, 3)), as
    nvImageCodec's output and the v2 protocol's PIXELS are."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for k, (h, w) in enumerate(sizes):
        if k % 3 == 2:
            hwc = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8)
            images.append(hwc.to(device).permute(2, 0, 1))
        else:
            images.append(
                torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8).to(device)
            )
    return images


def expected_levels(pre: Preprocessor, images: list[torch.Tensor]) -> torch.Tensor:
    """The torch path's crops in grey levels: resized in float, clamped, rounded."""
    return torch.stack(TensorResizeCrop(pre.resize_crop)([image.float() for image in images]))


def levels(pre: Preprocessor, inputs_B3hw: torch.Tensor) -> torch.Tensor:
    """Normalised inputs back to grey levels (inverting ``normalize``'s multiply-add)."""
    scale = (1 / (255 * pre.std)).to(inputs_B3hw.device)[:, None, None]
    shift = (pre.mean / pre.std).to(inputs_B3hw.device)[:, None, None]
    return (inputs_B3hw.float() + shift) / scale


def assert_within_a_grey_level(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to the grey level but for the rare value at .5 that fp32 summation tips the
    other way: measured max 0 levels against the CPU float path (interpreter)."""
    assert got.shape == expected.shape
    diff = (got - expected).abs()
    assert diff.max() <= 1 + 1e-3, diff.max()
    assert (diff > 0.5).float().mean() <= 1e-3, (diff > 0.5).float().mean()


# --- where the kernel is used (every machine) -----------------------------------------------


@needs_triton
def test_the_decoder_uses_the_kernel_on_cuda_for_bicubic_and_bilinear_only() -> None:
    """Constructed without touching a GPU: CUDA and an implemented interpolation give the
    kernel; the CPU, or any other interpolation (raising a clear error), the torch path."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for mode in MODES:
        assert isinstance(fused_resize(small(mode), cuda), resize_kernel.ResizeCropNormalize)
        assert fused_resize(small(mode), cpu) is None
    with pytest.raises(ValueError, match="implements bicubic, bilinear, not 'nearest'"):
        resize_kernel.ResizeCropNormalize(small("nearest"))
    assert fused_resize(small("nearest"), cuda) is None


# --- the kernel (CUDA, or the interpreter) ---------------------------------------------------


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_kernel_is_the_torch_resize_crop_and_normalize(mode) -> None:
    """Every size (down, up, odd, tall, wide, one pixel off, none) and layout in one launch:
    the same geometry and grey levels as the torch path, each image written to its own
    row and no other."""
    device, pre = kernel_device(), small(mode)
    images = noise(SIZES, seed=len(mode), device=device)
    out = torch.full((len(images) + 2, 3, 16, 16), float("nan"), device=device)
    rows = [len(images) + 1 - k for k in range(len(images))]  # reversed, rows 0 and 1 unused
    resize_kernel.ResizeCropNormalize(pre)(images, out, rows)
    assert out[:2].isnan().all() and not out[2:].isnan().any()
    assert_within_a_grey_level(levels(pre, out[rows]), expected_levels(pre, images))


@needs_triton
def test_triton_kernel_without_a_resize_is_the_exact_center_crop() -> None:
    """Shorter side already the resize target: the filter is the identity, exactly."""
    device, pre = kernel_device(), small()
    image = noise([(18, 31)], seed=3, device=device)[0]
    out = resize_kernel.ResizeCropNormalize(pre)([image], torch.empty(1, 3, 16, 16, device=device))
    crop = image[:, 1:17, 8:24].float()  # top round(2 / 2), left round(15 / 2) = 8 (to even)
    assert (levels(pre, out)[0] - crop).abs().max() < 1e-3


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_writes_the_models_dtype(dtype) -> None:
    """Half-precision inputs are the fp32 result rounded once (to within one step of the
    dtype: Triton's interpreter truncates, CUDA rounds to nearest)."""
    device, pre = kernel_device(), small()
    images = noise([(24, 32), (12, 20)], seed=4, device=device)
    out = torch.empty(2, 3, 16, 16, device=device, dtype=dtype)
    resize_kernel.ResizeCropNormalize(pre)(images, out)
    expected = pre.normalize(expected_levels(pre, images))
    one_level = (1 / (255 * pre.std)).to(device)[:, None, None]
    error = (out.float() - expected).abs()
    assert (error <= one_level + expected.abs() * torch.finfo(dtype).eps).all()


@needs_triton
def test_triton_decoder_puts_decoded_pixels_through_the_kernel() -> None:
    """The decode stage with the kernel (forced onto a CPU decoder here; on CUDA it is
    the default): PIXELS payloads come out of the kernel in their rows, within a grey
    level of the torch path; Pillow's and ready inputs are untouched by it."""
    device, pre = kernel_device(), small()
    kernel, calls = resize_kernel.ResizeCropNormalize(pre), []

    def spy(images, out, rows):
        calls.append(rows)
        return kernel(images, out, rows)

    pixels = noise([(24, 32), (40, 30), (12, 20)], seed=5, device=torch.device("cpu"))
    png = image_bytes("PNG", (30, 20))
    ready = torch.randn(3, 16, 16)
    with ThreadPoolExecutor(1) as pool:
        decoder = BatchDecoder(pre, device=device, dtype=torch.float32, pool=pool, nvjpeg=False)
        decoder.fused = spy
        payloads = [Pixels(pixels[0]), Encoded(png, pre.probe(png)), Preprocessed(ready)]
        batch = decoder([*payloads, Pixels(pixels[1]), Pixels(pixels[2])])
    assert calls == [[0, 3, 4]] and batch.rows == [0, 1, 2, 3, 4] and not batch.errors
    assert batch.decoders == {1: "pillow"}
    assert_within_a_grey_level(
        levels(pre, batch.inputs[[0, 3, 4]]), expected_levels(pre, pixels).to(device)
    )
    torch.testing.assert_close(batch.inputs[1].cpu(), pre(png), atol=1e-5, rtol=0)
    assert torch.equal(batch.inputs[2].cpu(), ready)


# --- CUDA only: photo sizes, nvjpeg ---------------------------------------------------------


@needs_triton
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_kernel_is_the_torch_path_at_photo_sizes(mode) -> None:
    """DeiT's 224 crop from photo sizes, up to a 6.5x downscale (27 taps a side), against
    the torch path on the same GPU."""
    pre = Preprocessor(Preprocessing(interpolation=mode, crop_pct=0.9), 10**9)
    images = noise(PHOTO_SIZES, seed=6, device=torch.device("cuda"))
    out = torch.empty(len(images), 3, 224, 224, device="cuda")
    resize_kernel.ResizeCropNormalize(pre)(images, out)
    assert_within_a_grey_level(levels(pre, out), expected_levels(pre, images))


@needs_triton
@needs_cuda
@pytest.mark.gpu
def test_cuda_decoder_resizes_nvjpegs_batch_with_the_kernel() -> None:
    """The served path: nvjpeg's images go through the kernel, and the batch is the torch
    path's (the same decoder with the kernel off) to the grey level."""
    pre = Preprocessor(Preprocessing(crop_pct=0.9), 10**9)
    jpegs = [photo((500 - 40 * s, 375 + 20 * s), seed=s) for s in range(6)]
    with ThreadPoolExecutor(1) as pool:
        decoder = BatchDecoder(
            pre, device=torch.device("cuda"), dtype=torch.float32, pool=pool, nvjpeg=True
        )
        assert decoder.fused is not None
        batch = decoder([Encoded(j, pre.probe(j)) for j in jpegs])
        decoder.fused = None
        expected = decoder([Encoded(j, pre.probe(j)) for j in jpegs])
    assert set(batch.decoders.values()) == {"nvjpeg"}
    assert_within_a_grey_level(levels(pre, batch.inputs), levels(pre, expected.inputs))


@needs_triton
@pytest.mark.skipif(
    torch.cuda.is_available() or INTERPRETED, reason="the kernel runs in this process already"
)
def test_triton_kernel_passes_in_the_interpreter_on_cpu() -> None:
    """Without a GPU, the kernel tests above run in Triton's interpreter (numpy, CPU
    tensors), which reads TRITON_INTERPRET when a kernel is defined: hence a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_"],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout

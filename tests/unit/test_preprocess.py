"""Decode stage: timm's eval transform within two grey levels, every common format, clear
errors for the rest."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from app.serving.preprocess import (
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    Preprocessor,
    UnsupportedImage,
)
from app.store import Preprocessing
from tests.helpers import DEV_IMAGES, image_bytes, require_shared

DEIT = Preprocessing(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.9)


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor(DEIT, max_pixels=40_000_000)


def timm_reference(data: bytes) -> torch.Tensor:
    """What timm's own eval pipeline (ImageDataset: open + convert RGB + transform) gives."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return create_transform(**DEIT.timm_data_config())(image)


def photo_like(size=(500, 375), seed=0) -> Image.Image:
    """Smooth gradients plus noise: resizes like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) % 255], -1)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def assert_within_grey_levels(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Normalised images whose pixels differ by at most two grey levels and on average by
    far less than one: torch's resize (uint8 kernel) rounds a few pixels otherwise than
    Pillow's, by one level, two where bicubic overshoots on noise."""
    levels = (ours - ref).abs() * 255 * torch.tensor(DEIT.std)[:, None, None]
    assert levels.max() <= 2 + 1e-3, f"max difference {levels.max():.2f} grey levels"
    assert levels.mean() < 0.1, f"mean difference {levels.mean():.3f} grey levels"


def test_matches_timm_eval_transform_on_a_generated_jpeg(pre):
    data = encode(photo_like(), "JPEG", quality=90)
    assert_within_grey_levels(pre(data), timm_reference(data))


def test_matches_timm_eval_transform_on_real_imagenet_photos(pre):
    require_shared(DEV_IMAGES)
    files = sorted(DEV_IMAGES.glob("*.JPEG"))[:40]
    for path in files:
        data = path.read_bytes()
        ours, ref = pre(data), timm_reference(data)
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 1e-2, f"{path.name}: relative difference {rel:.2e}"


def test_large_jpeg_uses_reduced_dct_decoding_but_stays_close(pre):
    data = encode(photo_like((2400, 1800)), "JPEG", quality=92)
    ours, ref = pre(data), timm_reference(data)
    assert (ours - ref).norm() / ref.norm() < 0.05


def pillow_crop(pre: Preprocessor, data: bytes) -> torch.Tensor:
    """The crop as Pillow decodes the image (draft scale included)."""
    return pre.crop(pre.decode(data))


@pytest.mark.parametrize(
    "size,kw",
    [
        ((500, 375), {"quality": 90}),  # a photo's size: no DCT scaling
        ((2400, 1800), {"quality": 92}),  # draft scale 1/4
        ((1200, 1030), {"quality": 85}),  # draft scale 1/2, odd height
        ((375, 500), {"progressive": True}),
        ((333, 251), {"subsampling": 0}),  # 4:4:4
    ],
)
def test_upright_rgb_jpegs_decode_as_pillow_does_bit_for_bit(pre, size, kw):
    data = encode(photo_like(size), "JPEG", **kw)
    assert pre.decode_jpeg(data, Image.open(io.BytesIO(data))) is not None
    assert torch.equal(pre.decode_crop(data), pillow_crop(pre, data))


def test_real_photos_decode_as_pillow_does_bit_for_bit(pre):
    require_shared(DEV_IMAGES)
    paths = sorted(DEV_IMAGES.glob("*.JPEG"))
    greys = [p for p in paths if Image.open(p).mode == "L"]  # 4 of the 250
    for path in paths[:40] + greys:
        data = path.read_bytes()
        assert torch.equal(pre.decode_crop(data), pillow_crop(pre, data)), path.name


@pytest.mark.parametrize("size", [(500, 375), (2400, 1800), (1200, 1030)])
def test_grey_jpegs_decode_as_pillow_does_bit_for_bit(pre, size):
    """Grey JPEGs (~2% of ImageNet) take simplejpeg too, expanded to RGB as Pillow's
    convert does, at every draft scale."""
    data = encode(photo_like(size).convert("L"), "JPEG", quality=90)
    assert pre.decode_jpeg(data, Image.open(io.BytesIO(data))) is not None
    assert torch.equal(pre.decode_crop(data), pillow_crop(pre, data))


def test_jpegs_simplejpeg_cannot_take_go_to_pillow(pre):
    cmyk = encode(photo_like().convert("CMYK"), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(photo_like(), "JPEG", exif=exif)
    for data in (cmyk, rotated):
        assert pre.decode_jpeg(data, Image.open(io.BytesIO(data))) is None
        assert torch.equal(pre.decode_crop(data), pillow_crop(pre, data))
    truncated = encode(photo_like(), "JPEG")[:-2000]
    assert pre.decode_jpeg(truncated, Image.open(io.BytesIO(truncated))) is None  # strict
    with pytest.raises(CorruptImage):
        pre.decode_crop(truncated)  # and Pillow refuses it as before


@pytest.mark.parametrize(
    "fmt,mode,kw",
    [
        ("PNG", "RGB", {}),
        ("PNG", "L", {}),
        ("PNG", "P", {}),
        ("WEBP", "RGB", {"lossless": True}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
    ],
)
def test_common_formats_decode_to_rgb(pre, fmt, mode, kw):
    data = encode(photo_like((300, 200)).convert(mode), fmt, **kw)
    ours = pre(data)
    assert ours.shape == (3, 224, 224) and torch.isfinite(ours).all()
    assert_within_grey_levels(ours, timm_reference(data))


def test_opaque_alpha_equals_no_alpha_and_transparency_becomes_white(pre):
    base = photo_like((300, 200))
    rgba = base.copy()
    rgba.putalpha(255)
    assert torch.equal(pre(encode(rgba, "PNG")), pre(encode(base, "PNG")))
    clear = base.copy()
    clear.putalpha(0)
    white = Image.new("RGB", base.size, (255, 255, 255))
    assert torch.equal(pre(encode(clear, "PNG")), pre(encode(white, "PNG")))


def test_16_bit_png_is_scaled_not_saturated(pre):
    ramp = (np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    eight_bit = Image.fromarray((ramp >> 8).astype(np.uint8), "L")
    assert torch.allclose(pre(data), pre(encode(eight_bit, "PNG")), atol=1e-5)


def test_exif_rotation_is_applied(pre):
    image = photo_like((320, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    upright = image.transpose(Image.Transpose.ROTATE_270)
    ref = create_transform(**DEIT.timm_data_config())(
        Image.open(io.BytesIO(rotated)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    )
    assert upright.size == (200, 320)
    assert_within_grey_levels(pre(rotated), ref)


def test_bogus_exif_orientation_is_ignored(pre):
    exif = Image.Exif()
    exif[0x0112] = 77
    data = encode(photo_like((200, 200)), "JPEG", exif=exif.tobytes())
    assert pre(data).shape == (3, 224, 224)


def test_animated_gif_uses_the_first_frame(pre):
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    red = pre(encode(frames[0], "PNG"))
    assert torch.allclose(pre(buf.getvalue()), red, atol=1e-5)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that *claims* width x height: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "data,error",
    [
        (b"", EmptyImage),
        (b"hello, this is text", UnsupportedImage),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", UnsupportedImage),
        (b"%PDF-1.4\n", UnsupportedImage),
        (image_bytes("JPEG", (200, 200))[:600], CorruptImage),
        (image_bytes("PNG", (200, 200))[:300], CorruptImage),
        (png_header_only(30000, 30000), ImageTooLarge),
        (png_header_only(100_000, 100_000), ImageTooLarge),
        (image_bytes("ICO", (32, 32)), UnsupportedImage),
    ],
    ids=[
        "empty",
        "text",
        "svg",
        "pdf",
        "truncated-jpeg",
        "truncated-png",
        "bomb",
        "huge-bomb",
        "ico",
    ],
)
def test_bad_input_raises_a_client_error(pre, data, error):
    with pytest.raises(error) as info:
        pre(data)
    assert 400 <= info.value.status < 500


def test_pixel_limit_is_configurable():
    small = Preprocessor(DEIT, max_pixels=100 * 100)
    with pytest.raises(ImageTooLarge, match="limit is 10000"):
        small(image_bytes("PNG", (101, 100)))
    assert small(image_bytes("PNG", (100, 100))).shape == (3, 224, 224)

"""Untrusted bytes → what the model sees: timm's eval transform, split where serving needs it.

``probe`` reads only the header (limits, format, whether nvjpeg may take the image) and
runs as the request arrives, so bad input is refused before it queues. ``decode_crop``
is Pillow's decode + resize + crop to a uint8 crop, run in worker threads (Pillow releases
the GIL); ``normalize`` is the float part, done per batch on the model's device.
``__call__`` chains them and equals timm's eval transform exactly.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform
from torchvision import transforms

from app.store.manifest import Preprocessing

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class InputError(Exception):
    """A client-side problem with one image; ``status`` is the HTTP status it maps to."""

    status = 400
    code = "bad_image"


class EmptyImage(InputError):
    code = "empty_image"


class UnsupportedImage(InputError):
    status = 415
    code = "unsupported_media_type"


class ImageTooLarge(InputError):
    status = 413
    code = "image_too_large"


class CorruptImage(InputError):
    code = "corrupt_image"


@dataclass(frozen=True)
class Probe:
    """What an image's header says, before any pixel is decoded."""

    format: str
    width: int
    height: int
    # A complete, baseline, 3-channel, upright JPEG: what nvjpeg decodes as Pillow does.
    # Progressive, CMYK/grey, EXIF-rotated or truncated ones keep Pillow, which handles
    # them (or refuses them) exactly as on a CPU replica.
    nvjpeg_ok: bool


EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Preprocessor:
    """Decode + timm eval transform for one model's data config, with safety limits."""

    preprocessing: Preprocessing
    max_pixels: int

    def __post_init__(self) -> None:
        transform = create_transform(**self.preprocessing.timm_data_config())
        *resize_crop, _to_tensor, normalize = transform.transforms
        if not isinstance(normalize, transforms.Normalize):
            raise TypeError(f"unexpected eval transform {transform}: Normalize must come last")
        object.__setattr__(self, "_resize_crop", transforms.Compose(resize_crop))
        object.__setattr__(self, "mean", torch.as_tensor(normalize.mean, dtype=torch.float32))
        object.__setattr__(self, "std", torch.as_tensor(normalize.std, dtype=torch.float32))
        resize = transform.transforms[0].size
        # Decode JPEGs at a reduced DCT scale only while the result stays >= 2x what the
        # resize needs, so the bicubic resize still sees plenty of pixels.
        object.__setattr__(self, "_draft_size", 2 * int(np.max(resize)))
        # An int resize scales the shorter side to it: the one step that can *grow* an image.
        short_side = resize if isinstance(resize, int) else None
        if isinstance(resize, list | tuple) and len(resize) == 1:
            short_side = int(resize[0])
        object.__setattr__(self, "_short_side", short_side)

    @property
    def resize_crop(self) -> transforms.Compose:
        """The eval transform's geometric steps (Resize, CenterCrop): also valid on tensors."""
        return self._resize_crop

    def __call__(self, data: bytes) -> torch.Tensor:
        """bytes → float32 tensor [3, H, W]; raises an ``InputError`` subclass."""
        return self.normalize(self.decode_crop(data)[None])[0]

    def decode_crop(self, data: bytes) -> torch.Tensor:
        """bytes → uint8 tensor [3, H, W], resized and cropped by Pillow."""
        return transforms.functional.pil_to_tensor(self._resize_crop(self.decode(data)))

    def normalize(self, crops_B3HW: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0..255 float) crops → float32 normalised, on their own device."""
        mean = self.mean.to(crops_B3HW.device)[:, None, None]
        std = self.std.to(crops_B3HW.device)[:, None, None]
        return (crops_B3HW.float() / 255 - mean) / std

    def probe(self, data: bytes) -> Probe:
        """Header checks only (format, pixel limits); raises an ``InputError`` subclass."""
        image = self._open(data)
        try:
            rotated = image.format == "JPEG" and image.getexif().get(EXIF_ORIENTATION, 1) != 1
        except (OSError, SyntaxError, ValueError, TypeError, KeyError):
            rotated = True  # an unreadable EXIF block: let Pillow's path handle it
        nvjpeg_ok = (
            image.format == "JPEG"
            and image.mode == "RGB"
            and not image.info.get("progressive")
            and not rotated
            and data[-64:].rstrip(b"\0").endswith(b"\xff\xd9")  # EOI marker: not truncated
        )
        return Probe(image.format, image.width, image.height, nvjpeg_ok)

    def _open(self, data: bytes) -> Image.Image:
        """Image.open reads only the header: the pixel count is checked before any pixel
        is decoded, so a decompression bomb costs nothing."""
        if not data:
            raise EmptyImage("the image is empty (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            self.check_size(*image.size)
        except InputError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image exceeds the pixel limit: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise UnsupportedImage(
                f"not a supported image ({', '.join(ALLOWED_FORMATS)}): {exc}"
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise CorruptImage(f"cannot decode the image (truncated or corrupt): {exc}") from exc
        return image

    def decode(self, data: bytes) -> Image.Image:
        image = self._open(data)
        try:
            if image.format == "JPEG":
                image.draft("RGB", (self._draft_size, self._draft_size))
            image.seek(0)  # animated GIF/WebP: first frame
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image exceeds the pixel limit: {exc}") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise CorruptImage(f"cannot decode the image (truncated or corrupt): {exc}") from exc
        return to_rgb(image)

    def check_size(self, width: int, height: int) -> None:
        """The limits on an image's size, known from its header (or a decoded image's
        shape): raises ``ImageTooLarge``."""
        if width * height > self.max_pixels:
            raise ImageTooLarge(
                f"image is {width}x{height} = {width * height} pixels; "
                f"the limit is {self.max_pixels}"
            )
        self._check_resized_pixels(width, height)

    def _check_resized_pixels(self, width: int, height: int) -> None:
        """Refuse extreme aspect ratios from the header: a 1x200000 PNG of a few hundred
        bytes passes the pixel limit, but scaling its shorter side up to the resize target
        would allocate gigabytes (the request dies with a MemoryError, or the process with
        it) before the center crop throws nearly all of it away."""
        if not self._short_side or min(width, height) <= 0:
            return
        scale = self._short_side / min(width, height)
        resized = round(width * scale) * round(height * scale)
        # Aspect ratios up to 64:1 always pass, however low the pixel limit is set.
        limit = max(self.max_pixels, 64 * self._short_side**2)
        if resized > limit:
            raise ImageTooLarge(
                f"image is {width}x{height}: resizing its shorter side to {self._short_side} "
                f"gives {resized} pixels; the limit is {limit} (aspect ratio too extreme)"
            )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, upright per EXIF, transparency composited onto white."""
    with contextlib.suppress(ValueError, TypeError, KeyError, OSError):
        image = ImageOps.exif_transpose(image)  # a bogus EXIF block keeps the stored one
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.int64)
        image = Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")

"""The eval transform's Resize + CenterCrop + Normalize for a whole batch of decoded images
of different sizes, in one Triton kernel (CUDA; imported only where Triton is).

nvjpeg decodes a batch in one call, but :class:`~app.serving.preprocess.TensorResizeCrop`
then resizes it one size at a time -- an antialiased ``F.interpolate``, a float
conversion, clamp, round, stack and normalise, each a launch with Python around it. At
batch 64 that halves what nvjpeg alone decodes a second (12.5k → 5.8k img/s on an H100):
the launches set the pace, not the GPU. Here the batch is one launch. Every image comes
as its address, size and strides in one small int64 table (a single host → device copy),
so images of any size and layout (CHW as nvjpeg gives, HWC views as nvImageCodec and the
v2 protocol's PIXELS give) are read where they lie, and each program writes a tile of one
image's normalised crop straight into its row of the model's input batch.

Per output pixel the kernel computes what ``F.interpolate(mode, antialias=True,
align_corners=False)`` computes on CUDA (aten's ``upsample_gen2d_aa_out_frame``): the
same separable filter weights (Keys a = -0.5 for bicubic, the triangle for bilinear,
widened by the scale when downscaling, normalised to sum 1), in fp32, summed in the same
order (each window row across x, then the rows down y). Then ``clamp(0, 255).round()`` as
``TensorResizeCrop`` does off the CPU, and ``Preprocessor.normalize``'s multiply-add.
Results agree with that path to the grey level; the rare exception is a value at .5
that fp32 rounding (FMA contraction, the CPU reference's other summation order) tips the
other way.

The images are read through raw addresses, so torch does not see the kernel use them: it
must run on the stream that made them (as the decode stage does), or after it.
"""

# No ``from __future__ import annotations``: Triton reads the kernels' annotations as
# objects (tl.constexpr), never strings.
import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from app.serving.preprocess import Preprocessor, TensorResizeCrop

# Half the filter's width at scale 1: how far the filter reaches, in input pixels.
HALF_WIDTH = {"bicubic": 2.0, "bilinear": 1.0}
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_Y, BLOCK_X = 16, 32  # output pixels per program: 14 x 7 tiles of a 224 crop
# The per-image table, one int64 row per image: address, height, width, strides (channel,
# y, x), resized height and width, the crop's top and left, the output row.
COLUMNS = 11


@triton.jit
def _filter(j, count, first_m_center, invscale, BICUBIC: tl.constexpr):
    """aten's raw weight of the ``j`` th input pixel of each span (0 past its end): Pillow's
    filter (Keys' cubic with a = -0.5, or the triangle) at its distance from the centre."""
    x = tl.abs((j + first_m_center + 0.5) * invscale)
    if BICUBIC:
        near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1.0
        far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
        w = tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))
    else:
        w = tl.where(x < 1.0, 1.0 - x, 0.0)
    return tl.where(j < count, w, 0.0)


@triton.jit
def _span(position, in_size, out_size, HALF_WIDTH: tl.constexpr, BICUBIC: tl.constexpr):
    """aten's ``_compute_weights_span`` along one axis for output ``position`` s: the first
    input pixel, how many are read, and what the weights need (offset of the first from
    the centre, 1/scale when downscaling, the sum of the raw weights that normalises them,
    1 where it is 0, as aten leaves those as they are); plus the window, the most pixels
    any position reads (the loop bound)."""
    scale = tl.math.div_rn(in_size.to(tl.float32), out_size.to(tl.float32))
    down = scale >= 1.0
    support = tl.where(down, HALF_WIDTH * scale, HALF_WIDTH)
    invscale = tl.where(down, tl.math.div_rn(1.0, scale), 1.0)
    center = scale * (position.to(tl.float32) + 0.5)
    first = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    count = tl.minimum((center + support + 0.5).to(tl.int32), in_size.to(tl.int32)) - first
    first_m_center = first.to(tl.float32) - center
    window = tl.math.ceil(support).to(tl.int32) * 2 + 1
    total = tl.zeros_like(center)
    for j in range(0, window):
        total += _filter(j, count, first_m_center, invscale, BICUBIC)
    total = tl.where(total != 0.0, total, 1.0)
    return first, count, first_m_center, invscale, total, window


@triton.jit
def _normalised(acc, affine_ptr, channel: tl.constexpr):
    """``clamp(0, 255).round()`` (half to even, as torch), then ``x·scale - shift``."""
    v = tl.minimum(tl.maximum(acc, 0.0), 255.0)
    whole = tl.math.floor(v)
    frac = v - whole
    odd = (whole.to(tl.int32) % 2) == 1
    v = whole + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
    return v * tl.load(affine_ptr + channel) - tl.load(affine_ptr + 3 + channel)


@triton.jit
def _resize_crop_normalize_kernel(
    table_ptr,
    affine_ptr,
    out_ptr,
    crop_h,
    crop_w,
    COLUMNS: tl.constexpr,
    HALF_WIDTH: tl.constexpr,
    BICUBIC: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    row = table_ptr + tl.program_id(2) * COLUMNS
    src = tl.load(row + 0).to(tl.pointer_type(tl.uint8))
    height, width = tl.load(row + 1), tl.load(row + 2)
    stride_c, stride_y, stride_x = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
    resized_h, resized_w = tl.load(row + 6), tl.load(row + 7)
    top, left, out_row = tl.load(row + 8), tl.load(row + 9), tl.load(row + 10)

    oy = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    ox = tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X)
    inside = (oy < crop_h)[:, None] & (ox < crop_w)[None, :]
    # the crop's pixels are the resized image's from (top, left)
    y0, ny, y_off, y_inv, y_total, y_window = _span(
        oy + top.to(tl.int32), height, resized_h, HALF_WIDTH, BICUBIC
    )
    x0, nx, x_off, x_inv, x_total, x_window = _span(
        ox + left.to(tl.int32), width, resized_w, HALF_WIDTH, BICUBIC
    )

    red = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
    green = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
    blue = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
    x_first = src + x0.to(tl.int64)[None, :] * stride_x
    for dy in range(0, y_window):
        wy = tl.math.div_rn(_filter(dy, ny, y_off, y_inv, BICUBIC), y_total)[:, None]
        line = x_first + (y0 + dy).to(tl.int64)[:, None] * stride_y
        line_read = inside & (dy < ny)[:, None]
        row_r = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
        row_g = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
        row_b = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
        for dx in range(0, x_window):
            wx = tl.math.div_rn(_filter(dx, nx, x_off, x_inv, BICUBIC), x_total)[None, :]
            read = line_read & (dx < nx)[None, :]
            at = line + dx * stride_x
            row_r += tl.load(at, mask=read, other=0).to(tl.float32) * wx
            row_g += tl.load(at + stride_c, mask=read, other=0).to(tl.float32) * wx
            row_b += tl.load(at + 2 * stride_c, mask=read, other=0).to(tl.float32) * wx
        red += row_r * wy
        green += row_g * wy
        blue += row_b * wy

    plane = crop_h * crop_w
    out = out_ptr + out_row * 3 * plane + (oy[:, None] * crop_w + ox[None, :])
    dtype = out_ptr.dtype.element_ty
    tl.store(out, _normalised(red, affine_ptr, 0).to(dtype), mask=inside)
    tl.store(out + plane, _normalised(green, affine_ptr, 1).to(dtype), mask=inside)
    tl.store(out + 2 * plane, _normalised(blue, affine_ptr, 2).to(dtype), mask=inside)


class ResizeCropNormalize:
    """Decoded uint8 images ``[3, H, W]`` of any sizes → their rows of the model's input,
    resized, cropped and normalised as ``TensorResizeCrop`` + ``Preprocessor.normalize``
    do, in one launch. Raises ``ValueError`` for an interpolation it does not implement
    (the caller keeps the torch path)."""

    def __init__(self, preprocessor: Preprocessor) -> None:
        self.geometry = TensorResizeCrop(preprocessor.resize_crop)
        if self.geometry.mode not in HALF_WIDTH:
            raise ValueError(
                f"the resize kernel implements {', '.join(HALF_WIDTH)}, "
                f"not {self.geometry.mode!r} interpolation"
            )
        scale = 1 / (255 * preprocessor.std)  # exactly Preprocessor.normalize's constants
        shift = preprocessor.mean / preprocessor.std
        self._affine_cpu = torch.cat([scale, shift]).float()
        self._affine: dict[torch.device, torch.Tensor] = {}

    def __call__(
        self,
        images_3HW: Sequence[torch.Tensor],
        out_B3hw: torch.Tensor,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Write image ``k`` 's normalised crop into ``out_B3hw[rows[k]]`` (``rows``: 0, 1,
        ... by default); ``out_B3hw`` is contiguous, fp32/bf16/fp16, on the images'
        device. Returns ``out_B3hw``."""
        crop_h, crop_w = self.geometry.crop
        if out_B3hw.dtype not in OUT_DTYPES or not out_B3hw.is_contiguous():
            raise ValueError(f"out must be contiguous {OUT_DTYPES}, got {out_B3hw.dtype}")
        if out_B3hw.shape[1:] != (3, crop_h, crop_w):
            raise ValueError(f"out must be [B, 3, {crop_h}, {crop_w}], got {out_B3hw.shape}")
        rows = range(len(images_3HW)) if rows is None else rows
        if not images_3HW:
            return out_B3hw
        table = []
        for image, row in zip(images_3HW, rows, strict=True):
            channels, height, width = image.shape
            if image.dtype != torch.uint8 or channels != 3:
                raise ValueError(f"expected uint8 [3, H, W], got {image.dtype} {image.shape}")
            resized_h, resized_w = self.geometry.resized(height, width)
            if crop_h > resized_h or crop_w > resized_w:
                raise ValueError(
                    f"crop {self.geometry.crop} is larger than the resized {resized_h}x{resized_w}"
                )
            top, left = round((resized_h - crop_h) / 2.0), round((resized_w - crop_w) / 2.0)
            table.append(
                [image.data_ptr(), height, width, *image.stride(), resized_h, resized_w]
                + [top, left, row]
            )
        device = out_B3hw.device
        table_NC = torch.tensor(table, dtype=torch.int64, device=device)  # the one copy
        if device not in self._affine:
            self._affine[device] = self._affine_cpu.to(device)
        grid = (triton.cdiv(crop_w, BLOCK_X), triton.cdiv(crop_h, BLOCK_Y), len(table))
        # Triton launches on the current device: a replica on cuda:1 must make it current
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            _resize_crop_normalize_kernel[grid](
                table_NC,
                self._affine[device],
                out_B3hw,
                crop_h,
                crop_w,
                COLUMNS=COLUMNS,
                HALF_WIDTH=HALF_WIDTH[self.geometry.mode],
                BICUBIC=self.geometry.mode == "bicubic",
                BLOCK_Y=BLOCK_Y,
                BLOCK_X=BLOCK_X,
            )
        return out_B3hw

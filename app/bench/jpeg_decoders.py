"""The JPEG decoders the decode stage could use, side by side: how many photos a second each
turns into model-ready crops, and how close its crops come to the eval transform's.

Issue #21 asks for the decode ceiling of each backend before the engine picks one:

* ``pillow``: Pillow (libjpeg-turbo) on one core, then the server's CPU resize;
* ``simplejpeg``: the server's CPU decode of upright RGB JPEGs (the same libjpeg-turbo at
  Pillow's DCT scale, without Pillow's overhead and the GIL);
* ``torchvision-nvjpeg``: ``torchvision.io.decode_jpeg(device="cuda")``, what the server
  uses today (nvjpeg's CUDA decoder: Huffman on the host, IDCT on the SMs);
* ``nvimgcodec-hw``: nvImageCodec's hardware backend, the GPU's NVJPG engines (no SMs, no
  host Huffman);
* ``nvimgcodec-cuda``: nvImageCodec's CUDA backend (nvjpeg, as torchvision's);
* ``nvimgcodec-cpu``: nvImageCodec's CPU backend (libjpeg-turbo) on one thread.

Each runs one Python thread over batches of baseline RGB JPEGs (what nvjpeg takes;
``Preprocessor.probe``), synchronised per batch, in up to three steps:

* ``decode``: decode alone;
* ``decode+crop``: then resize + crop (:class:`~app.serving.preprocess.TensorResizeCrop` on
  the decoder's device: one ``interpolate`` per image size, float crops, not normalised);
* ``decode+fused``: for the backends that decode onto the GPU, then the resize kernel
  (:class:`~app.serving.resize_kernel.ResizeCropNormalize`) writing the whole normalised
  batch in the model's dtype (``--dtype``) in one launch, as the decode stage does.

Fidelity: each backend's crops against the eval transform (Pillow decode and resize), as
maximum, mean and 99.9th-percentile absolute difference in grey levels; for the GPU
backends also the kernel's (its fp32 output turned back into grey levels).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from app.bench.images import load_images
from app.serving.preprocess import Preprocessor, TensorResizeCrop
from app.store.manifest import Preprocessing
from app.timing import device_slug, environment

try:
    from app.serving.resize_kernel import ResizeCropNormalize
except ImportError:  # no Triton: no decode+fused step
    ResizeCropNormalize = None

Decode = Callable[[list[bytes]], list[torch.Tensor]]  # JPEGs -> uint8 [3, H, W] each
Step = Callable[[list[torch.Tensor]], Any]  # what runs on each batch's decoded images
# The backends whose images land on the GPU, where the resize kernel can take them.
GPU_OUTPUT = ("torchvision-nvjpeg", "nvimgcodec-hw", "nvimgcodec-cuda")


def _nvimgcodec_decoder(kind: str, device: torch.device) -> Decode | None:
    """An nvImageCodec decoder of one backend kind, or None where it cannot run here."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    backend = getattr(nvimgcodec.BackendKind, kind)
    on_cpu = kind == "CPU_ONLY"
    device_id = nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY if on_cpu else device.index or 0
    try:
        decoder = nvimgcodec.Decoder(
            device_id=device_id, backends=[nvimgcodec.Backend(backend)], max_num_cpu_threads=1
        )
    except RuntimeError:
        return None

    def decode(jpegs: list[bytes]) -> list[torch.Tensor]:
        images = decoder.decode(jpegs)
        if any(image is None for image in images):
            raise RuntimeError(f"nvImageCodec {kind} decoded {images.count(None)} images to None")
        if on_cpu:
            return [torch.from_numpy(image.cpu().__array__()).permute(2, 0, 1) for image in images]
        return [torch.from_dlpack(image).permute(2, 0, 1) for image in images]

    return decode


def decoders(device: torch.device) -> dict[str, Decode]:
    """Every backend that runs on this machine (the GPU ones only with ``device`` CUDA)."""
    pre = Preprocessor(Preprocessing(), 10**9)
    found: dict[str, Decode] = {
        "pillow": lambda jpegs: [pil_to_tensor(pre.decode(j)) for j in jpegs],
        "simplejpeg": lambda jpegs: [pre.decode_jpeg(j, Image.open(io.BytesIO(j))) for j in jpegs],
    }
    kinds = {"nvimgcodec-cpu": "CPU_ONLY"}
    if device.type == "cuda":

        def torchvision_nvjpeg(jpegs: list[bytes]) -> list[torch.Tensor]:
            encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

        found["torchvision-nvjpeg"] = torchvision_nvjpeg
        kinds |= {"nvimgcodec-hw": "HW_GPU_ONLY", "nvimgcodec-cuda": "GPU_ONLY"}
    for name, kind in kinds.items():
        decode = _nvimgcodec_decoder(kind, device)
        if decode is not None:
            found[name] = decode
    return found


def fused_runs(device: torch.device) -> bool:
    """Whether the resize kernel runs here: Triton and CUDA."""
    return ResizeCropNormalize is not None and device.type == "cuda"


def fused_step(batch: int, dtype: torch.dtype, device: torch.device) -> Step:
    """The resize kernel writing a normalised ``batch`` in ``dtype`` (see :func:`fused_runs`)."""
    kernel = ResizeCropNormalize(Preprocessor(Preprocessing(), 10**9))
    out = torch.empty(batch, 3, *kernel.geometry.crop, dtype=dtype, device=device)
    return lambda images: kernel(images, out)


def fused_crops(images: list[torch.Tensor]) -> torch.Tensor:
    """The resize kernel's fp32 output for ``images``, back in grey levels, on the CPU."""
    pre = Preprocessor(Preprocessing(), 10**9)
    kernel = ResizeCropNormalize(pre)
    out = torch.empty(len(images), 3, *kernel.geometry.crop, device=images[0].device)
    normalized = kernel(images, out).cpu()
    return (normalized + (pre.mean / pre.std)[:, None, None]) * (255 * pre.std)[:, None, None]


def fidelity(
    decode: Decode, jpegs: list[bytes], device: torch.device, *, fused: bool = False
) -> dict[str, float]:
    """Grey-level differences of ``decode``'s crops (resized on its output's device by
    ``TensorResizeCrop``, or with ``fused`` by the resize kernel) from the eval transform's
    own (Pillow decode, Pillow resize and crop)."""
    pre = Preprocessor(Preprocessing(), 10**9)
    if fused:
        ours = fused_crops(decode(jpegs)).round()  # undoing normalize leaves ~1e-5 levels
    else:
        crop = TensorResizeCrop(pre.resize_crop)
        ours = torch.stack([c.float().cpu() for c in crop(decode(jpegs))])
    reference = torch.stack([pil_to_tensor(pre.resize_crop(pre.decode(j))) for j in jpegs])
    diff = (ours - reference.float()).abs().flatten()
    return {
        "max": diff.max().item(),
        "mean": diff.mean().item(),
        "p99_9": diff.quantile(0.999).item() if diff.numel() <= 2**24 else float("nan"),
    }


def rate(decode: Decode, jpegs: list[bytes], *, then: Step | None, seconds: float) -> float:
    """Images a second through ``decode`` (and ``then``) on one thread, each batch
    synchronised."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(2):  # warm-up: allocations, nvjpeg/nvimgcodec state, kernel compilation
        images = decode(jpegs)
        if then is not None:
            then(images)
    sync()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        images = decode(jpegs)
        if then is not None:
            then(images)
        sync()
        done += len(jpegs)
    return done / (time.perf_counter() - started)


def steps(
    name: str, batch: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Step | None]:
    """The steps measured for decoder ``name`` at ``batch``: what follows the decode."""
    crop = TensorResizeCrop(Preprocessor(Preprocessing(), 10**9).resize_crop)
    found: dict[str, Step | None] = {"decode": None, "decode+crop": crop}
    if name in GPU_OUTPUT and fused_runs(device):
        found["decode+fused"] = fused_step(batch, dtype, device)
    return found


def run(
    folder: Path,
    *,
    device: torch.device,
    batches: Sequence[int],
    seconds: float,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Any]:
    pre = Preprocessor(Preprocessing(), 10**9)
    photos = [data for _, data in load_images(folder, count=10**6) if pre.probe(data).nvjpeg_ok]
    rows = []
    found = decoders(device)
    plan = [
        (n, b, s, then)
        for n in found
        for b in batches
        for s, then in steps(n, b, device, dtype).items()
    ]
    for name, batch, step, then in tqdm(plan, desc="decoder x batch x step"):
        jpegs = (photos * (batch // len(photos) + 1))[:batch]
        img_s = rate(found[name], jpegs, then=then, seconds=seconds)
        rows.append({"decoder": name, "batch": batch, "step": step, "img_s": img_s})
    fused = [name for name in found if name in GPU_OUTPUT and fused_runs(device)]
    return {
        **environment(device),
        "photos": len(photos),
        "folder": str(folder),
        "threads_per_decoder": 1,
        "fused_dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
        "fidelity": {name: fidelity(decode, photos[:64], device) for name, decode in found.items()},
        "fidelity_fused": {n: fidelity(found[n], photos[:64], device, fused=True) for n in fused},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench.jpeg_decoders",
        description="Decode ceiling and crop fidelity of each JPEG decoder backend.",
    )
    parser.add_argument("--images", type=Path, default=Path("../shared/images/imagenet-dev"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="the batch decode+fused writes (the model's input dtype; bfloat16 as served)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/decode"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    result = run(
        args.images, device=device, batches=args.batches, seconds=args.seconds, dtype=dtype
    )
    print(f"{'decoder':20} {'batch':>5} {'step':12} {'img/s':>9}")
    for row in result["rows"]:
        print(f"{row['decoder']:20} {row['batch']:5} {row['step']:12} {row['img_s']:9.0f}")
    for kind, label in (("fidelity", "crop"), ("fidelity_fused", "fused")):
        for name, diff in result[kind].items():
            print(
                f"{name:20} {label:5} vs eval transform: max {diff['max']:.0f}, "
                f"mean {diff['mean']:.3f}, p99.9 {diff['p99_9']:.1f} grey levels"
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out_dir / f"jpeg-decoders-{device_slug(device)}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

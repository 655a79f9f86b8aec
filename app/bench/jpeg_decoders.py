"""The JPEG decoders the decode stage could use, side by side: how many photos a second each
turns into model-ready crops, and how close its crops come to the eval transform's.

Issue #21 asks for the decode ceiling of each backend before the engine picks one:

* ``pillow``: Pillow (libjpeg-turbo) on one core, then the server's CPU resize;
* ``simplejpeg``: the server's CPU decode of upright RGB and grey JPEGs (the same libjpeg-turbo at
  Pillow's DCT scale, without Pillow's overhead and the GIL);
* ``torchvision-nvjpeg``: ``torchvision.io.decode_jpeg(device="cuda")``, what the server
  uses today (nvjpeg's CUDA decoder: Huffman on the host, IDCT on the SMs);
* ``nvimgcodec-hw``: nvImageCodec's hardware backend, the GPU's NVJPG engines (no SMs, no
  host Huffman);
* ``nvimgcodec-cuda``: nvImageCodec's CUDA backend (nvjpeg, as torchvision's);
* ``nvimgcodec-cpu``: nvImageCodec's CPU backend (libjpeg-turbo) on one thread.

Each runs one Python thread (``--threads``: then also several at once, one decoder and CUDA
stream each: torchvision's nvjpeg decodes behind one process-wide lock, nvImageCodec's
decoders are independent) over batches of baseline RGB JPEGs (what nvjpeg takes;
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
import contextlib
import io
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from app.bench.images import load_images
from app.bench.tables import write_result
from app.environment import device_slug, environment
from app.serving.preprocess import Preprocessor, TensorResizeCrop
from app.store.manifest import Preprocessing

try:
    from app.serving.resize_kernel import ResizeCropNormalize
except ImportError:  # no Triton: no decode+fused step
    ResizeCropNormalize = None

Decode = Callable[[list[bytes]], list[torch.Tensor]]  # JPEGs -> uint8 [3, H, W] each
Step = Callable[[list[torch.Tensor]], Any]  # what runs on each batch's decoded images
# The backends whose images land on the GPU, where the resize kernel can take them.
GPU_OUTPUT = ("torchvision-nvjpeg", "nvimgcodec-hw", "nvimgcodec-cuda", "nvimgcodec-hw+cuda")


def on_gpu(name: str) -> bool:
    """Whether decoder ``name``'s images land on the GPU (its variants' too)."""
    return name.startswith(GPU_OUTPUT)


# nvImageCodec decoders by name: their backends (kind, load hint), host threads and options.
# Its nvjpeg CUDA decoder is of kind HYBRID_CPU_GPU (GPU_ONLY finds no JPEG decoder): each
# image's Huffman pass on one of its own host threads (no Python lock, no torchvision one), or
# with ``hybrid_huffman_threshold=0`` on the GPU for every image ("-gpu-huffman"); "-tN"
# names its host threads. "hw+cuda" is one decoder over
# both GPU backends: the NVJPG engines take the load hint's share of a batch and the CUDA
# backend the rest, split inside nvImageCodec.
GPU_HUFFMAN = "nvjpeg_cuda_decoder:hybrid_huffman_threshold=0"
NVIMGCODEC = {
    "nvimgcodec-cpu": ([("CPU_ONLY", 1.0)], 1, ""),
    "nvimgcodec-hw": ([("HW_GPU_ONLY", 1.0)], 1, ""),
    "nvimgcodec-cuda": ([("HYBRID_CPU_GPU", 1.0)], 1, ""),
    "nvimgcodec-cuda-t4": ([("HYBRID_CPU_GPU", 1.0)], 4, ""),
    "nvimgcodec-cuda-t8": ([("HYBRID_CPU_GPU", 1.0)], 8, ""),
    "nvimgcodec-cuda-t12": ([("HYBRID_CPU_GPU", 1.0)], 12, ""),
    "nvimgcodec-cuda-gpu-huffman": ([("HYBRID_CPU_GPU", 1.0)], 4, GPU_HUFFMAN),
    "nvimgcodec-hw+cuda": ([("HW_GPU_ONLY", 0.5), ("HYBRID_CPU_GPU", 1.0)], 4, ""),
    "nvimgcodec-hw+cuda-t8": ([("HW_GPU_ONLY", 0.3), ("HYBRID_CPU_GPU", 1.0)], 8, ""),
}


def _nvimgcodec_decoder(name: str, device: torch.device) -> Decode | None:
    """The nvImageCodec decoder ``name`` (:data:`NVIMGCODEC`), or None where it cannot run
    here (why goes to stderr)."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    kinds, cpu_threads, options = NVIMGCODEC[name]
    on_cpu = kinds[0][0] == "CPU_ONLY"
    device_id = nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY if on_cpu else device.index or 0
    backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, k), h) for k, h in kinds]
    try:
        decoder = nvimgcodec.Decoder(
            device_id=device_id,
            backends=backends,
            max_num_cpu_threads=cpu_threads,
            options=options,
        )
    except RuntimeError as exc:
        print(f"{name}: no decoder here ({exc})", file=sys.stderr)
        return None

    def decode(jpegs: list[bytes]) -> list[torch.Tensor]:
        stream = {} if on_cpu else {"cuda_stream": torch.cuda.current_stream(device).cuda_stream}
        images = decoder.decode(jpegs, **stream)
        if any(image is None for image in images):
            raise RuntimeError(f"{name} decoded {images.count(None)} images to None")
        if on_cpu:
            return [torch.from_numpy(image.cpu().__array__()).permute(2, 0, 1) for image in images]
        return [torch.from_dlpack(image).permute(2, 0, 1) for image in images]

    return decode


def makers(device: torch.device) -> dict[str, Callable[[], Decode | None]]:
    """Each backend that may run on ``device``, as a maker of a fresh decoder (one per
    thread: nvImageCodec's are independent; torchvision's share one process-wide decoder)."""
    pre = Preprocessor(Preprocessing(), 10**9)
    found: dict[str, Callable[[], Decode | None]] = {
        "pillow": lambda: lambda jpegs: [pil_to_tensor(pre.decode(j)) for j in jpegs],
        "simplejpeg": lambda: (
            lambda jpegs: [pre.decode_jpeg(j, Image.open(io.BytesIO(j))) for j in jpegs]
        ),
    }
    if device.type == "cuda":

        def torchvision_nvjpeg(jpegs: list[bytes]) -> list[torch.Tensor]:
            encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

        found["torchvision-nvjpeg"] = lambda: torchvision_nvjpeg
    for name in NVIMGCODEC if device.type == "cuda" else ["nvimgcodec-cpu"]:
        found[name] = partial(_nvimgcodec_decoder, name, device)
    return found


def decoders(device: torch.device, names: Sequence[str] | None = None) -> dict[str, Decode]:
    """Every backend (or those in ``names``) that runs on this machine (the GPU ones only
    with ``device`` CUDA)."""
    made = {n: make() for n, make in makers(device).items() if names is None or n in names}
    return {name: decode for name, decode in made.items() if decode is not None}


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


def rate(
    make: Callable[[], tuple[Decode, Step | None]],
    jpegs: list[bytes],
    *,
    seconds: float,
    threads: int = 1,
) -> float:
    """Images a second through ``threads`` Python threads at once, each with its own decoder
    and step (from ``make``) on its own CUDA stream, each batch synchronised on it; two
    warm-up batches a thread first (allocations, decoder state, kernel compilation). Above
    one thread: whether a backend decodes more with more threads, as the server's decode
    stage runs it."""
    done = [0] * threads
    started = threading.Barrier(threads + 1)
    stop = threading.Event()
    failed: list[BaseException] = []

    def work(k: int) -> None:
        try:
            decode, then = make()
            stream = torch.cuda.Stream() if torch.cuda.is_available() else None
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                for warm in (True, True, False):
                    if not warm:
                        started.wait()
                    while not stop.is_set():
                        images = decode(jpegs)
                        if then is not None:
                            then(images)
                        if stream is not None:
                            stream.synchronize()
                        if warm:
                            break
                        done[k] += len(jpegs)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            failed.append(exc)
            started.abort()

    workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    for worker in workers:
        worker.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a thread failed: raised below
        started.wait()
    begun = time.perf_counter()
    if not failed:
        time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    if failed:
        raise failed[0]
    return sum(done) / (time.perf_counter() - begun)


def steps(
    name: str, batch: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Step | None]:
    """The steps measured for decoder ``name`` at ``batch``: what follows the decode."""
    crop = TensorResizeCrop(Preprocessor(Preprocessing(), 10**9).resize_crop)
    found: dict[str, Step | None] = {"decode": None, "decode+crop": crop}
    if on_gpu(name) and fused_runs(device):
        found["decode+fused"] = fused_step(batch, dtype, device)
    return found


def run(
    folder: Path,
    *,
    device: torch.device,
    batches: Sequence[int],
    seconds: float,
    dtype: torch.dtype = torch.bfloat16,
    threads: Sequence[int] = (1,),
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every decoder x batch x step on one thread; then, for each count in ``threads`` above
    one, the GPU decoders' decode and decode+fused on that many threads at once."""
    pre = Preprocessor(Preprocessing(), 10**9)
    photos = [data for _, data in load_images(folder, count=10**6) if pre.probe(data).nvjpeg_ok]
    rows = []
    found = decoders(device, names)
    plan = [
        (n, b, s, then)
        for n in found
        for b in batches
        for s, then in steps(n, b, device, dtype).items()
    ]
    for name, batch, step, then in tqdm(plan, desc="decoder x batch x step"):
        jpegs = (photos * (batch // len(photos) + 1))[:batch]
        decode = found[name]
        img_s = rate(lambda d=decode, t=then: (d, t), jpegs, seconds=seconds)
        rows.append({"decoder": name, "batch": batch, "step": step, "threads": 1, "img_s": img_s})
    make = makers(device)
    parallel = [
        (n, b, s, k)
        for k in threads
        if k > 1
        for n in found
        if on_gpu(n)
        for b in batches
        for s in steps(n, b, device, dtype)
        if s != "decode+crop"
    ]
    for name, batch, step, k in tqdm(parallel, desc="decoder x batch x step x threads"):
        jpegs = (photos * (batch // len(photos) + 1))[:batch]

        def both(name: str = name, batch: int = batch, step: str = step) -> tuple[Decode, Step]:
            then = fused_step(batch, dtype, device) if step == "decode+fused" else None
            return make[name](), then

        img_s = rate(both, jpegs, threads=k, seconds=seconds)
        rows.append({"decoder": name, "batch": batch, "step": step, "threads": k, "img_s": img_s})
    fused = [name for name in found if on_gpu(name) and fused_runs(device)]
    return {
        # asked for but not made here (why went to stderr): a row missing is not a slow one
        "missing": sorted(set(names or ()) - set(found)),
        **environment(device),
        "photos": len(photos),
        "folder": str(folder),
        "threads": sorted({1, *threads}),
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
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="also time the GPU decoders on this many threads at once (one decoder and CUDA "
        "stream each), as the server's decode threads run them",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="the batch decode+fused writes (the model's input dtype; bfloat16 as served)",
    )
    parser.add_argument(
        "--decoders", nargs="+", help="only these decoders (default: every one that runs here)"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/decode"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    result = run(
        args.images,
        device=device,
        batches=args.batches,
        seconds=args.seconds,
        dtype=dtype,
        threads=args.threads,
        names=args.decoders,
    )
    print(f"{'decoder':20} {'threads':>7} {'batch':>5} {'step':12} {'img/s':>9}")
    for row in result["rows"]:
        print(
            f"{row['decoder']:20} {row['threads']:7} {row['batch']:5} {row['step']:12} "
            f"{row['img_s']:9.0f}"
        )
    if result["missing"]:
        print(f"not timed (no decoder here): {', '.join(result['missing'])}")
    for kind, label in (("fidelity", "crop"), ("fidelity_fused", "fused")):
        for name, diff in result[kind].items():
            print(
                f"{name:20} {label:5} vs eval transform: max {diff['max']:.0f}, "
                f"mean {diff['mean']:.3f}, p99.9 {diff['p99_9']:.1f} grey levels"
            )
    write_result(args.out_dir, f"jpeg-decoders-{device_slug(device)}", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

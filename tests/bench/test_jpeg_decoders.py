"""The decoder comparison measures real decodes and holds every backend to the eval transform."""

from __future__ import annotations

import pytest
import torch

from app.bench.images import load_images
from app.bench.jpeg_decoders import (
    GPU_OUTPUT,
    decoders,
    fidelity,
    fused_runs,
    makers,
    rate,
    run,
    steps,
)
from app.serving.preprocess import Preprocessor
from app.store.manifest import Preprocessing

CPU = torch.device("cpu")


def jpegs(count: int = 4) -> list[bytes]:
    pre = Preprocessor(Preprocessing(), 10**9)
    found = [data for _, data in load_images(None, count=16) if pre.probe(data).nvjpeg_ok]
    assert found, "the generated images include baseline JPEGs"
    return (found * count)[:count]


def test_every_cpu_decoder_is_timed_and_its_crops_match_the_eval_transform() -> None:
    found = decoders(CPU)

    assert {"pillow", "simplejpeg"} <= set(found)
    assert "torchvision-nvjpeg" not in found  # GPU ones need CUDA
    for name, decode in found.items():
        assert rate(lambda d=decode: (d, None), jpegs(), seconds=0.05) > 0, name
        diff = fidelity(decode, jpegs(), CPU)
        assert diff["max"] <= 2 and diff["mean"] < 0.1, (name, diff)


def test_nvimgcodec_cpu_decodes_exactly_as_pillow() -> None:
    found = decoders(CPU)
    if "nvimgcodec-cpu" not in found:
        pytest.skip("nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu13)")
    data = jpegs(2)
    for ours, pillows in zip(found["nvimgcodec-cpu"](data), found["pillow"](data), strict=True):
        assert torch.equal(ours, pillows)


def test_simplejpeg_decodes_the_server_s_cpu_path_exactly_as_pillow() -> None:
    found, data = decoders(CPU), jpegs(2)
    for ours, pillows in zip(found["simplejpeg"](data), found["pillow"](data), strict=True):
        assert torch.equal(ours, pillows)


def test_the_fused_step_is_measured_for_gpu_decoders_only() -> None:
    """decode+fused needs the decoded images on the GPU: never for a CPU backend, and on a
    CPU-only machine for none (the step is left out, not failed)."""
    assert list(steps("pillow", 4, CPU, torch.bfloat16)) == ["decode", "decode+crop"]
    assert "decode+fused" not in steps("torchvision-nvjpeg", 4, CPU, torch.bfloat16)
    assert not fused_runs(CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_the_fused_step_is_timed_and_its_crops_match_the_eval_transform() -> None:
    """On CUDA with Triton: every GPU backend's decode+fused runs, and the kernel's crops are
    as close to the eval transform as TensorResizeCrop's (the same resize, to a grey level)."""
    cuda = torch.device("cuda")
    if not fused_runs(cuda):
        pytest.skip("Triton is not installed")
    found = {name: d for name, d in decoders(cuda).items() if name in GPU_OUTPUT}
    assert "torchvision-nvjpeg" in found
    for name, decode in found.items():
        fused = steps(name, 4, cuda, torch.bfloat16)["decode+fused"]
        assert rate(lambda d=decode, f=fused: (d, f), jpegs(), seconds=0.05) > 0, name
        crop, kernel = fidelity(decode, jpegs(), cuda), fidelity(decode, jpegs(), cuda, fused=True)
        assert kernel["max"] <= crop["max"] + 1 and kernel["mean"] <= crop["mean"] + 0.01, name


def test_several_threads_decode_at_once_and_a_failing_one_fails_the_measure() -> None:
    """--threads: each thread its own decoder; a decoder that raises is not timed as fast."""
    simplejpeg = makers(CPU)["simplejpeg"]
    assert rate(lambda: (simplejpeg(), None), jpegs(), threads=2, seconds=0.05) > 0

    def broken(_: list[bytes]) -> list[torch.Tensor]:
        raise RuntimeError("no decoder")

    with pytest.raises(RuntimeError, match="no decoder"):
        rate(lambda: (broken, None), jpegs(), threads=2, seconds=0.05)


def test_a_decoder_asked_for_but_not_made_here_is_named_not_dropped(tmp_path) -> None:
    """A decoder that cannot be made (no CUDA, no library, a backend kind with no JPEG
    decoder) leaves no row: the result names it, so a missing row is not read as slow."""
    for i, data in enumerate(jpegs(2)):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    result = run(
        tmp_path, device=CPU, batches=[2], seconds=0.02, names=["simplejpeg", "nvimgcodec-cuda"]
    )
    assert {row["decoder"] for row in result["rows"]} == {"simplejpeg"}
    assert result["missing"] == ["nvimgcodec-cuda"]

"""The decoder comparison measures real decodes and holds every backend to the eval transform."""

from __future__ import annotations

import pytest
import torch

from app.bench.images import load_images
from app.bench.jpeg_decoders import decoders, fidelity, rate
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

    assert "pillow" in found and "torchvision-nvjpeg" not in found  # GPU ones need CUDA
    for name, decode in found.items():
        assert rate(decode, jpegs(), crop=None, seconds=0.05) > 0, name
        diff = fidelity(decode, jpegs(), CPU)
        assert diff["max"] <= 2 and diff["mean"] < 0.1, (name, diff)


def test_nvimgcodec_cpu_decodes_exactly_as_pillow() -> None:
    found = decoders(CPU)
    if "nvimgcodec-cpu" not in found:
        pytest.skip("nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu13)")
    data = jpegs(2)
    for ours, pillows in zip(found["nvimgcodec-cpu"](data), found["pillow"](data), strict=True):
        assert torch.equal(ours, pillows)

"""nvImageCodec's JPEG decoders. The hardware one beside nvjpeg: each batch is split between
them so both finish together. Its CUDA one in place of torchvision's. What either refuses goes
to the CPU path, and their crops stay within the eval transform's tolerance."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from app.config import Settings
from app.serving.decode import BatchDecoder, Encoded
from app.serving.metrics import Metrics
from app.serving.nvimgcodec_jpeg import NvImageCodecJpeg, Split
from app.serving.pool import ModelPool
from app.serving.preprocess import Preprocessor
from app.store import ModelStore
from app.store.manifest import Preprocessing
from tests.unit.test_decode import photo

DEIT = Preprocessing(input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")


def assert_within_eval_tolerance(inputs: torch.Tensor, photos: list[bytes], pre) -> None:
    """The batch's rows lie within 3 grey levels on average of the eval transform's crops."""
    expected = torch.stack([pre(d) for d in photos]).to(inputs.device)
    grey_levels = ((inputs - expected) * pre.std.to(inputs.device)[:, None, None] * 255).abs()
    assert grey_levels.mean() < 3, f"mean {grey_levels.mean():.2f} grey levels"


def test_the_share_balances_the_backends_so_both_finish_together():
    split = Split(smoothing=1.0)
    assert split.count(64) == 32  # no measurement yet: half each
    split.observe("hardware", 32, 0.032)  # 1 ms an image
    split.observe("nvjpeg", 32, 0.016)  # 0.5 ms an image
    # a third to the hardware: 21 images x 1 ms = 43 images x 0.5 ms
    assert split.share == pytest.approx(1 / 3)
    assert split.count(64) == 21


def test_the_share_stays_within_bounds_so_each_backend_keeps_being_measured():
    split = Split(smoothing=1.0, bounds=(0.1, 0.9))
    split.observe("hardware", 10, 10.0)
    split.observe("nvjpeg", 10, 0.001)
    assert split.share == 0.1
    split.observe("hardware", 10, 0.001)
    split.observe("nvjpeg", 10, 10.0)
    assert split.share == 0.9


def test_one_image_is_never_split_and_recent_batches_weigh_most():
    split = Split(smoothing=0.5)
    assert split.count(1) == 0
    split.observe("hardware", 10, 0.01)
    split.observe("nvjpeg", 10, 0.01)
    assert split.share == pytest.approx(0.5)
    split.observe("nvjpeg", 10, 0.03)  # nvjpeg's average: 1 ms -> 2 ms an image
    assert split.share == pytest.approx(2 / 3)


def test_no_nvimgcodec_decoder_on_a_cpu():
    assert NvImageCodecJpeg.load(torch.device("cpu")) is None
    assert NvImageCodecJpeg.load(torch.device("cpu"), "cuda", 8) is None


class NvjpegAsHardware:
    """Stands in for the JPEG engines on any CUDA GPU: torchvision's nvjpeg, refusing the
    JPEGs of ``refused`` sizes as the hardware refuses what it cannot decode."""

    def __init__(self, refused: int | None = None) -> None:
        self.refused, self.threads = refused, set()

    def __call__(self, jpegs):
        self.threads.add(threading.get_ident())
        encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        return [None if len(j) == self.refused else im for j, im in zip(jpegs, images, strict=True)]


@pytest.mark.gpu
@needs_cuda
def test_a_batch_splits_between_backends_and_refused_images_fall_back_to_the_cpu():
    pre = Preprocessor(DEIT, max_pixels=40_000_000)
    cuda = torch.device("cuda")
    with ThreadPoolExecutor(2) as pool:
        plain = [photo((500 - 20 * s, 375), seed=s) for s in range(8)]
        hardware = NvjpegAsHardware(refused=len(plain[1]))
        decoder = BatchDecoder(
            pre, device=cuda, dtype=torch.float32, pool=pool, nvjpeg=True, hardware=hardware
        )
        batch = decoder([Encoded(d, pre.probe(d)) for d in plain])
    assert not batch.errors and batch.rows == list(range(8))
    # half to the "hardware", of which image 1 is refused and decoded by Pillow
    assert [batch.decoders[i] for i in range(8)] == [
        "hardware",
        "pillow",
        "hardware",
        "hardware",
    ] + ["nvjpeg"] * 4
    assert threading.get_ident() not in hardware.threads  # beside nvjpeg, not after
    assert_within_eval_tolerance(batch.inputs, plain, pre)
    assert set(decoder.split._per_image) == {"hardware", "nvjpeg"}  # both measured


@pytest.mark.gpu
@needs_cuda
def test_the_jpeg_engines_decode_within_the_eval_transforms_tolerance():
    hardware = NvImageCodecJpeg.load(torch.device("cuda"))
    if hardware is None:
        pytest.skip("no nvImageCodec, or this GPU has no JPEG engines")
    pre = Preprocessor(DEIT, max_pixels=40_000_000)
    cuda = torch.device("cuda")
    plain = [photo((500 - 20 * s, 375), seed=s) for s in range(6)]
    with ThreadPoolExecutor(2) as pool:
        decoder = BatchDecoder(
            pre, device=cuda, dtype=torch.float32, pool=pool, nvjpeg=True, hardware=hardware
        )
        decoder.split.share = 5 / 6  # all but the last to the engines (0.95 rounds to all 6)
        batch = decoder([Encoded(d, pre.probe(d)) for d in plain])
    assert [batch.decoders[i] for i in range(6)] == ["hardware"] * 5 + ["nvjpeg"]
    assert_within_eval_tolerance(batch.inputs, plain, pre)


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_decoder_in_place_of_torchvisions_leaves_what_it_refuses_to_the_cpu_path():
    pre = Preprocessor(DEIT, max_pixels=40_000_000)
    cuda = torch.device("cuda")
    plain = [photo((500 - 20 * s, 375), seed=s) for s in range(4)]
    stand_in = NvjpegAsHardware(refused=len(plain[2]))
    with ThreadPoolExecutor(2) as pool:
        decoder = BatchDecoder(
            pre, device=cuda, dtype=torch.float32, pool=pool, nvjpeg=True, cuda_jpeg=stand_in
        )
        batch = decoder([Encoded(d, pre.probe(d)) for d in plain])
    assert not batch.errors and batch.rows == list(range(4))
    assert [batch.decoders[i] for i in range(4)] == ["nvimgcodec"] * 2 + ["pillow", "nvimgcodec"]
    assert_within_eval_tolerance(batch.inputs, plain, pre)


@pytest.mark.gpu
@needs_cuda
def test_nvimgcodecs_cuda_decoder_decodes_within_the_eval_transforms_tolerance():
    pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec (the hwdecode extra)")
    cuda = torch.device("cuda")
    cuda_jpeg = NvImageCodecJpeg.load(cuda, "cuda", cpu_threads=4)
    assert cuda_jpeg is not None, "nvImageCodec is installed but its CUDA decoder did not load"
    pre = Preprocessor(DEIT, max_pixels=40_000_000)
    plain = [photo((500 - 20 * s, 375), seed=s) for s in range(6)]
    with ThreadPoolExecutor(2) as pool:
        decoder = BatchDecoder(
            pre, device=cuda, dtype=torch.float32, pool=pool, nvjpeg=True, cuda_jpeg=cuda_jpeg
        )
        batch = decoder([Encoded(d, pre.probe(d)) for d in plain])
    assert [batch.decoders[i] for i in range(6)] == ["nvimgcodec"] * 6
    assert_within_eval_tolerance(batch.inputs, plain, pre)


@pytest.mark.parametrize("asked", [False, True])
def test_the_pool_looks_for_nvimgcodec_only_when_asked_and_says_when_it_is_missing(
    tmp_path, caplog, asked
):
    settings = Settings(
        store_dir=tmp_path, device="cpu", gpu_jpeg_decoder="nvimgcodec" if asked else "torchvision"
    )
    pool = ModelPool(settings, ModelStore(tmp_path), Metrics(), reports_worker_ready=False)
    with caplog.at_level(logging.WARNING):
        assert pool.nvimgcodec_jpeg(torch.device("cpu"), "cuda") is None  # torchvision decodes
    assert ("cuda JPEG decoder does not run" in caplog.text) is asked

"""The decode stage: bytes wait in the queue; a closed batch decodes as a whole, with nvjpeg
on a GPU where it reproduces Pillow and Pillow everywhere else, within the eval transform."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from app.config import Settings
from app.serving.decode import BatchDecoder, Encoded, Pixels, Preprocessed
from app.serving.metrics import Metrics
from app.serving.pipeline import ClassifyPipeline, ImageInput
from app.serving.pool import ModelPool
from app.serving.preprocess import CorruptImage, Preprocessor, TensorResizeCrop
from app.store import ModelStore
from app.store.manifest import Preprocessing
from tests.helpers import add_tiny_entry, image_bytes

DEIT = Preprocessing(input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic")


def photo(size=(500, 375), seed: int = 0, **save) -> bytes:
    """A smooth photo-like JPEG (random noise would make every decoder disagree)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, 6, 8, generator=g)
    smooth = torch.nn.functional.interpolate(low[None], size=size[::-1], mode="bicubic")[0]
    array = (smooth.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def encoded(pre: Preprocessor, data: bytes) -> Encoded:
    return Encoded(data, pre.probe(data))


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor(DEIT, max_pixels=40_000_000)


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def test_the_split_transform_is_timms_eval_transform_within_two_grey_levels(pre):
    from timm.data import create_transform

    data = photo()
    expected = create_transform(**DEIT.timm_data_config())(Image.open(io.BytesIO(data)))
    levels = (pre(data) - expected).abs() * 255 * torch.tensor(DEIT.std)[:, None, None]
    assert levels.max() <= 2 + 1e-3 and levels.mean() < 0.1
    assert pre.decode_crop(data).dtype == torch.uint8


def test_the_probe_sends_only_plain_complete_jpegs_to_nvjpeg(pre):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°
    assert pre.probe(photo()).nvjpeg_ok
    assert not pre.probe(photo(progressive=True)).nvjpeg_ok
    assert not pre.probe(photo(exif=exif.tobytes())).nvjpeg_ok
    assert not pre.probe(photo()[:-500]).nvjpeg_ok  # truncated: Pillow refuses it as on CPU
    assert not pre.probe(image_bytes("JPEG", (64, 48), mode="L")).nvjpeg_ok
    assert not pre.probe(image_bytes("JPEG", (64, 48), mode="CMYK")).nvjpeg_ok
    assert not pre.probe(image_bytes("PNG", (64, 48))).nvjpeg_ok


def test_a_cpu_batch_decodes_with_pillow_and_fails_only_its_bad_images(pre, pool):
    decoder = BatchDecoder(
        pre, device=torch.device("cpu"), dtype=torch.float32, pool=pool, nvjpeg=True
    )
    good = [photo(seed=1), image_bytes("PNG", (90, 70)), photo(seed=2)]
    truncated = good[0][: len(good[0]) // 3]
    batch = decoder(
        [encoded(pre, good[0]), encoded(pre, truncated), *(encoded(pre, d) for d in good[1:])]
    )
    assert batch.rows == [0, 2, 3]
    assert isinstance(batch.errors[1], CorruptImage)
    assert set(batch.decoders.values()) == {"pillow"}  # nvjpeg only ever runs on CUDA
    assert torch.equal(batch.inputs, torch.stack([pre(d) for d in good]))


def test_crops_decoded_ahead_pass_through_unchanged(pre, pool):
    decoder = BatchDecoder(
        pre, device=torch.device("cpu"), dtype=torch.float32, pool=pool, nvjpeg=False
    )
    crop = pre.decode_crop(photo())
    batch = decoder([crop, encoded(pre, photo(seed=3))])
    assert batch.rows == [0, 1] and batch.decoders == {1: "pillow"}
    assert torch.equal(batch.inputs[0], pre.normalize(crop[None])[0])


def test_preprocessed_inputs_join_the_batch_as_sent_in_their_rows(pre, pool):
    decoder = BatchDecoder(
        pre, device=torch.device("cpu"), dtype=torch.float32, pool=pool, nvjpeg=False
    )
    ready = torch.randn(3, 224, 224)
    truncated = photo()[: len(photo()) // 3]
    batch = decoder(
        [
            encoded(pre, photo(seed=4)),
            Preprocessed(ready),
            encoded(pre, truncated),
            Preprocessed(-ready),
        ]
    )
    assert batch.rows == [0, 1, 3] and isinstance(batch.errors[2], CorruptImage)
    assert torch.equal(batch.inputs[0], pre(photo(seed=4)))
    assert torch.equal(batch.inputs[1], ready) and torch.equal(batch.inputs[2], -ready)
    assert torch.equal(decoder([Preprocessed(ready)]).inputs, ready[None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_tensors_reach_the_gpu_batch_in_their_rows_as_on_the_cpu(pre, pool):
    """Preprocessed inputs, crops decoded ahead and client pixels of several sizes cross to
    the GPU together (one pinned copy) and land in their own rows, as the CPU decoder puts
    them."""
    g = torch.Generator().manual_seed(0)
    ready = torch.randn(3, 224, 224, generator=g)
    crop = pre.decode_crop(photo(seed=5))
    pixels = [  # photo-like: on noise, any two bicubic resizes part by many levels
        Pixels(decode_jpeg(torch.frombuffer(bytearray(photo(size, seed=s)), dtype=torch.uint8)))
        for s, size in enumerate([(224, 224), (260, 300), (500, 240)])
    ]
    payloads = [pixels[0], Preprocessed(ready), crop, pixels[1], Preprocessed(-ready), pixels[2]]
    on = {
        device: BatchDecoder(
            pre, device=torch.device(device), dtype=torch.float32, pool=pool, nvjpeg=False
        )(payloads)
        for device in ("cpu", "cuda")
    }
    assert on["cuda"].rows == on["cpu"].rows == list(range(6))
    gpu, cpu = on["cuda"].inputs.cpu(), on["cpu"].inputs
    assert torch.equal(gpu[[1, 2, 4]], cpu[[1, 2, 4]])  # sent as they are, or normalised
    grey_levels = ((gpu - cpu) * pre.std[:, None, None] * 255).abs()[[0, 3, 5]]
    assert grey_levels.max() <= 2  # resized by the kernel on the GPU, by torch on the CPU


def test_tensor_resize_and_crop_match_pillows_within_two_levels(pre):
    """The GPU path decodes with nvjpeg and resizes a tensor with the eval transform's own
    steps; here the same steps on the CPU (libjpeg-turbo) against Pillow's result."""
    for seed, size in enumerate([(500, 375), (375, 500), (1024, 683), (250, 250)]):
        data = photo(size, seed=seed)
        tensor = pre.resize_crop(
            decode_jpeg(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
            )
        )
        pillow = pil_to_tensor(pre.resize_crop(pre.decode(data)))
        diff = (tensor.int() - pillow.int()).abs()
        assert tensor.shape == pillow.shape == (3, 224, 224)
        assert diff.max() <= 3 and diff.float().mean() < 0.5, (
            size,
            diff.max(),
            diff.float().mean(),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_nvjpeg_batches_match_pillow_and_bad_jpegs_fall_back(pre, pool):
    cuda = torch.device("cuda")
    decoder = BatchDecoder(pre, device=cuda, dtype=torch.float32, pool=pool, nvjpeg=True)
    plain = [photo((500 - 20 * s, 375), seed=s) for s in range(8)]
    others = [photo(progressive=True), image_bytes("PNG", (90, 70))]
    batch = decoder([encoded(pre, d) for d in plain + others])
    assert not batch.errors and batch.rows == list(range(10))
    assert [batch.decoders[i] for i in range(10)] == ["nvjpeg"] * 8 + ["pillow"] * 2
    expected = torch.stack([pre(d) for d in plain + others]).to(cuda)
    grey_levels = ((batch.inputs - expected) * pre.std.to(cuda)[:, None, None] * 255).abs()
    # nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: off by about a level
    assert grey_levels[:8].mean() < 3, f"mean {grey_levels[:8].mean():.2f} grey levels"
    assert grey_levels[8:].max() < 1e-3  # Pillow's rows are Pillow's
    # a JPEG that passes the probe but is corrupt inside: whatever nvjpeg does with it, the
    # good image in its batch still comes back
    corrupt = bytearray(photo(seed=9))
    middle = len(corrupt) // 2  # inside the entropy-coded data: the header still probes fine
    corrupt[middle : middle + 500] = bytes(500)
    batch = decoder([encoded(pre, plain[0]), encoded(pre, bytes(corrupt))])
    assert 0 in batch.rows


async def test_the_queue_holds_compressed_bytes_not_decoded_tensors(tmp_path):
    store = ModelStore(tmp_path)
    add_tiny_entry(store, "tiny")
    settings = Settings(
        store_dir=store.root, default_model="tiny", auto_pull=False, device="cpu", max_batch_size=1
    )
    pool = ModelPool(settings, store, Metrics())
    await pool.start()
    await pool.wait_loaded()
    model = pool.models["tiny"]
    gate = threading.Event()
    forward = model.batcher._replicas[0]
    model.batcher._replicas[0] = lambda x: (gate.wait(10), forward(x))[1]
    pipeline = ClassifyPipeline(pool)
    request = [ImageInput(f"{i}.jpg", photo((64, 48), seed=i)) for i in range(6)]
    task = asyncio.create_task(pipeline.classify("tiny", request, 1, time.monotonic() + 30))
    await asyncio.sleep(
        0.3
    )  # the first batch computes (held), the second is decoded: the rest queue
    queued = [item.payload for item in model.batcher._queue._queue]
    assert queued and all(isinstance(p, Encoded) and isinstance(p.data, bytes) for p in queued)
    gate.set()
    results = await task
    assert [r.decoder for r in results] == ["pillow"] * 6
    await pool.stop()


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 500), (640, 427), (248, 300)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_batched_tensor_resize_is_torchvisions_modules(pre, size, device):
    """Resize + CenterCrop as one interpolate per distinct size computes what the eval
    transform's torchvision modules compute image by image: exactly on the GPU (float, as
    they do), within two grey levels on the CPU (torch's uint8 kernel, ~4x faster)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    fast = TensorResizeCrop(pre.resize_crop)
    images = [
        decode_jpeg(torch.frombuffer(bytearray(photo(s, seed=k)), dtype=torch.uint8)).to(device)
        for k, s in enumerate([size, size, (size[1], size[0])])
    ]
    for image, crop in zip(images, fast(images), strict=True):
        want = pre.resize_crop(image).float()
        if device == "cuda":
            assert torch.equal(crop, want)
        else:
            assert crop.dtype == torch.uint8 and (crop.float() - want).abs().max() <= 2

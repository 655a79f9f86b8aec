"""Property tests: whatever bytes or text arrive, parsing fails only in the ways the API
maps to a 4xx.

Preprocessing and config parsing are fuzzed in-process with Hypothesis (bounded, so the
suite stays fast); the HTTP surface is fuzzed through its own OpenAPI document with
Schemathesis against a live server, checking only that nothing answers with a 5xx.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError
from schemathesis.checks import not_a_server_error

from app.bench.server import running_server
from app.serving.preprocess import InputError, Preprocessor
from app.store import ModelStore
from app.vit.config import CompressionConfig
from tests.helpers import TINY_PREPROCESSING, add_tiny_entry, serve_env

FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
# Small enough that a mutated header claiming a large image is refused, not decoded.
MAX_PIXELS = 1_000_000

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK", "YCbCr")


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor(TINY_PREPROCESSING, max_pixels=MAX_PIXELS)


def encode(image: Image.Image, fmt: str) -> bytes | None:
    """The image in ``fmt``, or None where Pillow cannot write that mode in that format."""
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        return None
    return buf.getvalue()


@st.composite
def small_images(draw) -> Image.Image:
    width = draw(st.integers(1, 48))
    height = draw(st.integers(1, 48))
    mode = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


@st.composite
def encoded_images(draw) -> bytes:
    image, fmt = draw(small_images()), draw(st.sampled_from(FORMATS))
    data = encode(image, fmt)
    if data is None:
        data = encode(image.convert("RGB"), fmt)
    return data


@st.composite
def mutated_images(draw) -> bytes:
    """A valid encoding, then truncated and/or with bytes overwritten or inserted: reaches
    the decoders' error paths far more often than random bytes, which rarely pass the magic."""
    data = bytearray(draw(encoded_images()))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(("flip", "insert", "truncate", "ff")))
        if action == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif action == "ff" and data:
            data[pos] = 0xFF
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif action == "truncate":
            del data[max(8, pos) :]
    return bytes(data)


def assert_only_input_errors(pre: Preprocessor, data: bytes) -> None:
    try:
        tensor = pre(data)
    except InputError:
        return
    assert tensor.shape == (3, 32, 32)
    assert torch.isfinite(tensor).all()


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_raise_only_input_errors(pre, data):
    """Anything that is not a decodable image is a client error (4xx), never a 500."""
    assert_only_input_errors(pre, data)


@FUZZ
@given(data=mutated_images())
def test_corrupted_images_raise_only_input_errors(pre, data):
    """Damaged files of every allowed format: a 4xx, or (if it still decodes) a tensor."""
    assert_only_input_errors(pre, data)


@FUZZ
@given(data=encoded_images())
def test_valid_images_in_any_mode_and_format_become_finite_tensors(pre, data):
    """Every mode Pillow writes in every allowed format reaches the model as [3, H, W]."""
    tensor = pre(data)
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()


COMPRESSION_TEXT = st.one_of(
    st.text(max_size=64),
    st.lists(
        st.sampled_from(
            ["static=", "tokens=", "merge=", ";", ",", "-", "@", "dense", "0", "1", "7", "99"]
            + ["-1", " ", "x", "=", "1e9", "2-0"]
        ),
        max_size=16,
    ).map("".join),
)


@FUZZ
@given(text=COMPRESSION_TEXT)
def test_compression_config_parse_returns_a_config_or_raises_value_error(text):
    """A typo in a manifest or on the command line is a clear ValueError (pydantic's
    ValidationError is one), never an IndexError or a silently wrong config."""
    try:
        config = CompressionConfig.parse(text)
    except (ValueError, ValidationError):
        return
    assert isinstance(config, CompressionConfig)
    assert CompressionConfig.parse(str(config)) == config


# ---- the HTTP surface, from its OpenAPI document ----------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("fuzz-store"))
    add_tiny_entry(store, "tiny", seed=0)
    add_tiny_entry(store, "tiny-b", seed=1)
    env = serve_env(
        store,
        max_delay_ms="2",
    )
    with running_server(env, timeout_s=120) as base:
        yield base


OPERATIONS = [
    ("POST", "/classify"),
    ("POST", "/compare"),
    ("GET", "/models"),
    ("GET", "/readyz"),
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_openapi_operations_never_answer_5xx(server, method, path):
    """Schemathesis generates requests from the server's own OpenAPI document (valid and
    schema-violating): every one is answered below 500."""
    spec = httpx.get(f"{server}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(spec)
    operation = schema[path][method]

    @settings(
        max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(case=operation.as_strategy())
    def check(case):
        response = case.call(base_url=server, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])

    check()

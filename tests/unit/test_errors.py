"""Each failure of the request path maps to one HTTP status, with a retry hint where useful."""

from __future__ import annotations

import pytest

from app.api.errors import as_api_error
from app.serving.batcher import BatcherStopped, DeadlineExceeded, QueueFull
from app.serving.pipeline import ModelUnavailable
from app.serving.preprocess import CorruptImage, EmptyImage, ImageTooLarge, UnsupportedImage
from app.store.errors import UnknownModel


@pytest.mark.parametrize(
    "exc,status,code,retry_after",
    [
        (QueueFull("m", retry_after_s=2.6), 429, "queue_full", "3"),
        (QueueFull("m", retry_after_s=0.2), 429, "queue_full", "1"),
        (DeadlineExceeded("late"), 504, "deadline_exceeded", None),
        (BatcherStopped("stopping"), 503, "model_unavailable", "5"),
        (ModelUnavailable("loading"), 503, "model_unavailable", "5"),
        (UnknownModel("nope"), 404, "unknown_model", None),
        (EmptyImage("empty"), 400, "empty_image", None),
        (CorruptImage("bad"), 400, "corrupt_image", None),
        (UnsupportedImage("svg"), 415, "unsupported_media_type", None),
        (ImageTooLarge("bomb"), 413, "image_too_large", None),
        (RuntimeError("bug"), 500, "internal_error", None),
    ],
)
def test_domain_errors_map_to_http(exc, status, code, retry_after):
    err = as_api_error(exc)
    assert (err.status, err.code) == (status, code)
    assert (err.headers or {}).get("Retry-After") == retry_after
    assert err.message

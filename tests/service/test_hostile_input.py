"""Hostile and odd input against a real server: every request gets a clear JSON answer.

The corpus is generated here (Pillow and raw bytes, nothing downloaded). For each case the
server must answer with the expected status and a JSON error code, or classify a valid but
unusual image with a 200. Never a 5xx, the process never dies, and memory comes back to
near where it was: an attacker must not be able to spend the server's RAM with a few
hundred bytes (decompression bombs, extreme aspect ratios, huge headers).
"""

from __future__ import annotations

import io
import socket
import struct
import time
import zipfile
from dataclasses import dataclass, field

import httpx
import pytest
from PIL import Image

from app.api.limits import MAX_HEADER_BYTES, MAX_URL_BYTES
from app.bench.server import running_server
from app.store import ModelStore
from tests.helpers import add_tiny_entry, image_bytes, serve_env
from tests.unit.test_preprocess import png_header_only

UPLOAD_LIMIT = 2 * 1024 * 1024
MAX_IMAGES = 8
# RSS may grow this much over the warmed-up server after the whole corpus (allocator slack,
# caches); a decoded 30000x30000 bomb alone would be 2.7 GB.
RSS_SLACK_MB = 150
PEAK_SLACK_MB = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("hostile-store"))
    add_tiny_entry(store, "tiny", seed=0)
    env = serve_env(
        store,
        max_delay_ms="2",
        max_upload_bytes=UPLOAD_LIMIT,
        max_images_per_request=MAX_IMAGES,
    )
    with running_server(env, timeout_s=120) as base:
        yield base


# ---- corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    status: int
    code: str | None = None  # the JSON error code; None for a 200
    body: bytes | None = None
    content_type: str | None = "image/jpeg"
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    path: str = "/classify"
    stream: bool = False  # send the body chunked, without Content-Length


def save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid small JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(image_bytes("JPEG", (16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims width x height."""
    data = bytearray(image_bytes("GIF", (16, 16), mode="L"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (24, 24), c) for c in ("red", "green", "blue")]
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def with_exif_orientation(value: int) -> bytes:
    image = Image.open(io.BytesIO(image_bytes("JPEG", (40, 20))))
    exif = image.getexif()
    exif[0x0112] = value
    return save(image, "JPEG", exif=exif.tobytes())


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        z.writestr("evil.html", "<script>alert(1)</script>")
    return buf.getvalue()


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"zz") -> bytes:
    """Raw multipart body from (part headers, part content) pairs."""
    out = b""
    for head, content in parts:
        out += b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def file_part(content: bytes, filename: bytes = b"a.jpg", name: bytes = b"file") -> tuple:
    head = b'Content-Disposition: form-data; name="%s"; filename="%s"' % (name, filename)
    return head + b"\r\nContent-Type: image/jpeg", content


def nested_multipart(depth: int) -> bytes:
    inner = image_bytes()
    for level in range(depth):
        b = b"n%d" % level
        inner = multipart([(b"Content-Type: multipart/mixed; boundary=" + b, inner)], b)
    return inner


MP = "multipart/form-data; boundary=zz"
JPEG = image_bytes("JPEG", (64, 48))
PNG = image_bytes("PNG", (64, 48))


def corpus() -> list[Case]:
    return [
        # --- bytes that are not a (complete) image
        Case("empty-body", 400, "empty_image", b""),
        Case("zero-bytes", 415, "unsupported_media_type", b"\0" * 4096),
        Case("truncated-jpeg", 400, "corrupt_image", JPEG[: len(JPEG) // 2]),
        Case("truncated-png", 400, "corrupt_image", PNG[: len(PNG) // 2]),
        Case("png-signature-only", 415, "unsupported_media_type", PNG[:8]),
        Case("wrong-magic", 415, "unsupported_media_type", b"\x00\x00" + JPEG[2:]),
        Case("zip", 415, "unsupported_media_type", zip_bytes(), "application/zip"),
        Case("pdf", 415, "unsupported_media_type", b"%PDF-1.4\n1 0 obj<<>>endobj\n%%EOF"),
        Case("ico-not-allowed", 415, "unsupported_media_type", image_bytes("ICO", (32, 32))),
        Case("html-as-jpeg", 415, "unsupported_media_type", b"<html><script>x</script>"),
        Case(
            "svg",
            415,
            "unsupported_media_type",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
            "image/svg+xml",
        ),
        Case(
            "xml-xxe",
            415,
            "unsupported_media_type",
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
            b"<x>&e;</x>",
            "application/octet-stream",
        ),
        # --- content types that are not an image upload
        Case("text-plain", 415, "unsupported_media_type", JPEG, "text/plain"),
        Case("json", 415, "unsupported_media_type", b'{"file": "x"}', "application/json"),
        Case(
            "form-urlencoded",
            415,
            "unsupported_media_type",
            b"file=x",
            "application/x-www-form-urlencoded",
        ),
        # --- decompression bombs and amplification, refused from the header
        Case("png-30000x30000", 413, "image_too_large", png_header_only(30000, 30000)),
        Case("png-100000x100000", 413, "image_too_large", png_header_only(100_000, 100_000)),
        Case("jpeg-65500x65500", 413, "image_too_large", jpeg_claiming(65500, 65500)),
        Case("gif-65535x65535", 413, "image_too_large", gif_claiming(65535, 65535)),
        Case("png-1x200000", 413, "image_too_large", save(Image.new("L", (1, 200_000)), "PNG")),
        Case("png-200000x1", 413, "image_too_large", save(Image.new("L", (200_000, 1)), "PNG")),
        # --- valid but odd images: classified
        Case("png-labelled-jpeg", 200, body=PNG),
        Case("octet-stream", 200, body=JPEG, content_type="application/octet-stream"),
        Case("no-content-type", 200, body=JPEG, content_type=None),
        Case("1x1-png", 200, body=image_bytes("PNG", (1, 1))),
        Case("1x1-jpeg", 200, body=image_bytes("JPEG", (1, 1))),
        Case("16-bit-png", 200, body=image_bytes("PNG", (32, 32), mode="I;16")),
        Case(
            "palette-png-transparent",
            200,
            body=save(Image.new("P", (32, 32)), "PNG", transparency=0),
        ),
        Case("cmyk-jpeg", 200, body=image_bytes("JPEG", (32, 32), mode="CMYK")),
        Case("lab-tiff", 200, body=save(Image.new("LAB", (32, 32)), "TIFF")),
        Case("1-bit-bmp", 200, body=save(Image.new("1", (33, 17)), "BMP")),
        Case("progressive-jpeg", 200, body=image_bytes("JPEG", (64, 64), progressive=True)),
        Case("animated-gif", 200, body=animated("GIF")),
        Case("animated-webp", 200, body=animated("WEBP")),
        Case("exif-orientation-6", 200, body=with_exif_orientation(6)),
        Case("exif-orientation-bogus", 200, body=with_exif_orientation(9)),
        Case("exif-orientation-huge", 200, body=with_exif_orientation(65535)),
        # --- polyglots: the image part is classified, the rest ignored (never interpreted)
        Case("jpeg+zip", 200, body=JPEG + zip_bytes()),
        Case("jpeg+html", 200, body=JPEG + b"<html><script>alert(1)</script></html>"),
        Case("gifar", 200, body=image_bytes("GIF", (32, 32), mode="L") + zip_bytes()),
        # --- query parameters
        Case("model-dotdot", 404, "unknown_model", JPEG, params={"model": "../../etc/passwd"}),
        Case("model-unicode", 404, "unknown_model", JPEG, params={"model": "тест🙂\u202e"}),
        Case("model-nul", 404, "unknown_model", JPEG, params={"model": "tiny\x00"}),
        Case("model-too-long", 422, "invalid_request", JPEG, params={"model": "m" * 200}),
        Case("top-k-negative", 422, "invalid_request", JPEG, params={"top_k": "-1"}),
        Case("top-k-zero", 422, "invalid_request", JPEG, params={"top_k": "0"}),
        Case("top-k-huge", 422, "invalid_request", JPEG, params={"top_k": "9" * 40}),
        Case("top-k-float", 422, "invalid_request", JPEG, params={"top_k": "1e3"}),
        Case("top-k-text", 422, "invalid_request", JPEG, params={"top_k": "all"}),
        Case(
            "compare-dotdot",
            404,
            "unknown_model",
            JPEG,
            params={"models": "tiny,../tiny"},
            path="/compare",
        ),
        # --- multipart
        Case("multipart-no-boundary", 400, "bad_multipart", b"abcd", "multipart/form-data"),
        Case("multipart-garbage", 400, "bad_multipart", b"\0" * 100, MP),
        Case(
            "multipart-no-file-part",
            400,
            "missing_file",
            multipart([(b'Content-Disposition: form-data; name="other"', b"x")]),
            MP,
        ),
        Case(
            "multipart-too-many-files",
            400,
            "bad_multipart",
            multipart([file_part(JPEG)] * (MAX_IMAGES + 1)),
            MP,
        ),
        Case(
            "multipart-too-many-fields",
            400,
            "bad_multipart",
            multipart(
                [(b'Content-Disposition: form-data; name="f%d"' % i, b"v") for i in range(500)]
            ),
            MP,
        ),
        Case(
            "multipart-field-over-1mb",
            400,
            "bad_multipart",
            multipart([(b'Content-Disposition: form-data; name="x"', b"x" * 1_200_000)]),
            MP,
        ),
        Case(
            "multipart-1mb-filename",
            400,
            "bad_multipart",
            multipart([file_part(JPEG, b"a" * 1_000_000)]),
            MP,
        ),
        Case(
            "multipart-5mb-filename",
            413,
            "payload_too_large",
            multipart([file_part(JPEG, b"a" * 5_000_000)]),
            MP,
        ),
        Case(
            "multipart-20000-part-headers",
            400,
            "bad_multipart",
            multipart(
                [(file_part(JPEG)[0] + b"".join(b"\r\nX-H%d: v" % i for i in range(20000)), JPEG)]
            ),
            MP,
        ),
        Case(
            "multipart-nested-1000",
            415,
            "unsupported_media_type",
            multipart([file_part(nested_multipart(1000))]),
            MP,
        ),
        Case(
            "multipart-one-corrupt-of-two",
            400,
            "corrupt_image",
            multipart([file_part(JPEG), file_part(JPEG[:300])]),
            MP,
        ),
        # --- sizes
        Case("body-over-limit", 413, "payload_too_large", b"\xff\xd8" + b"\0" * UPLOAD_LIMIT),
        Case(
            "chunked-over-limit",
            413,
            "payload_too_large",
            b"\xff\xd8" + b"\0" * UPLOAD_LIMIT,
            stream=True,
        ),
        Case(
            "chunked-multipart-over-limit",
            413,
            "payload_too_large",
            multipart([file_part(b"\xff\xd8" + b"\0" * UPLOAD_LIMIT)]),
            MP,
            stream=True,
        ),
        Case(
            "header-over-limit",
            431,
            "headers_too_large",
            JPEG,
            headers={"x-big": "a" * (MAX_HEADER_BYTES + 1)},
        ),
        Case("many-small-headers", 200, body=JPEG, headers={f"x-h{i}": "v" for i in range(1000)}),
        Case(
            "query-over-limit", 414, "uri_too_long", JPEG, params={"x": "a" * (MAX_URL_BYTES + 1)}
        ),
    ]


def send(client: httpx.Client, base: str, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if case.content_type is not None:
        headers["content-type"] = case.content_type
    body = case.body
    if case.stream:
        data = body

        def chunks():
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        body = chunks()
    return client.post(f"{base}{case.path}", content=body, params=case.params, headers=headers)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_corpus_has_at_least_40_distinct_cases():
    ids = [c.id for c in corpus()]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids)


def test_every_hostile_input_gets_its_json_answer_and_memory_comes_back(server):
    """One pass over the corpus (twice, so a leak would show), then health and memory.

    Expected statuses are the contract in the README: 4xx with a JSON error code for
    anything the server refuses, 200 for valid odd images, never a 5xx."""
    with httpx.Client(timeout=30) as client:
        for _ in range(3):  # warm-up: allocator pools, decode threads, batch shapes
            assert send(client, server, Case("warm", 200, body=JPEG)).status_code == 200
        baseline, baseline_peak = rss_mb(server.pid), rss_mb(server.pid, "VmHWM")
        failures = []
        for _round in range(2):
            for case in corpus():
                response = send(client, server, case)
                got = (response.status_code, response.json().get("error", {}).get("code"))
                if got != (case.status, case.code) or response.status_code >= 500:
                    failures.append(f"{case.id}: expected {case.status} {case.code}, got {got}")
                if case.status == 200 and response.status_code == 200:
                    assert len(response.json()["results"][0]["predictions"]) == 5
        assert not failures, "\n".join(failures)
        assert client.get(f"{server}/healthz").status_code == 200
        assert client.get(f"{server}/readyz").status_code == 200
    assert server.proc.poll() is None, "the server process died"
    time.sleep(1.0)  # gc window: decode threads and buffers released
    grown = rss_mb(server.pid) - baseline
    assert grown < RSS_SLACK_MB, f"RSS grew {grown:.0f} MB over the warmed-up {baseline:.0f} MB"
    peak_grown = rss_mb(server.pid, "VmHWM") - baseline_peak
    assert peak_grown < PEAK_SLACK_MB, f"peak RSS grew {peak_grown:.0f} MB: a bomb was decoded"


def test_filenames_are_echoed_as_data_never_used_as_paths(server):
    """A NUL byte, ``../`` and unicode in a part's filename reach the response JSON escaped,
    unchanged: the server never touches the filesystem with it."""
    name = "a\x00b/../../etc/passwd\u202e.jpg"
    body = multipart([file_part(JPEG, name.encode())])
    response = httpx.post(
        f"{server}/classify", content=body, headers={"content-type": MP}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["filename"] == name


def raw_exchange(base: str, request: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /classify HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ],
    ids=["not-http", "negative-length", "length-and-chunked", "bad-chunk-size", "bad-header-line"],
)
def test_malformed_http_is_refused_by_the_protocol_layer(server, request_bytes):
    """Requests that are not valid HTTP/1.1 never reach the app: uvicorn answers a plain
    400 and closes the connection (no JSON: there is no request to attach it to)."""
    answer = raw_exchange(server, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert httpx.get(f"{server}/healthz").status_code == 200

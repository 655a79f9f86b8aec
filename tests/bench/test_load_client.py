"""The benchmark's load client: request bodies encoded once per image, read by the server's
own multipart parser exactly as a browser's or curl's would be."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from app.bench.load_client import Bodies, Load


async def parsed(body: bytes) -> list[tuple[str, str, bytes]]:
    async def stream():
        yield body

    form = await MultiPartParser(Headers({"content-type": Bodies.content_type}), stream()).parse()
    return [(f.filename, f.content_type, await f.read()) for f in form.getlist("file")]


async def test_a_body_carries_the_next_images_in_order_wrapping_around():
    images = [("a.jpg", b"\xff\xd8jpeg\r\n--not-a-boundary"), ("b.png", b"png"), ("c.jpg", b"c")]
    bodies = Bodies(Load(images, per_request=2))
    assert await parsed(bodies(0)) == [
        ("a.jpg", "image/jpeg", images[0][1]),
        ("b.png", "image/png", b"png"),
    ]
    assert [name for name, _, _ in await parsed(bodies(2))] == ["c.jpg", "a.jpg"]


async def test_one_image_a_request_is_one_part():
    bodies = Bodies(Load([("x.jpg", b"x" * 1000)]))
    assert await parsed(bodies(5)) == [("x.jpg", "image/jpeg", b"x" * 1000)]

"""ASGI middleware bounding the request head and body, before any parser buffers them."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the upload limit of {limit} bytes")


# uvicorn's httptools parser (the default when installed) has no limit of its own on the
# request line or headers (h11's is 16 KiB); past these the request is refused unread.
MAX_URL_BYTES = 8 * 1024  # path + query string: 414
MAX_HEADER_BYTES = 64 * 1024  # all header names and values together: 431


class BodySizeLimit:
    """414/431 for an oversized URL or header block; 413 at once when Content-Length is
    over the limit; otherwise count the body while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url_bytes = len(scope.get("raw_path") or scope["path"]) + len(scope["query_string"])
        if url_bytes > MAX_URL_BYTES:
            message = f"request URL is {url_bytes} bytes; the limit is {MAX_URL_BYTES}"
            await self._reject(send, 414, "uri_too_long", message)
            return
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > MAX_HEADER_BYTES:
            message = f"request headers are {header_bytes} bytes; the limit is {MAX_HEADER_BYTES}"
            await self._reject(send, 431, "headers_too_large", message)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._reject(send, 413, "payload_too_large", str(BodyTooLarge(self.max_bytes)))
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)

    async def _reject(self, send: Send, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": {"code": code, "message": message, "detail": None}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

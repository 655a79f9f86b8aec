"""Reading the images of a request: multipart parts named ``file`` or a raw image body.

Multipart bodies go to python-multipart's parser directly, over the whole body (which
``BodySizeLimit`` has bounded), not through Starlette's ``request.form()``: the form's
spooled files and per-chunk bookkeeping were about a tenth of an HTTP worker's CPU per
one-image request (docs/performance.md). The limits Starlette's form set are kept here.
"""

from __future__ import annotations

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from app.api.errors import ApiError
from app.api.limits import BodyTooLarge
from app.serving.pipeline import ImageInput

MAX_FIELD_BYTES = 1024 * 1024  # a part that is not a file (its value is never used)

# OpenAPI description of the body (the handlers read it themselves, to stream-limit it).
IMAGE_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


async def read_images(request: Request, max_images: int) -> list[ImageInput]:
    """Multipart field ``file`` (one or more parts) or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "multipart/form-data":
            files = multipart_files(
                await request.body(), request.headers["content-type"], max_images
            )
            if not files:
                raise ApiError(400, "missing_file", "multipart body has no file part named 'file'")
            return files
        if content_type and not (
            content_type.startswith("image/") or content_type == "application/octet-stream"
        ):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {content_type!r}: send multipart/form-data with field 'file', "
                "or the image bytes with an image/* or application/octet-stream content type",
            )
        return [ImageInput(None, await request.body())]
    except BodyTooLarge as exc:
        raise ApiError(413, "payload_too_large", str(exc)) from exc


def multipart_files(body: bytes, content_type: str, max_files: int) -> list[ImageInput]:
    """The file parts named ``file`` of a multipart body; 400 ``bad_multipart`` for a
    malformed body, or one past the limits: ``max_files`` file parts and as many other
    parts, each under 1 MiB (python-multipart bounds each part's headers itself)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "malformed multipart body: no boundary")
    parts = _FileParts(max_files)
    parser = MultipartParser(boundary, parts.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, _OverLimit) as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc}") from exc
    return parts.files


class _OverLimit(Exception):
    pass


class _FileParts:
    """python-multipart's callbacks, collecting the ``file`` parts as Starlette's form would:
    a part with a filename is a file, any other a field."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[ImageInput] = []
        self._counts = {True: 0, False: 0}  # is a file -> parts seen
        self._headers: dict[bytes, bytes] = {}
        self._name, self._value = bytearray(), bytearray()
        self._chunks: list[bytes] = []
        self._size, self._filename, self._kept = 0, None, False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._headers.clear,
            "on_header_field": lambda data, start, end: self._name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
        }

    def _header_end(self) -> None:
        self._headers[bytes(self._name).lower()] = bytes(self._value)
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        options = parse_options_header(self._headers.get(b"content-disposition", b""))[1]
        is_file = b"filename" in options
        self._counts[is_file] += 1
        if self._counts[is_file] > self.max_files:
            kind = "files" if is_file else "fields"
            raise _OverLimit(f"Too many {kind}. Maximum number of {kind} is {self.max_files}.")
        self._filename = _decode(options[b"filename"]) if is_file else None
        self._kept = is_file and options.get(b"name") == b"file"
        self._chunks, self._size = [], 0

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._kept:
            self._chunks.append(data[start:end])
        elif self._filename is None and self._size > MAX_FIELD_BYTES:
            raise _OverLimit(f"Field exceeded maximum size of {MAX_FIELD_BYTES // 1024}KB.")

    def _part_end(self) -> None:
        if self._kept:
            self.files.append(ImageInput(self._filename, b"".join(self._chunks)))


def _decode(raw: bytes) -> str:
    """A filename as Starlette decodes one: UTF-8, else Latin-1."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")

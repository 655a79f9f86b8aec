"""Reading the images of a request: multipart parts named ``file`` or a raw image body."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from app.api.errors import ApiError
from app.api.limits import BodyTooLarge
from app.serving.pipeline import ImageInput

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
            try:
                form = await request.form(max_files=max_images, max_fields=max_images)
            except MultiPartException as exc:
                raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc}") from exc
            except HTTPException as exc:
                # Inside an app, Starlette re-raises the parser's MultiPartException as an
                # HTTPException(400); the handler's catch-all would turn it into a 500.
                raise ApiError(
                    400, "bad_multipart", f"malformed multipart body: {exc.detail}"
                ) from exc
            files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not files:
                raise ApiError(400, "missing_file", "multipart body has no file part named 'file'")
            return [ImageInput(f.filename, await f.read()) for f in files]
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

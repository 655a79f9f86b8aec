"""The Open Inference Protocol's REST endpoints (``/v2``), as Triton and KServe serve them.

Errors leave as the protocol's ``{"error": "message"}`` with the status of the same error
on ``/classify``. Each route counts in ``/metrics`` under its own path label.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.api.limits import BodyTooLarge
from app.api.v2.service import V2Error, V2Service
from app.api.v2.tensors import HEADER_LENGTH, ProtocolError, decode_rest, encode_rest

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])


def service(request: Request) -> V2Service:
    return request.app.state.v2


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def answer(call: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await call()
    except V2Error as exc:
        return error(exc.status, exc.message, exc.headers)


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return service(request).server_metadata()


@router.get("/health/live", summary="Liveness")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", summary="Readiness (as /readyz)")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if service(request).server_ready() else 503)


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model metadata")
async def model_metadata(request: Request, name: str, version: str = "") -> Any:
    async def call() -> dict[str, Any]:
        return service(request).model_metadata(name, version)

    return await answer(call)


@router.get("/models/{name}/ready", summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness")
async def model_ready(request: Request, name: str, version: str = "") -> Any:
    async def call() -> Response:
        ready = service(request).model_ready(name, version)
        return Response(status_code=200 if ready else 400)

    return await answer(call)


@router.get("/models/{name}/config", summary="Model configuration (Triton's extension)")
@router.get("/models/{name}/versions/{version}/config", summary="Model configuration")
async def model_config(request: Request, name: str, version: str = "") -> Any:
    async def call() -> dict[str, Any]:
        return service(request).model_config(name, version)

    return await answer(call)


@router.post("/models/{name}/infer", summary="Inference (JSON or binary tensor data)")
@router.post("/models/{name}/versions/{version}/infer", summary="Inference")
async def infer(request: Request, name: str, version: str = "") -> Response:
    request.state.model = name

    async def call() -> Response:
        try:
            body = await request.body()
        except BodyTooLarge as exc:
            raise V2Error(413, str(exc)) from exc
        try:
            decoded, binary_default = decode_rest(body, request.headers.get(HEADER_LENGTH))
        except ProtocolError as exc:
            raise V2Error(exc.status, str(exc)) from exc
        response = await service(request).infer(name, version, decoded)
        request.state.model = response.model_name
        asked = {o.name: o.parameters for o in decoded.outputs}
        binary = {
            t.name
            for t in response.outputs
            if asked.get(t.name, {}).get("binary_data", binary_default)
        }
        content, header_length = encode_rest(response, binary)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content,
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )

    return await answer(call)

"""Every failure leaves as JSON ``{"error": {"code", "message", "detail"}}``, never a bare 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.serving.batcher import BatcherStopped, DeadlineExceeded, QueueFull
from app.serving.engine.wire import EngineUnavailable
from app.serving.metrics import Metrics
from app.serving.pipeline import ModelUnavailable
from app.serving.preprocess import InputError
from app.store.errors import UnknownModel

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, detail: Any = None, headers=None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.detail, self.headers = detail, headers


def error_response(
    status: int, code: str, message: str, detail: Any = None, headers=None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "detail": detail}}
    return JSONResponse(body, status_code=status, headers=headers)


def as_api_error(exc: Exception) -> ApiError:
    """Map a domain exception from the request path to its HTTP meaning."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(exc.status, exc.code, str(exc))
    if isinstance(exc, UnknownModel):
        return ApiError(404, "unknown_model", str(exc))
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, "engine_unavailable", str(exc), headers={"Retry-After": "2"})
    if isinstance(exc, ModelUnavailable | BatcherStopped):
        return ApiError(503, "model_unavailable", str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, QueueFull):
        retry = str(max(1, round(exc.retry_after_s)))
        return ApiError(429, "queue_full", str(exc), headers={"Retry-After": retry})
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", str(exc))
    log.error("unhandled error in request path", exc_info=exc)
    return ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}")


# Statuses counted here as rejections; the batcher counts queue_full and deadline itself.
REJECTION_REASONS = {400: "bad_input", 413: "bad_input", 415: "bad_input", 503: "unavailable"}


def rejected(exc: Exception, metrics: Metrics, models: list[str]) -> ApiError:
    """Map ``exc`` to its HTTP error and count it against each (known) model it concerns."""
    err = as_api_error(exc)
    reason = REJECTION_REASONS.get(err.status)
    if reason:
        for model in dict.fromkeys(models):
            metrics.rejected.labels(model, reason).inc()
    return err


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return error_response(422, "invalid_request", message, errors)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        err = as_api_error(exc)
        return error_response(err.status, err.code, err.message, err.detail, err.headers)

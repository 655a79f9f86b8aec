"""Response bodies, as they appear in the OpenAPI docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class LabelScore(BaseModel):
    index: int = Field(description="Class index in the model's label set (timm ImageNet order).")
    label: str
    score: float = Field(description="Softmax probability.")


class ImageTimings(BaseModel):
    decode_ms: float
    queue_ms: float = Field(description="Wait in the model's queue before its batch ran.")
    inference_ms: float = Field(description="Forward time of the batch this image ran in.")
    batch_size: int


class ImageClassification(BaseModel):
    filename: str | None
    predictions: list[LabelScore]
    timings: ImageTimings


class RequestTimings(BaseModel):
    queue_ms: float = Field(description="Longest queue wait among the request's images.")
    inference_ms: float = Field(description="Longest batch forward among the request's images.")
    total_ms: float = Field(description="Server time from request received to response built.")


class ClassifyResponse(BaseModel):
    model: str
    variant: str
    results: list[ImageClassification] = Field(description="One entry per image, in order.")
    timings: RequestTimings


class ModelInfo(BaseModel):
    name: str
    state: str = Field(description="absent | loading | ready | failed")
    reason: str | None = Field(None, description="Why the model is not ready, if it is not.")
    default: bool
    variant: str | None = None
    architecture: str | None = None
    compression: str | None = None
    device: str | None = None
    dtype: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class ModelsResponse(BaseModel):
    default_model: str
    models: list[ModelInfo]


class Readiness(BaseModel):
    ready: bool
    detail: str
    models: dict[str, str]


class ErrorBody(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody

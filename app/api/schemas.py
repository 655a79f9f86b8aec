"""Response bodies, as they appear in the OpenAPI docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

RoutedBy = Literal["ab", "query", "default"]


class LabelScore(BaseModel):
    index: int = Field(description="Class index in the model's label set (timm ImageNet order).")
    label: str
    score: float = Field(description="Softmax probability.")


class ImageTimings(BaseModel):
    decode_ms: float = Field(description="Decode stage (decode + resize + crop) of its batch.")
    queue_ms: float = Field(description="Wait in the model's queue before its batch ran.")
    inference_ms: float = Field(description="Forward time of the batch this image ran in.")
    batch_size: int
    decoder: str | None = Field(
        description="'nvjpeg' (GPU, CUDA, torchvision's), 'nvimgcodec' (GPU, CUDA, "
        "nvImageCodec's), 'hardware' (the GPU's JPEG engines), 'pillow' (CPU), or null when "
        "decoded before queueing (compare)."
    )


class ImageClassification(BaseModel):
    filename: str | None
    predictions: list[LabelScore]
    timings: ImageTimings


class RequestTimings(BaseModel):
    queue_ms: float = Field(description="Longest queue wait among the request's images.")
    inference_ms: float = Field(description="Longest batch forward among the request's images.")
    total_ms: float = Field(description="Server time from request received to response built.")


class ClassifyResponse(BaseModel):
    model: str = Field(description="The model that served the request.")
    variant: str
    routed_by: RoutedBy = Field(
        description="How the model was chosen: ?model= (query), A/B weights (ab), or the "
        "default model (default)."
    )
    results: list[ImageClassification] = Field(description="One entry per image, in order.")
    timings: RequestTimings


class VariantTimings(BaseModel):
    queue_ms: float = Field(description="Longest queue wait among the images.")
    inference_ms: float = Field(description="Longest batch forward among the images.")
    latency_ms: float = Field(
        description="From the variant's images entering its queue to its last result."
    )


class VariantResult(BaseModel):
    model: str
    variant: str = Field(description="dense | compressed")
    compression: str | None = Field(None, description="Compression config, if compressed.")
    results: list[ImageClassification] = Field(description="One entry per image, in order.")
    timings: VariantTimings


class ImageAgreement(BaseModel):
    filename: str | None
    top1_match: bool
    top5_overlap: float = Field(
        description="Share of the reference's top-5 classes in the candidate's top 5."
    )
    total_variation: float = Field(description="½·Σ|p − q|, in [0, 1].")
    js_divergence: float = Field(description="Jensen-Shannon divergence in bits, in [0, 1].")
    symmetric_kl: float = Field(description="KL(p‖q) + KL(q‖p) in nats (ε-smoothed).")


class AgreementSummary(BaseModel):
    images: int
    top1_agreement: float = Field(description="Share of images whose top-1 classes match.")
    top5_overlap: float = Field(description="Mean over images.")
    total_variation: float = Field(description="Mean over images.")
    js_divergence: float = Field(description="Mean over images.")
    symmetric_kl: float = Field(description="Mean over images.")


class PairAgreement(BaseModel):
    reference: str = Field(description="The first model of ?models=.")
    candidate: str
    summary: AgreementSummary
    images: list[ImageAgreement] = Field(description="One entry per image, in order.")


class CompareTimings(BaseModel):
    decodes_per_image: int = Field(
        description="How often each image was decoded: once per distinct preprocessing."
    )
    total_ms: float = Field(description="Server time from request received to response built.")


class CompareResponse(BaseModel):
    reference: str
    variants: list[VariantResult] = Field(description="One entry per ?models= name, in order.")
    agreement: list[PairAgreement] = Field(
        description="Each variant after the first against the first (the reference)."
    )
    timings: CompareTimings


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
    source: str | None = Field(
        None, description="pretrained | import | compress (distilled) | derived | random"
    )
    teacher: str | None = Field(None, description="Derived entries: the dense entry used.")
    build: str | None = Field(
        None, description="The command that makes this entry's weights, if it has a recipe."
    )
    figures: dict[str, Any] = Field(
        default_factory=dict,
        description="Declared fidelity (agreement, n, 95% interval) and speed per architecture "
        "and batch; a figure timed on another architecture has borrowed: true.",
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Raw record of the run that made the weights."
    )


class ReloadResponse(BaseModel):
    models: dict[str, str] = Field(description="Every model's state after the reload.")


class ModelsResponse(BaseModel):
    default_model: str
    models: list[ModelInfo]


class EngineState(BaseModel):
    socket: str
    up: bool
    pid: int | None = Field(None, description="The engine process, while it is up.")
    restarts: int = Field(0, description="Times this worker reconnected to a new engine.")


class Readiness(BaseModel):
    ready: bool
    detail: str
    models: dict[str, str]
    engines: list[EngineState] | None = Field(
        None, description="The engine processes (one per device), with `vitserve serve`."
    )


class ErrorBody(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody

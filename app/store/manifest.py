"""The manifest: everything needed to rebuild, verify and preprocess for one stored model."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.vit.config import CompressionConfig

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_model_name(name: str) -> str:
    """The rule every entry name obeys; jobs call it up front, before minutes of training."""
    if not MODEL_NAME.match(name):
        raise ValueError(
            f"name {name!r}: lowercase letters, digits, '_', '-', '.', at most 64 chars"
        )
    return name


class WeightsInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = "model.safetensors"
    sha256: str | None = Field(None, description="Filled in when the weights are written.")

    @field_validator("file")
    @classmethod
    def _plain_safetensors_name(cls, v: str) -> str:
        if "/" in v or "\\" in v or v.startswith(".") or not v.endswith(".safetensors"):
            raise ValueError("weights file must be a plain *.safetensors name inside the entry")
        return v


class Preprocessing(BaseModel):
    """timm's pretrained data config; the eval transform is rebuilt from it exactly."""

    model_config = ConfigDict(extra="forbid")

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = Field(0.875, gt=0, le=1)
    crop_mode: Literal["center", "squash", "border"] = "center"

    def timm_data_config(self) -> dict[str, Any]:
        return self.model_dump()


class Source(BaseModel):
    """Where the weights came from (provenance for the operator)."""

    model_config = ConfigDict(extra="forbid")

    # random: initialised weights, for speed and load tests where none are available
    kind: Literal["timm-pretrained", "import", "compress", "random"]
    ref: str | None = Field(None, description="timm tag, file path or teacher name.")
    details: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    architecture: str = Field(description="timm model name of the dense network.")
    architecture_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra timm.create_model arguments (e.g. img_size)."
    )
    variant: Literal["dense", "compressed"]
    compression: CompressionConfig | None = None
    num_classes: int = Field(1000, ge=1)
    labels: Literal["imagenet-1k"] = "imagenet-1k"
    weights: WeightsInfo = Field(default_factory=WeightsInfo)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    source: Source
    description: str = ""
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Measured figures: fidelity, throughput ratio, ..."
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_model_name(v)

    @model_validator(mode="after")
    def _variant_matches_compression(self) -> Manifest:
        if (self.variant == "compressed") != (self.compression is not None):
            raise ValueError("variant 'compressed' needs a compression config, 'dense' none")
        return self

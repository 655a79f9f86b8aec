"""The manifest: everything needed to rebuild, verify and preprocess for one stored model."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
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

    # random: initialised weights, for speed and load tests where none are available;
    # derived: no weights file, built at load from the teacher entry's weights (`teacher`)
    kind: Literal["timm-pretrained", "import", "compress", "random", "derived"]
    ref: str | None = Field(None, description="timm tag, file path or teacher name.")
    details: dict[str, Any] = Field(default_factory=dict)


class Teacher(BaseModel):
    """The dense entry a derived entry is built from, pinned by its weights: the derived
    entry's figures hold for those weights only. The pin is a digest of the tensors (names,
    dtypes, shapes, values), not of the file: the same weights written by another
    safetensors version are another file but the same teacher."""

    model_config = ConfigDict(extra="forbid")

    name: str
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="app.store.store.tensor_digest of its weights"
    )


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): unlike p ± 2·se it stays
    inside [0, 1] and is honest near 100% agreement."""
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class FidelityFigure(BaseModel):
    """Top-1 agreement with the dense teacher on named photo sets, with its 95% interval."""

    model_config = ConfigDict(extra="allow")

    eval_sets: list[str] = Field(min_length=1, description="e.g. imagenet-dev, imagenet-extra")
    n_images: int = Field(ge=1)
    agreement_top1: float = Field(ge=0, le=1)
    ci95: tuple[float, float] = Field(description="95% interval of agreement_top1 (Wilson)")
    seeds: list[int] | None = Field(None, description="training seeds, for trained entries")
    measured: str | None = Field(None, description="device, dtype, how")
    source: str | None = Field(None, description="result file under bench/results")

    @model_validator(mode="after")
    def _interval_holds_the_figure(self) -> FidelityFigure:
        lo, hi = self.ci95
        if not lo <= self.agreement_top1 <= hi:
            raise ValueError(f"ci95 {self.ci95} does not contain {self.agreement_top1}")
        return self


class SpeedFigure(BaseModel):
    """Throughput relative to dense, per batch size, of one architecture on one device.

    ``architecture`` is the network timed; when it is not the entry's own, ``borrowed``
    must say so (a DeiT-S figure is never shown as a DeiT-Tiny one).
    """

    model_config = ConfigDict(extra="allow")

    architecture: str
    borrowed: bool = False
    device: str = Field(description="e.g. 'NVIDIA H200', 'CPU, 2 threads'")
    mode: str = Field(description="e.g. 'served: CUDA graphs, no compile', 'eager'")
    dtype: str
    speedup: dict[int, float] = Field(description="batch size -> dense time / entry time")
    source: str | None = None


class Figures(BaseModel):
    """The measured figures a manifest declares; the schema keeps them honest."""

    model_config = ConfigDict(extra="forbid")

    fidelity: list[FidelityFigure] = Field(default_factory=list)
    speed: list[SpeedFigure] = Field(default_factory=list)


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
    teacher: Teacher | None = Field(None, description="Derived entries: their dense teacher.")
    figures: Figures = Field(default_factory=Figures)
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="The raw record of the run that made the weights (as compress wrote it).",
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

    @model_validator(mode="after")
    def _derived_names_its_teacher(self) -> Manifest:
        if (self.source.kind == "derived") != (self.teacher is not None):
            raise ValueError("source 'derived' needs a teacher, and only it")
        if self.teacher is not None and not (self.compression and self.compression.training_free):
            raise ValueError(
                f"a derived entry needs a training-free config, not {self.compression}"
            )
        return self

    @model_validator(mode="after")
    def _borrowed_speed_is_labelled(self) -> Manifest:
        for figure in self.figures.speed:
            if figure.borrowed != (figure.architecture != self.architecture):
                raise ValueError(
                    f"speed figure on {figure.architecture} for an entry of {self.architecture}: "
                    "'borrowed' must be true exactly when the architecture is another's"
                )
        return self


def rewrite_declared(path: Path, raw: dict[str, Any]) -> None:
    """A declared manifest's JSON, edited in place (new measured figures), written back only
    if it is still a valid manifest, in the committed files' layout (fields in their order,
    non-ASCII kept) so that a rewrite with the same figures changes nothing."""
    Manifest.model_validate(raw)
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")


def put_figure(
    figures: list[dict[str, Any]],
    figure: dict[str, Any],
    same: Callable[[dict[str, Any]], bool],
) -> None:
    """Put a measured figure into a manifest's figure list: in place of the one ``same``
    finds (where it stood, so that re-recording the same result changes nothing), else
    at the end."""
    at = next((i for i, old in enumerate(figures) if same(old)), None)
    if at is None:
        figures.append(figure)
    else:
        figures[at] = figure

"""The Open Inference Protocol's meaning, shared by its REST and gRPC transports.

Every served store entry is a v2 model (version "1"). One more name, :data:`ROUTED_MODEL`,
follows the A/B weights as ``/classify`` without ``?model=`` does; its version, or the
request parameter ``model``, names the variant instead, as ``?model=`` does.

A request carries exactly one image input, any of the three the metadata declares:

- ``IMAGE`` (BYTES, [N] or [N, 1]): encoded images, probed, limited and decoded as on
  ``/classify`` (queued compressed, decoded per batch);
- ``PIXELS`` (UINT8, [N, H, W, 3]): decoded RGB images, queued as sent and resized and
  centre-cropped with their batch, on the model's device, as the model's eval transform does;
- ``PREPROCESSED`` (FP32, [N, 3, h, w] at the model's input size): resized, cropped and
  normalised by the client, fed to the model as sent.

Outputs: ``TOPK_INDICES`` (INT64 [N, k]) and ``TOPK_SCORES`` (FP32 [N, k]) by default,
``k`` from the request parameter ``top_k`` (default 5); ``PROBABILITIES`` (FP32 [N, C])
when asked. Any output asked with Triton's ``classification`` parameter (a count) comes
back as BYTES ``score:index:label`` strings, best first.

The request parameter ``compare`` (``"name[,name]"``) runs the same images on those
variants too, as ``/compare`` does with the serving variant as reference: the response
carries the serving variant's outputs and, per candidate, its agreement figures as
response parameters (``<name>.top1_agreement``, ...), counted in ``/metrics`` under
``mode="compare"``. A request routed by A/B weights names no variant, so this is how its
client (or a gateway) asks what the other arm would have said.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app import __version__
from app.api.errors import ApiError, rejected
from app.api.v2.tensors import InferRequest, InferResponse, ProtocolError, Tensor
from app.experiments.compare import all_or_nothing, compare, preprocessing_key
from app.serving.decode import Payload, Pixels, Preprocessed
from app.serving.pipeline import ImageInput, ImageResult
from app.serving.pool import ServedModel

ROUTED_MODEL = "vitserve"
VERSION = "1"
IMAGE, PIXELS, PREPROCESSED = "IMAGE", "PIXELS", "PREPROCESSED"
TOPK_INDICES, TOPK_SCORES, PROBABILITIES = "TOPK_INDICES", "TOPK_SCORES", "PROBABILITIES"
DEFAULT_OUTPUTS = (TOPK_INDICES, TOPK_SCORES)
DEFAULT_TOP_K = 5
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]
INPUT_TYPES = {IMAGE: "BYTES", PIXELS: "UINT8", PREPROCESSED: "FP32"}


class V2Error(Exception):
    """A failed v2 call: its HTTP status, message and headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Routed:
    model: ServedModel
    routed_by: str  # "version", "parameter", "ab", "default" (ROUTED_MODEL) or "name"


class V2Service:
    """What both transports call; ``state`` is the FastAPI app's state (pool, pipeline...)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    # ---- names --------------------------------------------------------------------------
    def _served_names(self) -> list[str]:
        return list(self.state.pool.models)

    def _check_version(self, name: str, version: str) -> None:
        if version and version != VERSION:
            raise V2Error(404, f"model {name!r} has no version {version!r} (only {VERSION!r})")

    def _declared(self, name: str) -> ServedModel:
        """A served entry, ready or not (metadata and readiness speak of unready ones)."""
        models = self.state.pool.models
        if name not in models:
            known = sorted([*models, ROUTED_MODEL])
            raise V2Error(404, f"unknown model {name!r}; available: {known}")
        return models[name]

    def _metadata_model(self, name: str, version: str) -> ServedModel:
        if name == ROUTED_MODEL:
            return self._declared(version or self.state.settings.default_model)
        self._check_version(name, version)
        return self._declared(name)

    # ---- server and model metadata ---------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": "vitserve", "version": __version__, "extensions": EXTENSIONS}

    def server_ready(self) -> bool:
        return self.state.pool.readiness()[0]

    def model_ready(self, name: str, version: str) -> bool:
        """False for an unknown name or version too, as Triton answers."""
        try:
            model = self._metadata_model(name, version)
        except V2Error:
            return False
        return self.state.pool.is_ready(model.name)

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        model = self._metadata_model(name, version)
        if model.manifest is None:
            raise V2Error(503, f"model {model.name!r} is {model.state}: no metadata yet")
        _, height, width = model.manifest.preprocessing.input_size
        classes = len(model.labels) or model.manifest.num_classes
        versions = self._served_names() if name == ROUTED_MODEL else [VERSION]
        return {
            "name": name,
            "versions": versions,
            "platform": f"vitserve_{model.manifest.variant}",
            "inputs": [
                {"name": IMAGE, "datatype": "BYTES", "shape": [-1, 1]},
                {"name": PIXELS, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                {"name": PREPROCESSED, "datatype": "FP32", "shape": [-1, 3, height, width]},
            ],
            "outputs": [
                {"name": TOPK_INDICES, "datatype": "INT64", "shape": [-1, -1]},
                {"name": TOPK_SCORES, "datatype": "FP32", "shape": [-1, -1]},
                {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
            ],
        }

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        """Triton's model configuration (its protobuf's JSON form), which perf_analyzer
        reads: the batch limit, and every input optional (a request sends one of them)."""
        meta = self.model_metadata(name, version)
        settings = self.state.settings

        def dims(shape: list[int]) -> list[int]:
            return shape[1:]  # without the batch dimension, as max_batch_size > 0 implies

        return {
            "name": name,
            "platform": meta["platform"],
            "max_batch_size": settings.max_images_per_request,
            "input": [
                {
                    "name": t["name"],
                    "data_type": f"TYPE_{'STRING' if t['datatype'] == 'BYTES' else t['datatype']}",
                    "dims": dims(t["shape"]),
                    "optional": True,
                }
                for t in meta["inputs"]
            ],
            "output": [
                {"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": dims(t["shape"])}
                for t in meta["outputs"]
            ],
            "dynamic_batching": {
                "max_queue_delay_microseconds": str(int(settings.max_delay_ms * 1000))
            },
        }

    # ---- inference --------------------------------------------------------------------------
    def route(self, name: str, version: str, parameters: dict[str, Any]) -> Routed:
        """The variant that serves a request, as ``/classify`` chooses one."""
        state = self.state
        if name != ROUTED_MODEL:
            self._check_version(name, version)
            return Routed(self._serving(name), "name")
        named = version or parameters.get("model")
        if named:
            return Routed(self._serving(str(named)), "version" if version else "parameter")
        if state.ab_router is not None:
            chosen = state.ab_router.choose(None, state.pool.is_ready)
            if chosen is not None:
                return Routed(self._serving(chosen), "ab")
        return Routed(self._serving(state.settings.default_model), "default")

    def _serving(self, name: str) -> ServedModel:
        try:
            return self.state.pipeline.serving(name)
        except Exception as exc:
            raise self._failure(exc, [name]) from exc

    def _failure(self, exc: Exception, models: list[str]) -> V2Error:
        """A domain error, counted in the metrics as ``/classify`` counts it."""
        if isinstance(exc, V2Error):
            return exc
        if isinstance(exc, ProtocolError):
            exc = ApiError(exc.status, "bad_input", str(exc))
        known = [m for m in models if m in self.state.pool.models]
        err = rejected(exc, self.state.metrics, known)
        return V2Error(err.status, err.message, err.headers)

    async def infer(self, name: str, version: str, request: InferRequest) -> InferResponse:
        received = time.monotonic()
        routed = self.route(name, version, request.parameters)
        model = routed.model
        settings = self.state.settings
        deadline = received + settings.request_timeout_s
        parameters: dict[str, Any] = {"routed_by": routed.routed_by}
        parameters["variant"] = model.manifest.variant
        candidates = self._candidates(model, request.parameters)
        try:
            top_k = self._top_k(request)
            tensor = self._image_input(request)
            images, payloads = await self._payloads(model, tensor)
            if candidates:
                results, figures = await self._compare(
                    model, candidates, tensor, images, payloads, deadline
                )
                parameters.update(figures)
            else:
                results = await all_or_nothing(
                    self.state.pipeline.infer(model, image, payload, settings.max_top_k, deadline)
                    for image, payload in zip(images, payloads, strict=True)
                )
            outputs = self._outputs(request, results, top_k)
        except Exception as exc:
            raise self._failure(exc, [model.name, *(c.name for c in candidates)]) from exc
        if tensor.name == IMAGE and not candidates:
            self.state.shadow.mirror(model, images, results)
        return InferResponse(model.name, VERSION, outputs, parameters, request.id)

    def _candidates(self, model: ServedModel, parameters: dict[str, Any]) -> list[ServedModel]:
        """The variants named by the ``compare`` parameter (comma-separated), as /compare's
        ``?models=`` names them after its reference: here the variant that serves."""
        named = parameters.get("compare")
        if not named:
            return []
        names = [n.strip() for n in str(named).split(",")]
        most = self.state.settings.max_compare_models - 1
        if any(not n for n in names) or len(names) > most:
            raise V2Error(400, f"compare: 1 to {most} comma-separated model names, got {named!r}")
        return [self._serving(n) for n in names]

    async def _compare(
        self,
        model: ServedModel,
        candidates: list[ServedModel],
        tensor: Tensor,
        images: list[ImageInput],
        payloads: list[Payload],
        deadline: float,
    ) -> tuple[list[ImageResult], dict[str, float]]:
        """The serving variant's results, and each candidate's agreement with it (means over
        the request's images), counted in the metrics as /compare counts them."""
        if tensor.name != IMAGE:
            keys = {preprocessing_key(m) for m in (model, *candidates)}
            if len(keys) > 1:
                raise ProtocolError(
                    f"compare: input {tensor.name} is prepared for one preprocessing, and "
                    "these variants differ in theirs; send IMAGE instead"
                )
        names = [model.name, *(c.name for c in candidates)]
        comparison = await compare(
            self.state.pipeline,
            names,
            images,
            self.state.settings.max_top_k,
            deadline,
            payloads=None if tensor.name == IMAGE else payloads,
        )
        figures = {}
        for pair in comparison.agreements:
            summary = pair.summary
            figures[f"{pair.candidate}.top1_agreement"] = summary.top1_agreement
            figures[f"{pair.candidate}.top5_overlap"] = summary.top5_overlap
            figures[f"{pair.candidate}.total_variation"] = summary.total_variation
            figures[f"{pair.candidate}.js_divergence"] = summary.js_divergence
        return comparison.variants[0].results, figures

    def _top_k(self, request: InferRequest) -> int:
        top_k = request.parameters.get("top_k", DEFAULT_TOP_K)
        most = self.state.settings.max_top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= most:
            raise ProtocolError(f"parameter top_k must be an integer in 1..{most}, got {top_k!r}")
        return top_k

    def _image_input(self, request: InferRequest) -> Tensor:
        given = [t for t in request.inputs if t.name in INPUT_TYPES]
        unknown = sorted({t.name for t in request.inputs} - set(INPUT_TYPES))
        if unknown:
            raise ProtocolError(f"unknown inputs {unknown}; the model takes {list(INPUT_TYPES)}")
        if len(given) != 1:
            raise ProtocolError(f"send exactly one of the inputs {list(INPUT_TYPES)}")
        tensor = given[0]
        expected = INPUT_TYPES[tensor.name]
        if tensor.datatype != expected:
            raise ProtocolError(f"input {tensor.name!r} is {expected}, not {tensor.datatype}")
        count = tensor.shape[0] if tensor.shape else 0
        most = self.state.settings.max_images_per_request
        if not 1 <= count <= most:
            raise ProtocolError(
                f"input {tensor.name!r}: 1 to {most} images, got shape {tensor.shape}"
            )
        return tensor

    async def _payloads(
        self, model: ServedModel, tensor: Tensor
    ) -> tuple[list[ImageInput], list[Payload]]:
        """The batcher's payloads for each image of ``tensor``, every one checked before
        any queues."""
        shape, pipeline = tensor.shape, self.state.pipeline
        if tensor.name == IMAGE:
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
                raise ProtocolError(f"input IMAGE: shape [N] or [N, 1], got {shape}")
            images = [ImageInput(None, bytes(x)) for x in tensor.data.reshape(-1)]
            return images, [pipeline.probe(model, image) for image in images]
        blank = [ImageInput(None, b"")] * shape[0]
        if tensor.name == PIXELS:
            if len(shape) != 4 or shape[3] != 3 or 0 in shape:
                raise ProtocolError(f"input PIXELS: shape [N, H, W, 3], got {shape}")
            model.preprocessor.check_size(width=shape[2], height=shape[1])  # as IMAGE's header
            images = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).permute(0, 3, 1, 2)
            return blank, [Pixels(image) for image in images]
        expected = [shape[0], *model.manifest.preprocessing.input_size]
        if shape != expected:
            raise ProtocolError(f"input PREPROCESSED: shape {expected}, got {shape}")
        data = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
        if not torch.isfinite(data).all():
            raise ProtocolError("input PREPROCESSED: values must be finite")
        return blank, [Preprocessed(image) for image in data]

    def _outputs(
        self, request: InferRequest, results: list[ImageResult], top_k: int
    ) -> list[Tensor]:
        wanted = {o.name: o.parameters for o in request.outputs} or dict.fromkeys(
            DEFAULT_OUTPUTS, {}
        )
        known = (TOPK_INDICES, TOPK_SCORES, PROBABILITIES)
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise ProtocolError(f"unknown outputs {unknown}; the model gives {list(known)}")
        outputs = []
        for name, parameters in wanted.items():
            classification = parameters.get("classification")
            if classification is not None:
                outputs.append(self._classification(name, results, classification))
            elif name == TOPK_INDICES:
                indices = [[p.index for p in r.predictions[:top_k]] for r in results]
                outputs.append(Tensor(name, "INT64", [len(results), top_k], np.array(indices)))
            elif name == TOPK_SCORES:
                scores = [[p.score for p in r.predictions[:top_k]] for r in results]
                array = np.array(scores, dtype=np.float32)
                outputs.append(Tensor(name, "FP32", [len(results), top_k], array))
            else:
                probs = torch.stack([r.probs for r in results]).float().cpu().numpy()
                outputs.append(Tensor(name, "FP32", list(probs.shape), probs))
        return outputs

    def _classification(self, name: str, results: list[ImageResult], count: Any) -> Tensor:
        most = self.state.settings.max_top_k
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= most:
            raise ProtocolError(f"output {name!r}: classification must be 1..{most}, got {count!r}")
        rows = [
            [f"{p.score:f}:{p.index}:{p.label}".encode() for p in r.predictions[:count]]
            for r in results
        ]
        array = np.empty((len(results), count), dtype=object)
        array[:] = rows
        return Tensor(name, "BYTES", [len(results), count], array)

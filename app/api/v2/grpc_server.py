"""The Open Inference Protocol's ``GRPCInferenceService`` (KServe v2, as Triton serves it).

The message and service classes are the ones ``tritonclient`` ships, generated from
Triton's own ``grpc_service.proto``: the server and its clients cannot drift apart, and no
generated code lives here. It runs on the app's event loop, beside HTTP, and calls the
same :class:`~app.api.v2.service.V2Service`. Calls count in ``/metrics`` as HTTP requests
do, under the route ``grpc:<Method>`` and the gRPC status name.

Several worker processes each start this server on the same port with SO_REUSEPORT (as
they share the HTTP port): the kernel spreads connections over them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from app.api.v2.service import V2Error, V2Service
from app.api.v2.tensors import (
    NUMPY_TYPES,
    InferRequest,
    InferResponse,
    ProtocolError,
    RequestedOutput,
    Tensor,
    check_shape,
    from_raw,
    to_raw,
)
from app.config import Settings
from app.serving.metrics import Metrics

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# InferTensorContents' field for each datatype (JSON-like typed lists instead of raw bytes)
CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(p: service_pb2.InferParameter) -> Any:
    choice = p.WhichOneof("parameter_choice")
    return getattr(p, choice) if choice else None


def set_parameter(p: service_pb2.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def decode_request(request: service_pb2.ModelInferRequest) -> InferRequest:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for k, t in enumerate(request.inputs):
        if t.datatype not in CONTENTS:
            raise ProtocolError(f"input {t.name!r}: unknown datatype {t.datatype!r}")
        shape = check_shape(t.name, list(t.shape))
        if raw:
            data = from_raw(t.name, t.datatype, shape, raw[k])
        else:
            values = list(getattr(t.contents, CONTENTS[t.datatype]))
            if len(values) != int(np.prod(shape)):
                raise ProtocolError(f"input {t.name!r}: {len(values)} values for shape {shape}")
            data = np.empty(len(values), dtype=NUMPY_TYPES[t.datatype])
            data[:] = values
            data = data.reshape(shape)
        params = {key: parameter_value(v) for key, v in t.parameters.items()}
        inputs.append(Tensor(t.name, t.datatype, shape, data, params))
    outputs = [
        RequestedOutput(o.name, {key: parameter_value(v) for key, v in o.parameters.items()})
        for o in request.outputs
    ]
    parameters = {key: parameter_value(v) for key, v in request.parameters.items()}
    return InferRequest(inputs, outputs, parameters, request.id or None)


def encode_response(response: InferResponse) -> service_pb2.ModelInferResponse:
    message = service_pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    for key, value in response.parameters.items():
        set_parameter(message.parameters[key], value)
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_output_contents.append(to_raw(tensor))
    return message


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The protocol's calls; those not defined here answer UNIMPLEMENTED."""

    def __init__(self, v2: V2Service, metrics: Metrics) -> None:
        self.v2, self.metrics = v2, metrics

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        model: str,
        call: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Run ``call``, turn a v2 error into its gRPC status, count the call as HTTP
        requests are counted."""
        started, code = time.monotonic(), grpc.StatusCode.OK
        self.metrics.in_flight.inc()
        try:
            return await call()
        except (V2Error, ProtocolError) as exc:
            status = exc.status
            message = exc.message if isinstance(exc, V2Error) else str(exc)
            headers = exc.headers if isinstance(exc, V2Error) else {}
            code = STATUS_CODES.get(status, grpc.StatusCode.INTERNAL)
            trailers = tuple((k.lower(), v) for k, v in headers.items())
            await context.abort(code, message, trailing_metadata=trailers)
        finally:
            self.metrics.in_flight.dec()
            known = model if model in self.v2.state.pool.models else ""
            labels = (known, f"grpc:{method}", code.name)
            self.metrics.requests.labels(*labels).inc()
            self.metrics.request_latency.labels(*labels).observe(time.monotonic() - started)

    async def ServerLive(self, request, context):  # noqa: N802 - the proto's names
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self.v2.server_ready())

    async def ModelReady(self, request, context):  # noqa: N802
        async def call():
            ready = self.v2.model_ready(request.name, request.version)
            return service_pb2.ModelReadyResponse(ready=ready)

        return await self._call("ModelReady", context, request.name, call)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return service_pb2.ServerMetadataResponse(**self.v2.server_metadata())

    async def ModelMetadata(self, request, context):  # noqa: N802
        async def call():
            meta = self.v2.model_metadata(request.name, request.version)
            return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse())

        return await self._call("ModelMetadata", context, request.name, call)

    async def ModelConfig(self, request, context):  # noqa: N802
        async def call():
            config = self.v2.model_config(request.name, request.version)
            message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
            return service_pb2.ModelConfigResponse(config=message)

        return await self._call("ModelConfig", context, request.name, call)

    async def ModelInfer(self, request, context):  # noqa: N802
        async def call():
            decoded = decode_request(request)
            response = await self.v2.infer(request.model_name, request.model_version, decoded)
            return encode_response(response)

        return await self._call("ModelInfer", context, request.model_name, call)


def grpc_server(settings: Settings, v2: V2Service, metrics: Metrics) -> grpc.aio.Server:
    """The server, bound to ``settings.grpc_port`` (not started)."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", settings.max_upload_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(v2, metrics), server
    )
    server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    return server

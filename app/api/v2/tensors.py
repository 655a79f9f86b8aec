"""Tensors of the Open Inference Protocol (v2), independent of the transport.

REST and gRPC both decode into :class:`InferRequest` and encode an :class:`InferResponse`;
this module holds the datatypes and the two REST encodings: JSON (``data`` lists) and
Triton's binary tensor data extension, where the JSON header is followed by raw tensor
bytes and ``Inference-Header-Content-Length`` says where the header ends. BYTES tensors
travel raw as elements each prefixed by its length (4 bytes, little-endian).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NUMPY_TYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(Exception):
    """A request the protocol cannot accept; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray  # of ``shape``; an object array of ``bytes`` for BYTES
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


def elements(shape: list[int]) -> int:
    return math.prod(shape)


def check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"input {name!r}: shape must be a list of integers >= 0, got {shape}")
    return shape


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES elements, each prefixed by its length (uint32, little-endian)."""
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def deserialize_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(f"input {name!r}: BYTES element overruns the data")
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise ProtocolError(
            f"input {name!r}: {len(raw) - offset} bytes beyond its {count} elements"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A tensor's raw bytes (binary extension, gRPC ``raw_input_contents``) → array."""
    count = elements(shape)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, name).reshape(shape)
    dtype = NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: {len(raw)} bytes of data, but shape {shape} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def to_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()


def from_json_data(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """A JSON ``data`` list (flat or nested, row-major) → array of ``shape``."""
    if datatype == "BYTES":
        flat = list(_flatten(data))
        if not all(isinstance(x, str) for x in flat):
            raise ProtocolError(f"input {name!r}: BYTES data in JSON must be strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = [x.encode() for x in flat]
    else:
        try:
            array = np.asarray(list(_flatten(data)), dtype=NUMPY_TYPES[datatype])
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"input {name!r}: data is not {datatype}: {exc}") from exc
    if array.size != elements(shape):
        raise ProtocolError(
            f"input {name!r}: {array.size} elements of data, but shape {shape} holds "
            f"{elements(shape)}"
        )
    return array.reshape(shape)


def _flatten(data: Any):
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def decode_rest(body: bytes, header_length: str | None) -> tuple[InferRequest, bool]:
    """A REST infer body → the request, and whether its outputs default to binary (the
    client sent ``binary_data_output``)."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(f"{HEADER_LENGTH}: {header_length!r} does not fit the body")
        header, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the inference header is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ProtocolError("the inference request needs an 'inputs' list")
    offset, inputs = 0, []
    for item in doc["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("each input needs a 'name'")
        name, datatype = item["name"], item.get("datatype")
        if not isinstance(datatype, str) or datatype not in NUMPY_TYPES:
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
        shape = check_shape(name, item.get("shape"))
        parameters = object_of(item.get("parameters"), f"input {name!r}: parameters")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size} overruns the body")
            data = from_raw(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in item:
            data = from_json_data(name, datatype, shape, item["data"])
        else:
            raise ProtocolError(f"input {name!r} has neither 'data' nor binary data")
        inputs.append(Tensor(name, datatype, shape, data, parameters))
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    asked = doc.get("outputs") or []
    if not isinstance(asked, list):
        raise ProtocolError("'outputs' must be a list")
    outputs = []
    for o in asked:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise ProtocolError("each requested output needs a 'name'")
        outputs.append(RequestedOutput(o["name"], object_of(o.get("parameters"), o["name"])))
    parameters = object_of(doc.get("parameters"), "the request's parameters")
    request = InferRequest(inputs, outputs, parameters, doc.get("id"))
    return request, bool(parameters.get("binary_data_output", False))


def object_of(value: Any, what: str) -> dict[str, Any]:
    """A JSON object, or nothing (None): anything else is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def encode_rest(response: InferResponse, binary: set[str]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when outputs in ``binary`` follow
    it as raw bytes (None: all JSON)."""
    outputs, blobs = [], []
    for tensor in response.outputs:
        out: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
            "parameters": dict(tensor.parameters),
        }
        if tensor.name in binary:
            raw = to_raw(tensor)
            out["parameters"]["binary_data_size"] = len(raw)
            blobs.append(raw)
        elif tensor.datatype == "BYTES":
            out["data"] = [x.decode("utf-8", "replace") for x in tensor.data.reshape(-1)]
        else:
            out["data"] = tensor.data.reshape(-1).tolist()
        outputs.append(out)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
        "parameters": response.parameters,
    }
    if response.id is not None:
        doc["id"] = response.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)

"""Open Inference Protocol (KServe v2) tensors: parse an infer request, encode its response.

Supports the JSON tensor format and Triton's binary tensor data extension: the
body is a JSON header of `Inference-Header-Content-Length` bytes followed by raw
little-endian tensors, one per input with parameters.binary_data_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError

from serving.errors import BadRequest
from serving.schema import ArtifactMeta, TensorSpec

__all__ = [
    "BINARY_HEADER",
    "decimal",
    "InferRequest",
    "parse_infer_request",
    "encode_infer_response",
    "server_metadata",
    "model_metadata",
    "model_config",
    "check_input",
    "finite_batch",
    "FP32",
]

BINARY_HEADER = "Inference-Header-Content-Length"
FP32 = _DTYPE = np.dtype("<f4")  # FP32, the only datatype refiner artifacts use


class _TensorParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_size: StrictInt | None = None  # input: bytes of this tensor in the binary section
    binary_data: StrictBool | None = None  # output: answer in the binary section


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: _TensorParams = _TensorParams()
    data: Any = None


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: _TensorParams = _TensorParams()


class _RequestParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_output: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: _RequestParams = _RequestParams()
    inputs: list[_Input]
    outputs: list[_Output] | None = None


@dataclass(frozen=True)
class InferRequest:
    """A checked request: the input batch and how to answer."""

    id: str | None
    x: np.ndarray  # float32 (N, *input shape), 1 <= N <= max_batch_size
    binary_output: bool  # answer the output tensor in the binary section


def decimal(text: str | None) -> int | None:
    """The value of an ASCII decimal string, else None (str.isdigit() also accepts '²' and '①', which int() refuses)."""
    return int(text) if text is not None and text.isascii() and text.isdigit() else None


def _spec(t: TensorSpec) -> str:
    return f"{t.name!r} {t.datatype} {[-1, *t.shape]}"


def _unsupported(params: _TensorParams, where: str) -> None:
    extra = sorted(params.model_extra or {})
    if extra:
        raise BadRequest(f"{where}: parameters {extra} are not supported (no shared memory or classification extension)")


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_infer_request(body: bytes, header_length: str | None, meta: ArtifactMeta) -> InferRequest:
    """Check an infer request body against the model's signature; BadRequest (400) says what is wrong."""
    expected_body = f'expected a KServe v2 inference request {{"inputs": [{{"name": "{meta.input.name}", ...}}]}}'
    if header_length is None:
        header, binary = body, b""
    else:
        json_length = decimal(header_length)
        if json_length is None or json_length > len(body):
            raise BadRequest(
                f"{BINARY_HEADER} is {header_length!r} but the body has {len(body)} bytes; "
                "expected the byte length of the JSON header at the start of the body"
            )
        header, binary = body[:json_length], body[json_length:]
    try:  # orjson: fast, and it refuses nesting deeper than 1024 and numbers beyond float range
        raw = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON ({e}); {expected_body}") from e
    if not isinstance(raw, dict):
        raise BadRequest(f"request body is a JSON {type(raw).__name__}; {expected_body}")
    try:
        request = _Request.model_validate(raw)
    except ValidationError as e:
        raise BadRequest(f"malformed inference request: {_validation_message(e)}; {expected_body}") from e

    names = [i.name for i in request.inputs]
    if names != [meta.input.name]:
        raise BadRequest(f"request inputs are {names}; model {meta.name!r} takes exactly one input {_spec(meta.input)}")
    x = _input_array(request.inputs[0], binary, meta)

    binary_output = request.parameters.binary_data_output
    if request.outputs is not None:
        out_names = [o.name for o in request.outputs]
        if out_names != [meta.output.name]:
            raise BadRequest(f"requested outputs {out_names}; model {meta.name!r} has one output {_spec(meta.output)}")
        params = request.outputs[0].parameters
        _unsupported(params, f"output {meta.output.name!r}")
        if params.binary_data is not None:
            binary_output = params.binary_data
    return InferRequest(id=request.id, x=x, binary_output=binary_output)


def _input_array(inp: _Input, binary: bytes, meta: ArtifactMeta) -> np.ndarray:
    where = f"input {inp.name!r}"
    _unsupported(inp.parameters, where)
    shape = inp.shape
    count = check_input(where, inp.datatype, shape, meta)
    size = inp.parameters.binary_data_size
    if size is not None:
        if inp.data is not None:
            raise BadRequest(f"{where} has both 'data' and parameters.binary_data_size; expected one of them")
        if size != count * _DTYPE.itemsize or len(binary) != size:
            raise BadRequest(
                f"{where}: binary_data_size is {size} and the binary section has {len(binary)} bytes; shape {shape} "
                f"of {inp.datatype} needs {count * _DTYPE.itemsize} bytes"
            )
        x = np.frombuffer(binary, dtype=_DTYPE)
    else:
        if binary:
            raise BadRequest(f"the body has {len(binary)} bytes after the JSON header but no input declares binary_data_size")
        if inp.data is None:
            raise BadRequest(f"{where} has no 'data' and no parameters.binary_data_size; expected one of them")
        x = _json_array(inp.data, where)
        if x.size != count:
            raise BadRequest(f"{where} has {x.size} values; shape {shape} needs {count}")
    return finite_batch(x, shape, where)


def check_input(where: str, datatype: str, shape: list[int], meta: ArtifactMeta) -> int:
    """The input's datatype and shape against the model's ([N, *input shape], 1 <= N <= max batch); its value count.
    Shared by HTTP and gRPC, so both refuse the same requests with the same words."""
    if datatype != meta.input.datatype:
        raise BadRequest(f"{where} has datatype {datatype!r}; expected {meta.input.datatype}")
    if len(shape) != 1 + len(meta.input.shape) or list(shape[1:]) != meta.input.shape or not 1 <= shape[0] <= meta.max_batch_size:
        raise BadRequest(
            f"{where} has shape {list(shape)}; expected [N, {', '.join(map(str, meta.input.shape))}] "
            f"with 1 <= N <= {meta.max_batch_size} (the model's max batch size)"
        )
    return math.prod(shape)


def finite_batch(x: np.ndarray, shape: list[int], where: str) -> np.ndarray:
    """`x` as the float32 batch of `shape`; BadRequest if it holds NaN or infinities."""
    x = x.reshape(shape).astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise BadRequest(f"{where} contains NaN or infinite values; expected finite FP32 numbers")
    return x


def _json_array(data: Any, where: str) -> np.ndarray:
    try:
        x = np.asarray(data)
    except ValueError as e:  # ragged nested lists
        raise BadRequest(f"{where}: 'data' is not a regular (nested) list of numbers ({e})") from e
    if x.dtype.kind not in "iuf":
        raise BadRequest(f"{where}: 'data' holds {x.dtype.kind!r}-kind values, not only numbers; expected a list of numbers")
    if _has_bool(data):  # numpy reads [true, 0.5] as [1.0, 0.5]: FP32 takes numbers only
        raise BadRequest(f"{where}: 'data' holds booleans; FP32 takes numbers only")
    return x.ravel()


def _has_bool(data: Any) -> bool:
    """Whether a regular nested list (checked by numpy already) holds a JSON true/false anywhere."""
    if not isinstance(data, list):
        return isinstance(data, bool)
    while data and isinstance(data[0], list):
        data = [v for row in data for v in row]
    return bool in set(map(type, data))


def encode_infer_response(request: InferRequest, meta: ArtifactMeta, y: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """Response body and headers; the output goes in the binary section if the request asked for it."""
    y = np.ascontiguousarray(y, dtype=_DTYPE)
    output: dict[str, Any] = {"name": meta.output.name, "datatype": meta.output.datatype, "shape": list(y.shape)}
    if request.binary_output:
        output["parameters"] = {"binary_data_size": y.nbytes}
    else:
        output["data"] = y.ravel().tolist()
    response: dict[str, Any] = {"model_name": meta.name, "model_version": str(meta.version), "outputs": [output]}
    if request.id is not None:
        response["id"] = request.id
    header = orjson.dumps(response)
    if not request.binary_output:
        return header, {"content-type": "application/json"}
    return header + y.tobytes(), {"content-type": "application/octet-stream", BINARY_HEADER: str(len(header))}


def server_metadata() -> dict[str, Any]:
    """GET /v2 (and gRPC ServerMetadata): the server's name, version and protocol extensions."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("refiner")
    except PackageNotFoundError:
        number = "unknown"
    return {"name": "refiner-serving", "version": number, "extensions": ["binary_tensor_data", "model_configuration", "model_repository"]}


def model_metadata(meta: ArtifactMeta, provider: str) -> dict[str, Any]:
    """GET /v2/models/{name}: the v2 model metadata, plus what serving it needs (classes, preprocessing)."""
    return {
        "name": meta.name,
        "versions": [str(meta.version)],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": meta.input.name, "datatype": meta.input.datatype, "shape": [-1, *meta.input.shape]}],
        "outputs": [{"name": meta.output.name, "datatype": meta.output.datatype, "shape": [-1, *meta.output.shape]}],
        "parameters": {
            "execution_provider": provider,
            "max_batch_size": meta.max_batch_size,
            "class_names": meta.class_names,
            "preprocess": meta.preprocess.model_dump(),
        },
    }


def model_config(meta: ArtifactMeta, max_queue_delay_us: int, batching: bool) -> dict[str, Any]:
    """GET /v2/models/{name}/config: Triton's model configuration as JSON (tritonclient's get_model_config)."""
    config: dict[str, Any] = {
        "name": meta.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": meta.max_batch_size,
        "input": [{"name": meta.input.name, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": meta.input.shape}],
        "output": [{"name": meta.output.name, "data_type": "TYPE_FP32", "dims": meta.output.shape}],
    }
    if batching:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": max_queue_delay_us}
    return config

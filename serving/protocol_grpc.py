"""The gRPC half of the Open Inference Protocol (KServe v2 / Triton): requests checked and answers built in its messages.

The messages are the official service definition's (Triton's grpc_service.proto, as generated in
tritonclient.grpc, whose `inference.GRPCInferenceService` is KServe v2's service plus Triton's
extensions). The checks are the HTTP path's (serving/protocol.py), so both refuse the same requests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb

from serving.errors import BadRequest
from serving.protocol import FP32, check_input, finite_batch
from serving.schema import ArtifactMeta

__all__ = ["parse_model_infer", "model_infer_response", "model_metadata_response", "model_config_response"]


def _unsupported(params: Any, where: str) -> None:
    names = sorted(k for k in params if k not in ("binary_data",))  # binary_data: how HTTP clients ask; all answers are raw here
    if names:
        raise BadRequest(f"{where}: parameters {names} are not supported (no shared memory or classification extension)")


def parse_model_infer(request: pb.ModelInferRequest, meta: ArtifactMeta) -> np.ndarray:
    """The input batch of a ModelInferRequest, checked against the model; BadRequest (INVALID_ARGUMENT) says what is wrong."""
    names = [i.name for i in request.inputs]
    spec = f"{meta.input.name!r} {meta.input.datatype} {[-1, *meta.input.shape]}"
    if names != [meta.input.name]:
        raise BadRequest(f"request inputs are {names}; model {meta.name!r} takes exactly one input {spec}")
    inp = request.inputs[0]
    where = f"input {inp.name!r}"
    _unsupported(inp.parameters, where)
    _unsupported(request.parameters, "the request")
    outputs = [o.name for o in request.outputs]
    if outputs and outputs != [meta.output.name]:
        raise BadRequest(f"requested outputs {outputs}; model {meta.name!r} has one output {meta.output.name!r}")
    for o in request.outputs:
        _unsupported(o.parameters, f"output {o.name!r}")
    shape = list(inp.shape)
    count = check_input(where, inp.datatype, shape, meta)
    typed = inp.contents.fp32_contents
    if request.raw_input_contents:
        if typed or len(request.raw_input_contents) != 1:
            raise BadRequest(
                f"the request has {len(request.raw_input_contents)} raw_input_contents and {len(typed)} fp32_contents; "
                "expected one raw tensor per input, or the values in contents.fp32_contents"
            )
        raw = request.raw_input_contents[0]
        if len(raw) != count * FP32.itemsize:
            raise BadRequest(f"{where}: raw_input_contents has {len(raw)} bytes; shape {shape} of FP32 needs {count * FP32.itemsize}")
        x = np.frombuffer(raw, dtype=FP32)
    else:
        if len(typed) != count:
            raise BadRequest(f"{where}: contents.fp32_contents has {len(typed)} values; shape {shape} needs {count}")
        x = np.asarray(typed, dtype=np.float32)
    return finite_batch(x, shape, where)


def model_infer_response(request: pb.ModelInferRequest, meta: ArtifactMeta, y: np.ndarray) -> pb.ModelInferResponse:
    """The logits as raw little-endian FP32, as Triton answers."""
    y = np.ascontiguousarray(y, dtype=FP32)
    response = pb.ModelInferResponse(model_name=meta.name, model_version=str(meta.version), id=request.id)
    response.outputs.add(name=meta.output.name, datatype=meta.output.datatype, shape=list(y.shape))
    response.raw_output_contents.append(y.tobytes())
    return response


def model_metadata_response(metadata: dict[str, Any]) -> pb.ModelMetadataResponse:
    """serving.protocol.model_metadata's dict as the gRPC message (which has no parameters: classes and preprocessing
    are HTTP's GET /v2/models/NAME only)."""
    response = pb.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"])
    for field, tensors in (("inputs", metadata["inputs"]), ("outputs", metadata["outputs"])):
        for t in tensors:
            getattr(response, field).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return response


def model_config_response(config: dict[str, Any]) -> pb.ModelConfigResponse:
    """serving.protocol.model_config's dict (Triton's config as JSON) as the gRPC message."""
    return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

"""The KServe v2 / Triton gRPC service (grpc.aio), on the HTTP server's event loop, models and limits.

It serves the protocol's health, server and model metadata, model config, ModelInfer (typed or raw
contents) and Triton's repository extension (index, load, unload), under the same restricted API
as HTTP (the key in the request's metadata under the same header name). Everything else the service
defines (streaming, shared memory, statistics, trace, logging) answers UNIMPLEMENTED, as its base does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from serving.access import Api, check_key
from serving.errors import BadRequest, NotAllowed, NotFound, PayloadTooLarge, RequestTimeout, ServingError, Unauthorized, Unavailable
from serving.protocol import model_config, model_metadata, server_metadata
from serving.protocol_grpc import model_config_response, model_infer_response, model_metadata_response, parse_model_infer
from serving.state import ServerState

__all__ = ["GrpcServer"]

log = logging.getLogger("serving.grpc")

_MESSAGE_OVERHEAD = 1024 * 1024  # bytes of a ModelInferRequest beside its tensor
_CODES = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotAllowed: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext, method: str, api: Api | None) -> AsyncIterator[None]:
        """Count the call as in flight (shutdown waits for it), check the key, and answer ServingErrors with their code."""
        state, begun = self.state, time.perf_counter()
        state.in_flight += 1
        code = grpc.StatusCode.OK
        try:
            if api is not None:
                key = dict(context.invocation_metadata() or ()).get(state.settings.api_key_header)
                check_key(state.settings, api, key)
            yield
        except ServingError as e:
            code = _CODES.get(type(e), grpc.StatusCode.INTERNAL)
            if isinstance(e, NotAllowed | Unauthorized):
                state.refusals.note(f"gRPC {method}: {e.message}")
            elif code == grpc.StatusCode.INTERNAL:
                log.error("gRPC %s: %s", method, e.message)
            await context.abort(code, e.message)
        except grpc.aio.AbortError:  # abort() raises to end the call: not a failure of ours
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("gRPC %s failed", method)
            await context.abort(code, "internal server error; the server log has the details")
        finally:
            state.in_flight -= 1
            state.metrics.grpc_requests.labels(method, code.name).inc()
            state.metrics.grpc_latency.labels(method).observe(time.perf_counter() - begun)

    async def ServerLive(self, request, context):
        async with self._call(context, "ServerLive", None):
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        async with self._call(context, "ServerReady", None):
            return pb.ServerReadyResponse(ready=self.state.ready)

    async def ModelReady(self, request, context):
        async with self._call(context, "ModelReady", None):
            self.state.repository.get(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=self.state.ready)

    async def ServerMetadata(self, request, context):
        async with self._call(context, "ServerMetadata", None):
            return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request, context):
        async with self._call(context, "ModelMetadata", "metadata"):
            model = self.state.repository.get(request.name, request.version or None)
            return model_metadata_response(model_metadata(model.meta, model.runtime.provider))

    async def ModelConfig(self, request, context):
        async with self._call(context, "ModelConfig", "metadata"):
            model = self.state.repository.get(request.name, request.version or None)
            s = self.state.settings
            return model_config_response(model_config(model.meta, int(s.max_queue_delay_ms * 1000), s.batching))

    async def ModelInfer(self, request, context):
        async with self._call(context, "ModelInfer", "inference"):
            repository = self.state.repository
            with repository.hold(request.model_name, request.model_version or None) as model:  # the message is all in
                with model.batcher.arrival() as arrival:
                    y = await arrival.infer(parse_model_infer(request, model.meta))  # raw bytes: no parsing worth a thread
            return model_infer_response(request, model.meta, y)

    async def RepositoryIndex(self, request, context):
        async with self._call(context, "RepositoryIndex", "model-repository"):
            if request.repository_name:
                raise BadRequest(f"repository {request.repository_name!r}: this server has one repository, named ''")
            rows = self.state.repository.index(ready_only=request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows])

    async def RepositoryModelLoad(self, request, context):
        async with self._call(context, "RepositoryModelLoad", "model-repository"):
            if request.parameters:
                raise BadRequest(
                    f"load parameters {sorted(request.parameters)} are not supported (no config or file override): "
                    "the model is loaded from the repository as it is"
                )
            await self.state.control.load(request.model_name)
            return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        async with self._call(context, "RepositoryModelUnload", "model-repository"):
            await self.state.control.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()


class GrpcServer:
    """The gRPC service of one app's state, started and stopped with it (serving/app.py's lifespan)."""

    def __init__(self, state: ServerState) -> None:
        s = state.settings
        limit = s.max_batch_bytes + _MESSAGE_OVERHEAD  # no model may take a larger batch (serving/control.py)
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        self._server = grpc.aio.server(options=options, maximum_concurrent_rpcs=s.max_connections)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(state), self._server)
        self.address = f"{s.grpc_host}:{s.grpc_port}"
        self.port = self._server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"gRPC cannot listen on {self.address}")

    async def start(self) -> None:
        await self._server.start()
        log.info("gRPC (KServe v2 / Triton) on %s:%d", self.address.rsplit(":", 1)[0], self.port)

    async def stop(self, grace_s: float) -> None:
        """New calls are refused; calls in flight get `grace_s`, then are cancelled."""
        await self._server.stop(grace_s)

"""Open Inference Protocol V2 over gRPC: KServe's ``inference.GRPCInferenceService``.

Stubs: no wheel ships KServe's generated ``grpc_predict_v2`` stubs on their own. Triton's generated
``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc`` declare the same package (``inference``),
service name and messages, a wire-compatible superset; ``tritonclient[grpc]`` is a runtime
dependency for that reason (see pyproject.toml). Only the KServe RPCs are registered, so the
Triton-only ones (ModelStreamInfer, ModelConfig, repository and shared-memory calls, ...) answer
UNIMPLEMENTED from gRPC core (the servicer base's sync stubs would run in a thread pool and log a
traceback per call).

This module only parses and serialises protobuf; the protocol logic (validation, tensors, metadata)
is :mod:`services.protocols.oip.core`, shared with the REST front end. :func:`serve` starts a
``grpc.aio`` server
on the *calling* event loop: the Router starts one in every worker from an ``on_startup`` hook, so
gRPC, REST and ``/predict`` requests for one model meet in the same micro-batcher. grpc.aio runs on
uvloop (what BentoML's uvicorn uses here): the servicer's coroutines run on the worker's loop.
Caveat, measured: grpc.aio accepts one call per round trip through its poller thread, so calls
reach the batcher about one per loop tick, and without the batcher's hold (``batch_hold_ms``, see
services/runtime/batcher.py) gRPC-only load forms tiny batches (single-row calls at c=64, 2
workers: ~1.1
rows per model call; 5-8 with the default 2 ms hold).

Every worker binds the same ``SERVERY_GRPC_HOST:SERVERY_GRPC_PORT`` with ``SO_REUSEPORT`` (gRPC's
default on Linux, set explicitly here); the kernel hashes each new *connection* to one worker, so
one client channel (one HTTP/2 connection) always talks to one worker, and many channels spread.
gRPC core sheds load by itself: calls that pile up unaccepted in one worker (a burst of ~2,000
concurrent calls on one channel, measured) end CANCELLED; the ``grpc.server.max_pending_requests``
server options move that limit.

With API keys configured (services/gateway/auth.py) every RPC but ``ServerLive``, ``ServerReady``,
server reflection and the whole server's ``grpc.health.v1`` checks (grpc_health.py) needs
metadata ``authorization: Bearer <key>`` (UNAUTHENTICATED without a known key), a model the key
may use (PERMISSION_DENIED) and room in the key's rate limit (RESOURCE_EXHAUSTED, with trailing
metadata ``retry-after``); the buckets are the same as the worker's HTTP requests use.

Replies carry ``raw_output_contents`` (little-endian bytes, one buffer per output), as Triton does:
the cheapest encoding, and what ``tritonclient`` decodes. Requests may use typed ``contents`` or
``raw_input_contents``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from models.config import Settings
from services.ops import metrics
from services.ops import tracing as otel
from services.protocols.oip import core as oip
from services.protocols.oip import grpc_health, grpc_tracing
from services.runtime.errors import (
    BadRequest,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ServeryError,
    Unauthenticated,
)
from services.runtime.inference import Call, infer
from services.runtime.predictors import ModelInfo
from services.runtime.registry import ROUTE_KEY_HEADER, Registry

if TYPE_CHECKING:
    from services.gateway.auth import Keyring

logger = logging.getLogger("servery")

SERVICE = "inference.GRPCInferenceService"
KSERVE_RPCS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
)
"""The RPCs of KServe's grpc_predict_v2.proto; Triton's other methods are left out."""

STOP_GRACE_S = 2.0
"""Seconds in-flight calls get to finish when a worker stops."""

INTERNAL_MESSAGE = "internal server error; see server log"

# Typed ``InferTensorContents`` field per OIP datatype (FP16 has none: it travels raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# --- decoding and encoding (plain functions, no server needed) ----------------------------------


def decode_inputs(request: pb.ModelInferRequest) -> list[oip.InputTensor]:
    """The request's input tensors with their data as numpy arrays.

    With ``raw_input_contents`` the i-th buffer belongs to the i-th input and no input may also
    carry typed ``contents``. Non-numeric datatypes are passed on undecoded, so
    :func:`oip.rows_from_inputs` rejects them with the same message as over REST.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"request has {len(request.inputs)} input(s) but {len(raw)} raw_input_contents "
            "buffer(s); send one buffer per input, in the order of the inputs"
        )
    tensors = []
    for i, t in enumerate(request.inputs):
        if raw:
            if t.HasField("contents"):
                raise InvalidInput(
                    f"input '{t.name}' has typed contents and raw_input_contents; send one"
                )
            data = _from_raw(t.name, t.datatype, raw[i])
        else:
            data = _from_contents(t)
        tensors.append(oip.InputTensor(t.name, t.datatype, list(t.shape), data))
    return tensors


def _from_raw(name: str, datatype: str, buf: bytes) -> Any:
    if datatype == "BYTES":
        return oip.bytes_elements(buf, f"input '{name}'")
    dtype = oip.NUMERIC_DTYPES.get(datatype)
    if dtype is None:
        return []
    if len(buf) % dtype.itemsize:
        raise InvalidInput(
            f"raw_input_contents of input '{name}' holds {len(buf)} bytes, not a whole number "
            f"of {datatype} values ({dtype.itemsize} bytes each)"
        )
    # A copy: frombuffer views the message's read-only bytes, and torch.from_numpy (the PyTorch
    # runtime) warns on read-only arrays.
    return np.frombuffer(buf, dtype=dtype.newbyteorder("<")).astype(dtype)


def _from_contents(t: pb.ModelInferRequest.InferInputTensor) -> Any:
    if t.datatype == "BYTES":
        arr = np.empty(len(t.contents.bytes_contents), dtype=object)
        arr[:] = list(t.contents.bytes_contents)
        return arr
    dtype = oip.NUMERIC_DTYPES.get(t.datatype)
    if dtype is None:
        return []
    given = [field.name for field, _ in t.contents.ListFields()]
    expected = CONTENTS_FIELD.get(t.datatype)
    if not given:
        where = f"contents.{expected} or " if expected else ""
        raise InvalidInput(f"input '{t.name}' has no data: send it in {where}raw_input_contents")
    if expected is None:
        raise InvalidInput(
            f"input '{t.name}' has datatype {t.datatype}, which has no typed contents field; "
            "send it in raw_input_contents"
        )
    if given != [expected]:
        raise InvalidInput(
            f"input '{t.name}' has datatype {t.datatype}: send its values in "
            f"contents.{expected}, not {', '.join(given)}"
        )
    try:
        return np.array(getattr(t.contents, expected), dtype=dtype)
    except OverflowError:
        raise InvalidInput(f"input '{t.name}' holds values outside {t.datatype} range") from None


def encode_response(
    request: pb.ModelInferRequest,
    info: ModelInfo,
    outputs: Sequence[oip.OutputTensor],
    routed_by: str | None = None,
) -> pb.ModelInferResponse:
    """The reply: output metadata plus one little-endian ``raw_output_contents`` buffer each;
    ``parameters["routed_by"]`` says what chose the version (as over REST)."""
    response = pb.ModelInferResponse(
        model_name=info.name, model_version=info.version, id=request.id
    )
    if routed_by is not None:
        response.parameters["routed_by"].string_param = routed_by
    for t in outputs:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        data = t.data.astype(t.data.dtype.newbyteorder("<"), copy=False)
        response.raw_output_contents.append(data.tobytes())
    return response


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an error; internals never leave the server."""
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, exc.message
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, exc.message
    if isinstance(exc, Forbidden):
        return grpc.StatusCode.PERMISSION_DENIED, exc.message
    if isinstance(exc, RateLimited):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message
    if isinstance(exc, ModelNotReady | Overloaded):
        return grpc.StatusCode.UNAVAILABLE, exc.message
    if isinstance(exc, InvalidInput | BadRequest | PayloadTooLarge):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message
    if isinstance(exc, ServeryError) and 400 <= exc.status_code < 500:
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message
    if isinstance(exc, ServeryError) and exc.status_code == 503:
        return grpc.StatusCode.UNAVAILABLE, exc.message
    logger.error("internal error while serving a gRPC call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _http_status(exc: BaseException) -> int:
    return exc.status_code if isinstance(exc, ServeryError) else 500


def trailers(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for an error: its HTTP headers that mean something here (retry-after)."""
    if isinstance(exc, RateLimited) and exc.retry_after_s is not None:
        return (("retry-after", str(exc.retry_after_s)),)
    return ()


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status, message and trailers of ``exc``."""
    await context.abort(*status_of(exc), trailing_metadata=trailers(exc))


# --- the servicer -------------------------------------------------------------------------------


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe V2 ``GRPCInferenceService`` over the Router's registry (one per router worker)."""

    def __init__(
        self,
        registry: Registry,
        max_rows: int,
        *,
        access_log: bool = False,
        keys: Keyring | None = None,
    ) -> None:
        self._registry = registry
        self._keys = keys
        self._max_rows = max_rows
        self._seconds = metrics.REQUEST_SECONDS.labels("grpc:ModelInfer")
        self._access = logging.getLogger("bentoml.access") if access_log else None

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._registry.ready())

    def _admit(self, context: grpc.aio.ServicerContext, model: str | None) -> str | None:
        """Check the call's API key (its allowed models when ``model`` is given) and charge its
        rate limit; the key's name (None: keys are off). Raises the auth errors."""
        if self._keys is None:
            return None
        key = self._keys.authenticate(metadata(context, "authorization"))
        if model is not None:
            key.check_model(model)
        key.admit()
        return key.name

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._admit(context, request.name)
        except ServeryError as e:
            await abort(context, e)
        try:
            problem = self._registry.problem(request.name, request.version or None)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=problem is None)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        try:
            self._admit(context, None)
        except ServeryError as e:
            await abort(context, e)
        return pb.ServerMetadataResponse(**oip.server_metadata())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            self._admit(context, request.name)
            served = self._registry.get(request.name, request.version or None)
        except Exception as e:
            await abort(context, e)
        versions = () if request.version else self._registry.routes(request.name).ordered
        meta = oip.model_metadata(served.info, versions)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        fields = ("name", "datatype", "shape")
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**{k: t[k] for k in fields}) for t in meta["inputs"]],
            outputs=[tensor(**{k: t[k] for k in fields}) for t in meta["outputs"]],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        # Counted like /predict, with the HTTP-equivalent status: one series for every protocol;
        # timed in servery_request_duration_seconds{route="grpc:ModelInfer"} and access-logged
        # like the REST fast path.
        call = Call()
        status = 200
        names: tuple[str, ...] = ()

        def decode(info: ModelInfo, max_rows: int) -> Any:
            nonlocal names
            tensors = decode_inputs(request)
            names = oip.requested_outputs([o.name for o in request.outputs], info)
            return oip.rows_from_inputs(tensors, info, max_rows)

        try:
            # Key, then model, so an unknown model is NOT_FOUND whatever its tensors look like.
            if (key := self._admit(context, request.model_name)) is not None:
                call.key = key  # usage per key (services/ops/usage.py)
            result = await infer(
                self._registry,
                call,
                request.model_name,
                request.model_version or None,
                decode,
                self._max_rows,
                lambda: route_key(context),
            )
            info = result.info
            outputs = oip.output_tensors(info, result.outputs, names)
            return encode_response(request, info, outputs, result.routed_by)
        except Exception as e:
            status = _http_status(e)
            await abort(context, e)
        finally:
            # also on cancellation (client gone): 499, nginx's "client closed request"
            if status == 200 and sys.exc_info()[0] is not None:
                status = 499
            elapsed = call.answered(status)
            self._seconds.observe(elapsed)
            if self._access is not None:
                served = call.served
                self._access.info(
                    "%s (scheme=grpc,method=ModelInfer,model=%s,version=%s) (status=%d) %.3fms",
                    context.peer(),
                    metrics.UNKNOWN_MODEL if served is None else served.info.name,
                    "" if served is None else served.info.version,
                    status,
                    elapsed * 1000.0,
                )


def route_key(context: grpc.aio.ServicerContext) -> str | None:
    """The ``x-servery-route-key`` metadata value of a call, if any."""
    return metadata(context, ROUTE_KEY_HEADER)


def metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    """The value of a call's metadata entry ``name`` (lowercase), if any."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def rpc_handler(
    servicer: InferenceServicer, tracing: otel.Tracing | None = None
) -> grpc.GenericRpcHandler:
    """Handlers for the KServe RPCs of ``servicer`` (what ``add_...Servicer_to_server`` builds),
    each in a span when ``tracing`` traces the call (grpc_tracing.py)."""
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    handlers = {}
    for name in KSERVE_RPCS:
        method = methods[name]
        request, response = (getattr(pb, t.name) for t in (method.input_type, method.output_type))
        handler = _guarded(getattr(servicer, name), request.DESCRIPTOR.name)
        if tracing is not None:
            handler = grpc_tracing.traced(handler, SERVICE, name, tracing)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=_lenient(request.FromString),
            response_serializer=response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class _Undecodable:
    """Stands for a request message that did not parse (see :func:`_lenient`)."""


_UNDECODABLE = _Undecodable()


def _lenient(parse: Any) -> Any:
    """A deserializer that hands the servicer :data:`_UNDECODABLE` instead of raising: grpc.aio
    answers a raising deserializer UNKNOWN ("Unexpected <class DecodeError>") and logs a
    traceback per call, for what is a client's mistake."""
    from google.protobuf.message import DecodeError

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


def _guarded(method: Any, message: str) -> Any:
    """``method``, answering an undecodable request INVALID_ARGUMENT."""

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is _UNDECODABLE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {message} message"
            )
        return await method(request, context)

    return handle


def access_log_enabled() -> bool:
    """BentoML's access-log switch (``api_server.logging.access.enabled``), which gRPC follows."""
    from bentoml._internal.container import BentoMLContainer

    return bool(BentoMLContainer.api_server_config.logging.access.enabled.get())


def address(settings: Settings) -> str:
    """``host:port`` to bind, with brackets around an IPv6 host."""
    host = settings.grpc_host
    return f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"


async def serve(
    registry: Registry, settings: Settings, *, keys: Keyring | None = None
) -> grpc.aio.Server:
    """Start the gRPC server on the running event loop; raises RuntimeError if it cannot bind.

    A port held by a process without ``SO_REUSEPORT`` fails the bind (and so the worker's
    start-up); note that another servery of the same user on the port would share it silently.
    """
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1)],
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    servicer = InferenceServicer(
        registry, settings.max_rows_per_request, access_log=access_log_enabled(), keys=keys
    )
    # servery's spans: ModelInfer calls may start a trace (the router is the entry service)
    server.add_generic_rpc_handlers((rpc_handler(servicer, otel.active(roots=True)),))
    # grpc.health.v1 (Kubernetes' gRPC probe) and reflection (grpcurl) beside the OIP service
    grpc_health.add_to(server, registry, SERVICE, keys=keys, metadata=metadata, abort=abort)
    try:
        server.add_insecure_port(address(settings))
    except RuntimeError as e:
        raise RuntimeError(
            f"cannot bind the OIP gRPC server to {address(settings)} (port in use?): set "
            "SERVERY_GRPC_PORT to a free port, or SERVERY_GRPC_ENABLED=false"
        ) from e
    await server.start()
    logger.info("OIP V2 gRPC server listening on %s", address(settings))
    return server

"""OpenTelemetry spans for the OIP gRPC calls (services/ops/tracing.py decides which).

A ``SERVER`` span per traced call: a ``ModelInfer`` call the ``OTEL_*`` sampler picks, or any call
whose ``traceparent`` metadata carries a trace (``parentbased_*`` samplers follow its sampled
flag). The span is named ``inference.GRPCInferenceService/<RPC>`` with OpenTelemetry's RPC
attributes, the model asked for and the call's request id (its ``x-request-id`` metadata, else a
new one), which is also put on the call's log lines. With tracing off the handlers are not wrapped
at all; with it on, an untraced call pays a look at its metadata and one random draw.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.ops import logs
from services.ops import tracing as otel

SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""The codes a server span counts as errors (OpenTelemetry's RPC conventions); the others are the
client's doing."""


def traced(method: Any, service: str, rpc: str, tracing: otel.Tracing) -> Any:
    """``method`` (a grpc.aio unary handler) in a span when the call is traced; only
    ``ModelInfer`` (a prediction) may start a trace, the other RPCs only join a caller's."""
    root = rpc == "ModelInfer"

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        md = context.invocation_metadata() or ()
        span = tracing.rpc_span(service, rpc, md, root=root)
        if span is None:
            return await method(request, context)
        from opentelemetry.trace import Status, StatusCode, use_span

        rid = otel.request_id_of(next((v for k, v in md if k == logs.HEADER), None))
        logs.REQUEST_ID.set(rid)  # this call's own task
        span.set_attribute(otel.REQUEST_ID_ATTRIBUTE, rid)
        model = getattr(request, "model_name", None) or getattr(request, "name", None)
        if isinstance(model, str) and model:
            span.set_attribute("servery.model", model[:128])
        # an abort is an exception here; whether it is an error is the status code's to say
        with use_span(
            span, end_on_exit=True, record_exception=False, set_status_on_exception=False
        ):
            try:
                return await method(request, context)
            finally:
                code = status_code(context)
                if span.is_recording():
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code in SERVER_ERRORS:
                        span.set_status(Status(StatusCode.ERROR))

    return handle


def status_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status the call ends with so far (OK unless it was aborted or set)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    for known in grpc.StatusCode:
        if known.value[0] == code:
            return known
    return grpc.StatusCode.OK

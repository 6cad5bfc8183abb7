"""OpenTelemetry configured the standard way (services/ops/tracing.py, issue 24 item 3).

The session's server (tests/integration/conftest.py) runs with ``OTEL_EXPORTER_OTLP_ENDPOINT``
set to a real OTLP/HTTP receiver and ``OTEL_TRACES_SAMPLER=parentbased_always_off`` (nothing in
BentoML's configuration): spans for REST on the fast path, OIP REST and gRPC join each caller's
sampled ``traceparent`` and carry its request id, the framework service of a service-placed
model joins the same trace, and log lines name it. ``/v1``: the router's fast path and LLM proxy
in-process (the same classes, the variables read by ``tracing.configure``) in front of an
upstream that records the ``traceparent`` it was sent, exporting to the same kind of receiver.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from bench.harness.server import Server, free_port
from services.gateway.fastpath import FastPath
from services.llm.proxy import StreamingProxy
from services.ops import tracing
from tests.conftest import eventually
from tests.integration.conftest import Background, OtlpCollector

PARENT_SPAN = "b7ad6b7169203331"
TRACES = {
    "rest": "0af7651916cd43dd8448eb211c80319c",
    "svc": "1af7651916cd43dd8448eb211c80319c",
    "oip": "2af7651916cd43dd8448eb211c80319c",
    "grpc": "3af7651916cd43dd8448eb211c80319c",
}
V1_TRACE = "4af7651916cd43dd8448eb211c80319c"
ROW = [5.1, 3.5, 1.4, 0.2]


def traceparent(trace_id: str, flags: str = "01") -> str:
    return f"00-{trace_id}-{PARENT_SPAN}-{flags}"


@pytest.fixture(scope="module")
def sent(server: Server) -> dict[str, str]:
    """One traced request of each kind, each in a trace of its own: kind -> request id."""
    srv = server
    ids = {kind: f"otel-{kind}" for kind in TRACES}

    def headers(kind: str) -> dict[str, str]:
        return {"traceparent": traceparent(TRACES[kind]), "x-request-id": ids[kind]}

    for kind, model in (("rest", "iris"), ("svc", "iris-svc")):
        body = {"model": model, "inputs": [ROW]}
        r = httpx.post(f"{srv.url}/predict", json=body, headers=headers(kind), timeout=30)
        assert r.status_code == 200, r.text
    oip = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": ROW}]}
    r = httpx.post(f"{srv.url}/v2/models/iris/infer", json=oip, headers=headers("oip"), timeout=30)
    assert r.status_code == 200, r.text
    tensor = pb.ModelInferRequest.InferInputTensor(name="input-0", datatype="FP64", shape=[1, 4])
    request = pb.ModelInferRequest(model_name="iris", inputs=[tensor])
    request.raw_input_contents.append(np.asarray(ROW, dtype="<f8").tobytes())
    with grpc.insecure_channel(srv.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(request, timeout=30, metadata=list(headers("grpc").items()))
    return ids


def test_spans_of_each_front_end_join_the_callers_trace(
    otlp_collector: OtlpCollector, sent: dict[str, str]
) -> None:
    want = {
        "rest": "POST /predict",
        "svc": "POST /predict",
        "oip": "POST /v2/models/infer",
        "grpc": "inference.GRPCInferenceService/ModelInfer",
    }

    def roots() -> dict[str, dict[str, Any]]:
        found = {}
        for s in otlp_collector.details():
            for kind, trace_id in TRACES.items():
                if s["trace"] == trace_id and s["parent"] == PARENT_SPAN:
                    found[kind] = s
        return found if set(found) == set(TRACES) else {}

    found = eventually(roots, "a span in each caller's trace", every=0.3)
    for kind, span in found.items():
        assert span["name"] == want[kind], span
        assert span["kind"] == 2, span  # SERVER
        assert span["service"] == "router", span
        assert span["attrs"]["servery.request_id"] == sent[kind], span
    assert found["rest"]["attrs"]["http.response.status_code"] == 200
    assert found["rest"]["attrs"]["servery.model"] == "iris"
    assert found["grpc"]["attrs"]["rpc.grpc.status_code"] == 0
    assert found["grpc"]["attrs"]["servery.model"] == "iris"


def test_the_framework_service_joins_the_trace(
    otlp_collector: OtlpCollector, sent: dict[str, str]
) -> None:
    def services() -> set[str]:
        found = {s["service"] for s in otlp_collector.details() if s["trace"] == TRACES["svc"]}
        return found if len(found) >= 2 else set()

    assert "sklearn" in eventually(services, "the sklearn service's span", every=0.3)


def test_log_lines_name_the_trace(server: Server, sent: dict[str, str]) -> None:
    def access_line() -> list[str]:
        return [
            ln
            for ln in server.log.read_text().splitlines()
            if "path=/predict" in ln and f"trace={TRACES['rest']}" in ln
        ]

    # BentoML's text format ends a traced line with "(trace=...,span=...,sampled=1,...)"
    eventually(access_line, "the access line of the traced request", every=0.2)


def test_an_unsampled_caller_makes_no_span(server: Server, otlp_collector: OtlpCollector) -> None:
    unsampled = "5af7651916cd43dd8448eb211c80319c"
    marker = "6af7651916cd43dd8448eb211c80319c"
    body = {"model": "iris", "inputs": [ROW]}
    # one connection, so one worker: its spans are exported in the order they ended
    with httpx.Client(timeout=30) as client:
        for trace_id, flags in ((unsampled, "00"), (marker, "01")):
            headers = {"traceparent": traceparent(trace_id, flags)}
            r = client.post(f"{server.url}/predict", json=body, headers=headers)
            assert r.status_code == 200

    def traces() -> set[str]:
        return {s["trace"] for s in otlp_collector.details()}

    eventually(lambda: marker in traces(), "the sampled request's span", every=0.3)
    assert unsampled not in traces()


@pytest.fixture
def v1_front(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, OtlpCollector, list]]:
    """The fast path with the LLM proxy mounted at /v1/, tracing from the OTEL_* variables, in
    front of an upstream that records each request's traceparent: (url, receiver, received)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    collector = OtlpCollector()
    received: list[str | None] = []

    async def chat(request: Request) -> JSONResponse:
        received.append(request.headers.get("traceparent"))
        return JSONResponse({"object": "chat.completion", "choices": []})

    upstream_port = free_port()
    upstream = Background(
        Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
        host="127.0.0.1",
        port=upstream_port,
    )
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{collector.port}/v1/traces"
    )
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-in-process")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setattr(tracing, "_CONFIG", [None])
    assert tracing.configure()
    proxy = StreamingProxy(lambda: f"http://127.0.0.1:{upstream_port}", connect_timeout_s=5)

    async def elsewhere(scope: dict, receive: Any, send: Any) -> None:
        raise AssertionError("not a /v1 request")

    front = FastPath(
        elsewhere,
        None,
        [],
        timeout_s=30,
        access_log=False,
        mounts=[("/v1/", proxy)],
        tracing=tracing.active(roots=True),
    )
    port = free_port()
    server = Background(front, host="127.0.0.1", port=port)
    try:
        yield f"http://127.0.0.1:{port}", collector, received
    finally:
        server.stop()
        upstream.stop()
        collector.server.stop()
        BentoMLContainer.tracer_provider.reset()


def test_v1_requests_get_spans_and_pass_the_trace_on(v1_front) -> None:
    url, collector, received = v1_front
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"traceparent": traceparent(V1_TRACE), "x-request-id": "otel-v1"}
    r = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers, timeout=30)
    assert r.status_code == 200, r.text

    def both() -> list[dict[str, Any]]:
        mine = [s for s in collector.details() if s["trace"] == V1_TRACE]
        return mine if len(mine) == 2 else []

    spans = {s["kind"]: s for s in eventually(both, "the /v1 spans", every=0.2)}
    server, client = spans[2], spans[3]  # SERVER, CLIENT
    assert server["name"] == "POST /v1/" and server["parent"] == PARENT_SPAN
    assert client["name"] == "POST /v1/chat/completions" and client["parent"] == server["span"]
    for span in (server, client):
        assert span["attrs"]["servery.request_id"] == "otel-v1"
        assert span["attrs"]["http.response.status_code"] == 200
        assert span["service"] == "router-in-process"  # OTEL_SERVICE_NAME
    # the upstream (the LLM service) was sent the trace, with the proxy's span as parent
    assert received == [f"00-{V1_TRACE}-{client['span']}-01"]

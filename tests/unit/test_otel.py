"""services/ops/tracing.py: which OTEL_* settings turn tracing on, the exporter picked, the fast
path's own root decision against the SDK's, a caller's traceparent, and log lines under a span."""

from __future__ import annotations

import logging
import random

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.ops import logs, tracing

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SAMPLED = f"00-{TRACE_ID}-b7ad6b7169203331-01".encode()
UNSAMPLED = f"00-{TRACE_ID}-b7ad6b7169203331-00".encode()


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
    ],
)
def test_which_variables_turn_tracing_on(env: dict[str, str], names: list[str]) -> None:
    assert tracing.exporter_names(env) == names


def test_the_exporter_follows_the_otlp_protocol() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    assert tracing.exporter_class("otlp", {}) is Http  # the specification's default
    assert tracing.exporter_class("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) is Grpc
    traces_only = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"} | {
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"
    }
    assert tracing.exporter_class("otlp", traces_only) is Http
    with pytest.raises(tracing.TracingConfigError, match="http/json"):
        tracing.exporter_class("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(tracing.TracingConfigError, match="zipkin-typo"):
        tracing.exporter_class("zipkin-typo", {})


@pytest.mark.parametrize(
    ("name", "arg", "bound"),
    [
        ("always_on", None, tracing.ROOT_BOUND_ALL),
        ("parentbased_always_on", None, tracing.ROOT_BOUND_ALL),
        ("always_off", None, 0),
        ("parentbased_always_off", None, 0),
        ("traceidratio", "0.25", 1 << 62),
        ("parentbased_traceidratio", "0.25", 1 << 62),
    ],
)
def test_root_decision_of_each_sampler_the_sdk_reads(
    monkeypatch: pytest.MonkeyPatch, name: str, arg: str | None, bound: int
) -> None:
    # ParentBasedTraceIdRatio's root sampler is private (_root): this fails if the SDK moves it
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    if arg is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    assert tracing.root_bound(TracerProvider().sampler) == bound


def _tracing(sampler: sampling.Sampler, *, roots: bool = True):
    ids = tracing._PresampledIds()
    provider = TracerProvider(sampler=sampler, id_generator=ids)
    exported = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return tracing.Tracing(provider.get_tracer("t"), sampler, ids, roots=roots), exported


def _predict(t: tracing.Tracing, *headers: tuple[bytes, bytes]):
    span = t.server_span("POST", "/predict", [(b"host", b"x"), *headers], "rid-1")
    if span is not None:
        t.finish(span, 200, ("iris", "v1"))
        span.end()
    return span


def test_a_ratio_sampler_picks_its_fraction_and_the_sdk_agrees() -> None:
    random.seed(7)
    t, exported = _tracing(sampling.ParentBasedTraceIdRatio(0.25))
    spans = [_predict(t) for _ in range(4000)]
    picked = [s for s in spans if s is not None]
    assert 800 < len(picked) < 1200  # 1000 expected; seeded, so the same every run
    # every request picked here is one the SDK's sampler records (the drawn trace id was used)
    assert all(s.get_span_context().trace_flags.sampled for s in picked)
    assert len(exported.get_finished_spans()) == len(picked)
    bound = sampling.TraceIdRatioBased(0.25).bound
    for s in exported.get_finished_spans():
        assert s.context.trace_id & ((1 << 64) - 1) < bound
        assert s.attributes["servery.request_id"] == "rid-1"
        assert s.attributes["http.response.status_code"] == 200
        assert s.attributes["servery.model"] == "iris"
        assert s.kind is trace.SpanKind.SERVER and s.name == "POST /predict"


def test_unsampled_requests_make_no_span_and_a_callers_trace_is_honoured() -> None:
    t, exported = _tracing(sampling.DEFAULT_OFF)
    assert all(_predict(t) is None for _ in range(100))
    assert not exported.get_finished_spans()
    joined = _predict(t, (b"traceparent", SAMPLED))
    assert joined is not None
    (span,) = exported.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    # a caller's unsampled trace: no span recorded, but its context is carried on
    carried = _predict(t, (b"traceparent", UNSAMPLED))
    assert carried is not None and not carried.is_recording()
    assert len(exported.get_finished_spans()) == 1


def test_a_service_that_is_not_the_entry_only_joins_traces() -> None:
    t, exported = _tracing(sampling.ALWAYS_ON, roots=False)
    assert _predict(t) is None
    assert _predict(t, (b"baggage", b"k=v")) is None
    assert _predict(t, (b"traceparent", SAMPLED)) is not None
    assert len(exported.get_finished_spans()) == 1


def test_grpc_calls_only_start_a_trace_when_allowed() -> None:
    t, exported = _tracing(sampling.DEFAULT_ON)
    assert t.rpc_span("svc", "ModelMetadata", [("user-agent", "x")], root=False) is None
    infer = t.rpc_span("svc", "ModelInfer", [], root=True)
    joined = t.rpc_span("svc", "ModelMetadata", [("traceparent", SAMPLED.decode())], root=False)
    for span in (infer, joined):
        span.end()
    names = sorted(s.name for s in exported.get_finished_spans())
    assert names == ["svc/ModelInfer", "svc/ModelMetadata"]


def test_the_fast_access_line_steps_aside_for_a_span(caplog: pytest.LogCaptureFixture) -> None:
    t, _ = _tracing(sampling.DEFAULT_ON)
    assert not logs._tracing()
    span = t.server_span("POST", "/predict", [], "rid-3")
    with trace.use_span(span, end_on_exit=True):
        assert logs._tracing()  # access_line then returns False: logging adds the trace suffix
        assert logs._trace_ids() == (
            format(span.get_span_context().trace_id, "032x"),
            format(span.get_span_context().span_id, "016x"),
        )
        assert logs.access_line("%s", ("x",)) is False
    assert not logs._tracing()
    logging.getLogger("servery").debug("nothing traced")


def test_outgoing_requests_carry_the_trace_under_a_client_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers = [("traceparent", SAMPLED.decode()), ("content-type", "application/json")]
    assert tracing.outgoing(headers, "POST", "/v1/chat/completions") == (headers, None)
    config = tracing._Config([], trace_predictions=False)
    monkeypatch.setattr(tracing, "_CONFIG", [config])
    exported = InMemorySpanExporter()
    provider = config.pipeline()[0]
    provider.add_span_processor(SimpleSpanProcessor(exported))
    t = tracing.active(roots=True)
    assert t is not None
    server = t.server_span("POST", "/v1/", [(b"traceparent", SAMPLED)], "rid-2")
    token = logs.REQUEST_ID.set("rid-2")  # as the fast path sets it
    with trace.use_span(server, end_on_exit=True):
        out, span = tracing.outgoing(headers, "POST", "/v1/chat/completions")
        tracing.end(span, 200)
    logs.REQUEST_ID.reset(token)
    assert [k for k, _ in out].count("traceparent") == 1
    sent = dict(out)["traceparent"]
    assert sent.startswith(f"00-{TRACE_ID}-") and sent != SAMPLED.decode()
    client, ended = exported.get_finished_spans()
    assert ended.name == "POST /v1/" and client.parent.span_id == ended.context.span_id
    assert client.attributes["servery.request_id"] == "rid-2"
    assert client.kind is trace.SpanKind.CLIENT and client.name == "POST /v1/chat/completions"
    assert sent.split("-")[2] == format(client.context.span_id, "016x")

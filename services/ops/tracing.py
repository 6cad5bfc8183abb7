"""OpenTelemetry tracing configured the standard way: the ``OTEL_*`` environment variables.

When they ask for export (:func:`exporter_names`: ``OTEL_TRACES_EXPORTER``, or else an OTLP
endpoint in ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``; never with
``OTEL_SDK_DISABLED=true``), every servery process builds one OpenTelemetry SDK pipeline from
them, with the SDK's own environment handling: the sampler (``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG``, read by ``TracerProvider``), the resource (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``), the exporter's endpoint, headers, timeout, compression and
certificates (read by the OTLP exporters), the batch processor's delays and sizes
(``OTEL_BSP_*``) and the propagators (``OTEL_PROPAGATORS``, W3C ``traceparent`` by default).
This module only picks the exporter class the way the SDK's auto-configuration does
(``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``, but defaulting to
``http/protobuf`` as the specification says) and sets the resource's defaults as BentoML does
(``service.name`` = the BentoML service, ``router``, ``sklearn``, ``llm``...; the variables win).

Who makes spans:

* servery's own spans (:class:`Tracing`): a ``SERVER`` span per sampled request on the router's
  fast path (``/predict``, OIP REST, ``/v1``; services/gateway/fastpath.py) and per sampled gRPC
  call (services/protocols/oip/grpc.py), and a ``CLIENT`` span for the LLM proxy's upstream call
  (services/llm/proxy.py), which passes the trace on to the LLM service. Each carries the request
  id (``servery.request_id``). The sampler decides which prediction requests start a trace; a
  caller's ``traceparent`` is honoured as the sampler says (``parentbased_*``: its sampled flag).
  Only the entry service starts traces (``roots``); the LLM service's spans only join one.
* BentoML's own middleware (every other route, and the framework services that service-placed
  models call, which receive the trace through BentoML's client): its tracer provider is
  replaced by one on the same pipeline whose sampler only joins sampled traces
  (``parentbased_always_off``), so health probes and metrics scrapes never start one. With
  ``SERVERY_TRACE_PREDICTIONS=true`` (the fast path off) it uses the configured sampler instead.
  These variables take precedence over a ``tracing`` block in BentoML's configuration.

Cost. With tracing off the fast path pays one ``is None`` check per request. With it on, a request
that is not sampled pays a scan of its header names for the propagators' fields and, when it
carries none, one random draw compared with the sampler's bound (:meth:`Tracing.server_span`):
for the SDK's own samplers the root decision is taken here, before the SDK is called, with the
same rule as ``TraceIdRatioBased`` (the trace id's low 64 bits below the bound), and the trace id
it drew is handed to the SDK (:class:`_PresampledIds`) so that the SDK's decision, and every
downstream ratio sampler's, agrees. The SDK's own ``start_span`` costs about 4 us for a request it
then drops (``python -m bench.studies.tracing_cost``, which compares both); a sampler
from elsewhere is asked through the SDK for every request.

Nothing here reads the environment per request: :func:`configure` (at wiring) reads it once.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from services.ops import logs

logger = logging.getLogger("servery")

ROOT_BOUND_ALL = 1 << 64
"""A root bound meaning "every root": above any 64-bit value."""

REQUEST_ID_ATTRIBUTE = "servery.request_id"


class TracingConfigError(ValueError):
    """The ``OTEL_*`` variables name something this process cannot export with."""


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The trace exporters the variables ask for (``otlp``, ``console`` or an entry point name of
    ``opentelemetry_traces_exporter``); empty when tracing is off. ``OTEL_TRACES_EXPORTER``
    decides when set (``none``: off); unset, an OTLP endpoint variable means ``otlp`` (the
    specification's default exporter, which would otherwise send to localhost:4318 uninvited)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [n.strip() for n in named.split(",") if n.strip()]
    return [] if "none" in names else names


def exporter_class(name: str, environ: Mapping[str, str]) -> type:
    """The span exporter class for one name of :func:`exporter_names`."""
    if name == "otlp":
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        elif protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[no-redef]
                OTLPSpanExporter,
            )
        else:
            raise TracingConfigError(
                f"OTLP protocol {protocol!r} is not supported: set OTEL_EXPORTER_OTLP_PROTOCOL "
                "to http/protobuf (the default) or grpc"
            )
        return OTLPSpanExporter
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter
    found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER names {name!r}, which no installed package provides "
            "(otlp, console and none are always there)"
        )
    return next(iter(found)).load()


class _Config:
    """What :func:`configure` read from the environment; the SDK objects are built on first use
    (:meth:`pipeline`), once BentoML has said which service this process is."""

    def __init__(self, exporters: list[type], trace_predictions: bool) -> None:
        self.exporters = exporters
        self.trace_predictions = trace_predictions
        self._built: tuple[Any, Any, _PresampledIds] | None = None

    def pipeline(self) -> tuple[Any, Any, _PresampledIds]:
        """``(servery's provider, BentoML's provider, servery's id generator)``, built once."""
        if self._built is None:
            self._built = self._build()
        return self._built

    def _build(self) -> tuple[Any, Any, _PresampledIds]:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import DEFAULT_OFF

        resource = _resource()
        ids = _PresampledIds()
        # sampler=None: the SDK reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG itself
        ours = TracerProvider(resource=resource, id_generator=ids)
        theirs = TracerProvider(
            sampler=ours.sampler if self.trace_predictions else DEFAULT_OFF,
            resource=resource,
            shutdown_on_exit=False,  # one shutdown (ours) flushes the shared processors
        )
        for cls in self.exporters:
            processor = BatchSpanProcessor(cls())  # the exporter reads its OTEL_EXPORTER_* itself
            ours.add_span_processor(processor)
            theirs.add_span_processor(processor)
        return ours, theirs, ids


_CONFIG: list[_Config | None] = [None]


def configure(*, trace_predictions: bool = False) -> bool:
    """Read the ``OTEL_*`` variables (once per process, at wiring); True when they turn tracing
    on. Then BentoML's own spans use the same pipeline (its tracer provider is replaced; the
    SDK objects are built when BentoML first asks). Raises :class:`TracingConfigError` for an
    exporter or protocol that cannot be served, so a typo fails the start, not every export."""
    environ = os.environ
    names = exporter_names(environ)
    if not names:
        _CONFIG[0] = None
        return False
    config = _Config([exporter_class(n, environ) for n in names], trace_predictions)
    _CONFIG[0] = config
    from bentoml._internal.configuration.containers import BentoMLContainer

    BentoMLContainer.tracer_provider.set(_BentoMLProvider(config))
    return True


def active(*, roots: bool) -> Tracing | None:
    """servery's spans in this process (None when tracing is off). ``roots``: whether requests
    without a sampled caller may start a trace (the entry service), else spans only join one."""
    config = _CONFIG[0]
    if config is None:
        return None
    provider, _, ids = config.pipeline()
    return Tracing(provider.get_tracer("servery"), provider.sampler, ids, roots=roots)


def _resource() -> Any:
    """BentoML's resource for this process (its service, worker, Bento), under what the
    ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` variables say (as BentoML merges them)."""
    from bentoml._internal.context import server_context, trace_context
    from opentelemetry.sdk.resources import (
        SERVICE_INSTANCE_ID,
        SERVICE_NAME,
        SERVICE_NAMESPACE,
        SERVICE_VERSION,
        OTELResourceDetector,
        Resource,
    )

    attributes: dict[str, Any] = {}
    if server_context.service_name:
        attributes[SERVICE_NAME] = server_context.service_name
    if server_context.worker_index:
        attributes[SERVICE_INSTANCE_ID] = server_context.worker_index
    if server_context.bento_name:
        attributes[SERVICE_NAMESPACE] = server_context.bento_name
    if server_context.bento_version:
        attributes[SERVICE_VERSION] = server_context.bento_version
    resource = Resource.create(attributes).merge(OTELResourceDetector().detect())
    # BentoML's text log lines name the service in their trace suffix
    trace_context.service_name = resource.attributes.get(SERVICE_NAME)
    return resource


class _BentoMLProvider:
    """What BentoML's ``tracer_provider`` gives its middleware (which only calls ``get_tracer``):
    the pipeline's provider for BentoML's spans, built at the first ``get_tracer`` (BentoML's
    middleware asks when the app is built, after the worker knows its service)."""

    def __init__(self, config: _Config) -> None:
        self._config = config

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        return self._config.pipeline()[1].get_tracer(*args, **kwargs)


class _PresampledIds:
    """The SDK's random ids (its ``RandomIdGenerator``'s rule), except the next trace id when
    :meth:`Tracing.server_span` drew it already. That one is taken by the provider's next
    ``start_span``, on the same thread: servery starts its spans on the event loop, and a span
    started in between by another thread would just get that id, a random one too."""

    next_trace_id = 0

    def generate_span_id(self) -> int:
        span_id = random.getrandbits(64)
        while span_id == 0:
            span_id = random.getrandbits(64)
        return span_id

    def generate_trace_id(self) -> int:
        trace_id = self.next_trace_id
        if trace_id:
            self.next_trace_id = 0
            return trace_id
        trace_id = random.getrandbits(128)
        while trace_id == 0:
            trace_id = random.getrandbits(128)
        return trace_id

    def is_trace_id_random(self) -> bool:
        return True


def root_bound(sampler: Any) -> int | None:
    """The decision ``sampler`` takes for a request without a parent, as a bound on the trace
    id's low 64 bits (sampled iff below it; :data:`ROOT_BOUND_ALL`: every one, 0: none); None
    for a sampler whose rule is not known here (it is then asked for every request)."""
    from opentelemetry.sdk.trace import sampling

    if sampler is sampling.ALWAYS_ON or sampler is sampling.DEFAULT_ON:
        return ROOT_BOUND_ALL
    if sampler is sampling.ALWAYS_OFF or sampler is sampling.DEFAULT_OFF:
        return 0
    root = sampler
    if type(sampler) in (sampling.ParentBased, sampling.ParentBasedTraceIdRatio):
        # ParentBased keeps its root sampler private; pinned by tests/unit/test_otel.py
        root = getattr(sampler, "_root", None)
    if type(root) is sampling.TraceIdRatioBased:
        return int(root.bound)
    if root is sampling.ALWAYS_ON:
        return ROOT_BOUND_ALL
    if root is sampling.ALWAYS_OFF:
        return 0
    return None


class Tracing:
    """servery's spans in one process: ``tracer`` (the pipeline's), the sampler it was built
    with, the provider's id generator, and whether requests may start a trace here."""

    def __init__(self, tracer: Any, sampler: Any, ids: _PresampledIds, *, roots: bool) -> None:
        from opentelemetry import propagate

        self.tracer = tracer
        self.roots = roots
        self.bound = root_bound(sampler)
        self._ids = ids
        self._fields = frozenset(propagate.get_global_textmap().fields)
        self._field_bytes = frozenset(f.encode() for f in self._fields)

    def server_span(
        self, method: str, route: str, headers: Sequence[tuple[bytes, bytes]], rid: str
    ) -> Any:
        """A ``SERVER`` span for an HTTP request (raw ASGI ``headers``), or None when the request
        is not traced. Call :meth:`finish` before it ends. A span that does not record (the
        caller's trace, not sampled) is returned too: it carries the trace on downstream."""
        fields = self._field_bytes
        for name, _ in headers:
            if name in fields:
                carrier = {
                    k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in fields
                }
                return self._start(f"{method} {route}", carrier, self._http(method, route, rid))
        if not self._root():
            return None
        return self._start(f"{method} {route}", None, self._http(method, route, rid))

    async def http(
        self,
        scope: dict[str, Any],
        route: str,
        rid: str,
        send: Any,
        serve: Callable[[Any], Awaitable[None]],
    ) -> None:
        """``serve(send)`` (an ASGI request's handling) in a ``SERVER`` span when the request is
        traced, made current so that its log lines, its access line and the calls it makes
        downstream (framework services, the LLM proxy) belong to it; else just ``serve(send)``."""
        span = self.server_span(scope["method"], route, scope["headers"], rid)
        if span is None:
            return await serve(send)
        from opentelemetry.trace import use_span

        status = [0]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        with use_span(span, end_on_exit=True):
            try:
                await serve(send_status)
            finally:
                self.finish(span, status[0], scope.get(logs.MODEL_KEY))

    def rpc_span(
        self, service: str, method: str, metadata: Iterable[tuple[str, Any]], *, root: bool = True
    ) -> Any:
        """A ``SERVER`` span for a gRPC call (its invocation ``metadata``), or None; ``root``:
        whether this call may start a trace (else it only joins the caller's)."""
        fields = self._fields
        carrier = {k: v for k, v in metadata if k in fields and isinstance(v, str)}
        if not carrier and (not root or not self._root()):
            return None
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        return self._start(f"{service}/{method}", carrier or None, attributes)

    def _root(self) -> bool:
        """Whether a request without a caller's trace starts one (drawing its trace id)."""
        if not self.roots:
            return False
        bound = self.bound
        if bound is None:
            return True  # the SDK's sampler decides
        if bound == ROOT_BOUND_ALL:
            return True
        low = random.getrandbits(64)
        if low >= bound:
            return False
        self._ids.next_trace_id = (random.getrandbits(64) << 64) | low
        return True

    def _start(self, name: str, carrier: dict[str, str] | None, attributes: dict[str, Any]) -> Any:
        from opentelemetry import propagate, trace

        context = None
        if carrier is not None:
            context = propagate.extract(carrier)
            if not self.roots and not trace.get_current_span(context).get_span_context().is_valid:
                return None  # baggage only, no trace to join
        span = self.tracer.start_span(
            name, context=context, kind=trace.SpanKind.SERVER, attributes=attributes
        )
        if not span.is_recording() and (carrier is None or not span.get_span_context().is_valid):
            return None  # a root the SDK's sampler dropped, or no trace to carry on
        return span

    @staticmethod
    def _http(method: str, route: str, rid: str) -> dict[str, Any]:
        return {"http.request.method": method, "http.route": route, REQUEST_ID_ATTRIBUTE: rid}

    @staticmethod
    def finish(span: Any, status: int, served: tuple[str, str] | None = None) -> None:
        """Put the answer on an HTTP span: its status (an error from 500 on) and the model and
        version that answered, if known."""
        if not span.is_recording():
            return
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("http.response.status_code", status)
        if served is not None:
            span.set_attribute("servery.model", served[0])
            span.set_attribute("servery.model_version", served[1])
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))


def outgoing(headers: list[tuple[str, str]], method: str, path: str) -> Any:
    """For a request servery makes on a traced request's behalf (the LLM proxy's): ``(headers,
    span)``, with a ``CLIENT`` span ``"{method} {path}"`` under the current one when it records,
    and the headers' propagation fields (``traceparent``...) replaced by the current trace's; the
    headers unchanged and no span when tracing is off or the request carries no trace. End the
    span with :func:`end`."""
    config = _CONFIG[0]
    if config is None:
        return headers, None
    from opentelemetry import propagate, trace

    current = trace.get_current_span()
    if not current.get_span_context().is_valid:
        return headers, None
    span = context = None
    if current.is_recording():
        attributes = {
            "http.request.method": method,
            "url.path": path,
            REQUEST_ID_ATTRIBUTE: logs.REQUEST_ID.get() or "",
        }
        tracer = config.pipeline()[0].get_tracer("servery")
        span = tracer.start_span(
            f"{method} {path}", kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        context = trace.set_span_in_context(span)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    fields = {k.lower() for k in propagate.get_global_textmap().fields}
    kept = [(k, v) for k, v in headers if k.lower() not in fields]
    return [*kept, *carrier.items()], span


def end(span: Any, status: int) -> None:
    """End a span of :func:`outgoing` with the status the service answered (or 499/503/504)."""
    Tracing.finish(span, status)
    span.end()


def request_id_of(value: str | None) -> str:
    """A call's request id: the client's well-formed ``x-request-id`` value, else a new one."""
    if value is None:
        return logs.new_id()
    return logs.request_id([(logs.HEADER.encode(), value.encode("latin-1", "replace"))])

"""The router's fast path: prediction routes served without BentoML's per-request middleware.

On this project's 2-core machines BentoML's front end, not the model, bounds throughput: a py-spy
profile of the router at c=64 put the ``/predict`` handler and the model at about 11 % of the
CPU, and BentoML's middleware stack (request context, traffic metrics, OpenTelemetry, access log,
timeout, routing into the mounted app) at most of the rest (docs/internals/stack.md, "Where the
time goes").
BentoML offers no per-route way out of that stack (``add_asgi_middleware`` runs inside it), so
this module wraps the router's ASGI app as BentoML builds it: ``POST /predict`` and
``POST /v2/models/{name}[/versions/{version}]/infer`` go straight to the same FastAPI handler
functions, the OpenAI API under ``/v1/`` goes straight to the streaming proxy (``mounts``: BentoML's
middleware wraps every ``send``, so each streamed chunk paid for it), and everything else
(lifespan, health, metrics, docs, model listing, errors for other methods) goes through BentoML
untouched.

What the bypassed middleware did is kept where it matters, at a fraction of the cost: the handlers
count requests per model/version/status (``servery_requests_total``), this module records the
latency per route (``servery_request_duration_seconds``) and writes one access-log line per
request to BentoML's ``bentoml.access`` logger (when BentoML's access log is on), and a request
not answered within ``SERVERY_REQUEST_TIMEOUT_S`` is cancelled and answered 504. OpenTelemetry
spans are made here for the requests the ``OTEL_*`` variables' sampler picks (services/ops/
tracing.py: a ``SERVER`` span per sampled request, a caller's ``traceparent`` honoured, the
request id on it); with tracing off that costs one ``is None`` check per request, and with it on
an unsampled request one random draw. Not kept: BentoML's own ``bentoml_service_request_*``
series for these routes.

The same wrapper is the router's API-key gate (services/gateway/gate.py): with keys configured it
admits or
refuses every HTTP request before anything else runs, fast-path route or not, and it is installed
(with no routes) when the fast path is off, so both configurations check keys in one place.
On the router it also counts each key's LLM usage (services/llm/usage_tap.py) on every ``/v1``
request, mounted or not; ``GET /v1/usage`` is the router's own route (services/protocols/native.py),
never the mount's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from services.gateway.deadlines import Deadlines
from services.gateway.gate import HttpGate, check_body_size
from services.llm import usage_tap
from services.ops import logs, metrics
from services.ops.tracing import Tracing
from services.protocols.errors import refusal
from services.runtime.errors import Overloaded, RequestTimeout, ServeryError

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
# A route handler: the parsed request and the path's match -> the response (never raises).
Handler = Callable[[Request, "re.Match[str]"], Awaitable[Response]]
# Maps an error (timeout, overload) to the route's own error envelope.
OnError = Callable[[ServeryError], Response]


class InFlightFull(Overloaded):
    """The router worker has ``SERVERY_MAX_IN_FLIGHT`` prediction requests unanswered: 503 with
    ``Retry-After`` before the body is parsed. Not logged per request (it would add to the load)."""

    logged = False


class Route:
    """One fast-path route: a POST path pattern, its handler and its timeout answer."""

    def __init__(self, name: str, pattern: str, handler: Handler, on_error: OnError) -> None:
        self.name = name
        self.pattern = re.compile(pattern)
        self.handler = handler
        self.on_error = on_error
        self.seconds = metrics.REQUEST_SECONDS.labels(name)


class FastPath:
    """ASGI wrapper: POSTs matching ``routes`` and HTTP requests under a ``mounts`` prefix skip
    ``app``'s middleware; the rest pass through.

    ``api`` is the FastAPI app whose handlers serve the routes (``request.app`` in them). A mounted
    ASGI app bounds its own time (the LLM proxy: ``SERVERY_REQUEST_TIMEOUT_S`` without a byte from
    upstream) and is not wrapped in a timeout: a stream may last longer than any one request.
    Every HTTP request first has its body size checked against ``max_body_bytes`` (413), then
    meets ``gate`` (API keys); refusals are access-logged here. ``tracing``: servery's spans
    (services/ops/tracing.py) for admitted route and mount requests; None when tracing is off.
    """

    def __init__(
        self,
        app: ASGIApp,
        api: Any,
        routes: list[Route],
        *,
        timeout_s: float,
        access_log: bool,
        mounts: list[tuple[str, ASGIApp]] | None = None,
        gate: HttpGate | None = None,
        max_body_bytes: int | None = None,
        max_in_flight: int = 0,
        max_bytes_in_flight: int = 0,
        count_usage: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self.app = app
        self.tracing = tracing
        self.count_usage = count_usage
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.max_bytes_in_flight = max_bytes_in_flight
        self.bytes_in_flight = 0
        self.shed = metrics.REQUESTS.labels(metrics.UNKNOWN_MODEL, "", "503")
        self.gate = gate
        self.max_body_bytes = max_body_bytes
        self.api = api
        self.routes = routes
        self.mounts = mounts or []
        self.timeout_s = timeout_s
        self.deadlines = Deadlines(timeout_s)
        self.access = logging.getLogger("bentoml.access") if access_log else None

    def _match(self, scope: dict[str, Any]) -> tuple[Route, re.Match[str]] | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path = scope["path"]
        for route in self.routes:
            match = route.pattern.match(path)
            if match is not None:
                return route, match
        return None

    def _mount(self, path: str) -> ASGIApp | None:
        if path == USAGE_PATH:
            return None  # the router's own route, not the LLM's
        for prefix, mounted in self.mounts:
            if path.startswith(prefix):
                return mounted
        return None

    def _body_bytes(self, scope: dict[str, Any]) -> int:
        """Bytes of body this request may bring, known before any is read: its
        ``Content-Length`` (at most the body limit: more is refused 413 unread), else, when a
        chunked body may follow, the body limit (what the size check may buffer)."""
        limit = self.max_body_bytes or self.max_bytes_in_flight
        chunked = False
        for name, value in scope["headers"]:  # one pass; ASGI servers send names lower-case
            if name == b"content-length":
                try:
                    return min(max(int(value), 0), limit)
                except ValueError:
                    return 0  # refused 400 by the size check, unread
            if name == b"transfer-encoding":
                chunked = True
        return limit if chunked else 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = logs.request_id(scope["headers"])
        logs.REQUEST_ID.set(rid)  # on every log line of this request (its own task)
        start = time.perf_counter()
        found = self._match(scope)
        mounted = self._mount(scope["path"]) if found is None and self.mounts else None
        # Admission comes first, before a byte of the body is read (and before the size check
        # and the gate, which may buffer it): requests in flight (prediction routes and the
        # OpenAI API) and body bytes in flight (every route) are bounded per worker.
        counted = found is not None or mounted is not None
        need = self._body_bytes(scope) if self.max_bytes_in_flight else 0
        if (counted and self.max_in_flight and self.in_flight >= self.max_in_flight) or (
            need and self.bytes_in_flight and self.bytes_in_flight + need > self.max_bytes_in_flight
        ):
            return await self._shed(scope, receive, send, rid, start)
        self.bytes_in_flight += need
        self.in_flight += counted
        try:
            if self.tracing is None or not counted:
                await self._admitted(scope, receive, send, rid, start, found, mounted)
            else:
                await self._traced(scope, receive, send, rid, start, found, mounted)
        finally:
            self.bytes_in_flight -= need
            self.in_flight -= counted

    async def _shed(
        self, scope: dict[str, Any], receive: Any, send: Any, rid: str, start: float
    ) -> None:
        """503 ``overloaded`` with ``Retry-After``, the body unread (drained, bounded)."""
        response = refusal(
            scope["path"],
            InFlightFull(
                f"overloaded: {self.in_flight} requests and {self.bytes_in_flight} body bytes "
                "in progress in this worker; retry shortly"
            ),
        )
        self.shed.inc()  # the model is not known before the body is read
        response.raw_headers.append((_RID_HEADER, rid.encode()))
        # Read (not parse) the body first: answering with it unread makes uvicorn close the
        # connection, which clients see as a reset instead of the 503.
        await _drain(receive, self.max_body_bytes or self.max_bytes_in_flight or 2**24)
        await response(scope, receive, send)
        if self.access is not None:
            self._log(scope, response.status_code, None, time.perf_counter() - start)

    async def _traced(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        rid: str,
        start: float,
        found: tuple[Route, re.Match[str]] | None,
        mounted: ASGIApp | None,
    ) -> None:
        """:meth:`_admitted` in a span when the request is traced (services/ops/tracing.py)."""
        if found is not None:
            route = found[0].name
        else:
            route = next((p for p, app in self.mounts if app is mounted), scope["path"])

        def admitted(send: Any) -> Awaitable[None]:
            return self._admitted(scope, receive, send, rid, start, found, mounted)

        await self.tracing.http(scope, route, rid, send, admitted)  # type: ignore[union-attr]

    async def _admitted(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        rid: str,
        start: float,
        found: tuple[Route, re.Match[str]] | None,
        mounted: ASGIApp | None,
    ) -> None:
        if self.max_body_bytes is not None or self.gate is not None:
            refused = None
            if self.max_body_bytes is not None:
                refused, receive = await check_body_size(scope, receive, self.max_body_bytes)
            if refused is None and self.gate is not None:
                refused, receive = await self.gate.admit(scope, receive)
            if refused is not None:
                refused.raw_headers.append((_RID_HEADER, rid.encode()))
                await refused(scope, receive, send)
                if self.access is not None:
                    self._log(scope, refused.status_code, None, time.perf_counter() - start)
                return None
        if found is None:
            send = _with_request_id(send, rid)
            if self.count_usage and scope["path"].startswith("/v1/"):
                return await self._counted(mounted or self.app, scope, receive, send)
            if mounted is not None:
                return await self._mounted(mounted, scope, receive, send)
            return await self.app(scope, receive, send)
        route, match = found
        start = time.perf_counter()
        scope["app"] = self.api  # what the FastAPI handlers read as request.app
        task, ended = self.deadlines.arm(), False
        try:
            response = await route.handler(Request(scope, receive), match)
        except asyncio.CancelledError:
            ended = True
            if not self.deadlines.end(task, cancelled=True):
                raise  # not (only) the timeout: the server is stopping
            response = route.on_error(
                RequestTimeout(f"request not answered within {self.timeout_s} s")
            )
        finally:
            if not ended:
                self.deadlines.end(task, cancelled=False)
        response.raw_headers.append((_RID_HEADER, rid.encode()))  # MutableHeaders scans first
        await response(scope, receive, send)
        elapsed = time.perf_counter() - start
        route.seconds.observe(elapsed)
        if self.access is not None:
            self._log(scope, response.status_code, response.headers.get("content-length"), elapsed)

    async def _counted(self, app: ASGIApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A ``/v1`` request with its key's LLM usage counted (services/llm/usage_tap.py)."""
        receive, send, done = await usage_tap.tap(scope, receive, send, self.max_body_bytes)
        try:
            if app is self.app:
                return await app(scope, receive, send)
            return await self._mounted(app, scope, receive, send)
        finally:
            if done is not None:
                done()

    async def _mounted(self, app: ASGIApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.access is None:
            return await app(scope, receive, send)
        start = time.perf_counter()
        status = [0]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            self._log(scope, status[0], None, time.perf_counter() - start)

    def _log(self, scope: dict[str, Any], status: int, length: str | None, seconds: float) -> None:
        """One line in BentoML's access-log format on ``bentoml.access``; its fields also go to
        the record (``logs.ACCESS_FIELDS``) for JSON logs, with the model and version that
        answered when the handler named them (``scope[logs.MODEL_KEY]``)."""
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "-"
        ms = seconds * 1000.0
        path = scope["path"]
        args = (peer, scope.get("scheme", "http"), scope["method"], path, status, length or "-", ms)
        if not logs.structured():  # text: straight into the held lines where that is the same
            if not logs.access_line(_ACCESS_FORMAT, args):
                self.access.info(_ACCESS_FORMAT, *args)  # type: ignore[union-attr]
            return
        fields = {  # the fields only JSON lines show
            "method": scope["method"],
            "path": path,
            "status": status,
            "latency_ms": round(ms, 3),
            "client": peer,
        }
        served = scope.get(logs.MODEL_KEY)
        if served is not None:
            fields["model"], fields["version"] = served
        self.access.info(  # type: ignore[union-attr]
            _ACCESS_FORMAT, *args, extra={logs.ACCESS_FIELDS: fields}
        )


_RID_HEADER = logs.HEADER.encode()
USAGE_PATH = "/v1/usage"
"""Served by the router's app (services/protocols/native.py), before the ``/v1`` mount."""
_ACCESS_FORMAT = "%s (scheme=%s,method=%s,path=%s) (status=%d,length=%s) %.3fms"
"""BentoML's access-line message (its ``AccessLogMiddleware``), for the routes served here."""


async def _drain(receive: Any, limit: int) -> None:
    """Receive the request body and drop it, up to ``limit`` bytes (a refused chunked body may be
    endless: past the limit the connection is left for uvicorn to close)."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


def _with_request_id(send: Any, rid: str) -> Any:
    """``send`` that adds ``X-Request-ID: rid`` to the response (replacing any the app set)."""
    header = (_RID_HEADER, rid.encode())

    async def send_with_id(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            kept = [h for h in message.get("headers", ()) if h[0].lower() != header[0]]
            message["headers"] = [*kept, header]
        await send(message)

    return send_with_id


def prediction_routes() -> list[Route]:
    """The router's two prediction routes, served by the same functions as their FastAPI routes."""
    from services.protocols import native
    from services.protocols.errors import error_response, oip_error
    from services.protocols.oip import rest as oip_rest

    async def predict(request: Request, _: re.Match[str]) -> Response:
        return await native.predict(request)

    async def infer(request: Request, match: re.Match[str]) -> Response:
        return await oip_rest.infer_request(request, match["name"], match["version"])

    return [
        Route("/predict", r"^/predict$", predict, error_response),
        Route(
            "/v2/models/infer",
            r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$",
            infer,
            oip_error,
        ),
    ]


def _not_found_default(original: ASGIApp) -> ASGIApp:
    """The router's answer to an HTTP path no route matches: the platform's JSON 404.

    Starlette's ``Router.default`` (``not_found``) answers ``text/plain`` "Not Found"; BentoML
    builds the router's outer app, so its default is replaced here. Websockets keep the original.
    The path is not echoed: it may be 10 KB of control characters."""
    from services.protocols.errors import error_response

    async def not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await original(scope, receive, send)
        method = scope["method"][:16]
        err = ServeryError.with_status(404, f"no {method} route at this path; the API: /docs.json")
        await error_response(err)(scope, receive, send)

    return not_found


def install(
    *,
    timeout_s: float,
    fast: bool = True,
    max_body_bytes: int | None = None,
    max_in_flight: int = 0,
    max_bytes_in_flight: int = 0,
) -> None:
    """Wrap the app BentoML builds for services that declare ``__servery_fast_path__``, a dict
    naming what the fast path serves for them: ``{"kind": "router", "api", "gate",
    "llm_proxy", "own_routes"}`` (prediction routes, and ``/v1/`` to the LLM proxy when the LLM
    service runs; ``own_routes(app)`` drops the BentoML routes its own handlers serve) when it is
    the entry service, and ``{"kind": "llm", "api"}`` (``/v1/`` straight to the LLM
    service's OpenAI app). The services hand over their parts: this module imports none of them.

    ``fast=False`` (the fast path off) still wraps the router's app when API keys or a body
    size limit are configured: a :class:`FastPath` with no routes, which checks every request.

    BentoML has no hook for this: :mod:`services.compat.app_factory` provides it (applied by
    ``services.compat.apply()``, which must have run); a second call replaces the settings."""
    from services.compat import app_factory

    def wrap(built: app_factory.BuiltApp) -> Any:
        app = built.app
        spec: dict[str, Any] = getattr(built.service, "__servery_fast_path__", None) or {}
        kind = spec.get("kind")
        api = spec.get("api")
        if kind == "router" and built.is_main:
            gate, proxy = spec["gate"], spec["llm_proxy"]
            app.router.default = _not_found_default(app.router.default)
            spec["own_routes"](app)  # the routes the router's handlers serve instead of BentoML
            if not fast and gate is None and max_body_bytes is None:
                return app
            mounts = [("/v1/", proxy)] if proxy is not None and fast else []
            routes = prediction_routes() if fast else []
        elif kind == "llm" and fast:
            # The LLM service's own FastAPI app answers every /v1/ path (unknown ones in the
            # OpenAI envelope); BentoML's middleware wrapped each streamed chunk's send. Not
            # gated: only the router reaches it (keys are checked there).
            mounts, routes, gate = [("/v1/", api)], [], None
        else:
            return app
        from services.ops import tracing

        return FastPath(
            app,
            api,
            routes,
            timeout_s=timeout_s,
            access_log=built.access_log,
            mounts=mounts,
            gate=gate,
            max_body_bytes=max_body_bytes,
            max_in_flight=max_in_flight if kind == "router" else 0,
            max_bytes_in_flight=max_bytes_in_flight if kind == "router" else 0,
            count_usage=kind == "router",
            # the entry service starts traces; the LLM service's spans only join the router's
            tracing=tracing.active(roots=kind == "router"),
        )

    app_factory.wrap_apps(wrap)

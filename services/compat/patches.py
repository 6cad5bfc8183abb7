"""Fixes for BentoML 1.4.40 defects that cost requests or memory, applied once at import.

Imported by ``services/__init__.py``, so every ``bentoml serve`` worker process applies them before
BentoML builds its ASGI app. Each patch names the upstream code it replaces; remove it when the
pinned BentoML carries the fix.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
from typing import Any

_applied = False


def apply() -> None:
    """Apply every patch (idempotent)."""
    global _applied
    if _applied:
        return
    _patch_timeout_middleware()
    _patch_validation_errors()
    _patch_llm_watcher_stop()
    _patch_arbiter_stop_order()
    _patch_mount_newlines()
    _patch_traffic_metrics_labels()
    _patch_uvicorn_one_write()
    _applied = True


def _patch_timeout_middleware() -> None:
    """Cancel the per-request timeout timer when the request ends.

    BentoML 1.4.40, ``bentoml/_internal/server/http/traffic.py``, ``TimeoutMiddleware.__call__``
    (line 28: ``loop.call_later(self.timeout, self._set_timer_out, waiter)``) never cancels the
    handle, so every request's context (span, futures, scope) stays alive for ``traffic.timeout``
    seconds: ~21 objects per request, and full GC pauses of 150-300 ms under load (STACK.md).
    No upstream issue found; bentoml/BentoML#4760 may be related.

    Also resolves the waiter when the app finishes without sending anything, which upstream would
    leave hanging until the timeout.
    """
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from services.runtime.errors import json_response

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send))
        fut.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        except TimeoutError:
            if fut.cancel():
                body = {
                    "error": {
                        "type": "timeout",
                        "message": f"request not answered within {self.timeout} s",
                    }
                }
                await json_response(body, 504)(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    TimeoutMiddleware.__call__ = __call__  # type: ignore[method-assign]


def _patch_validation_errors() -> None:
    """Answer request-body validation errors of ``@bentoml.api`` endpoints in our envelope.

    BentoML 1.4.40 (``_bentoml_impl/server/app.py``, ``api_endpoint_wrapper``) answers pydantic
    errors with ``{"error": "...", "detail": [...]}``; the platform has one envelope
    (``{"error": {"type", "message"}}``) and maps ``model_not_found`` to 404. Only the error path
    changes: a successful call costs one extra ``try``.
    """
    from _bentoml_impl.server.app import ServiceAppFactory
    from pydantic import ValidationError

    from services.runtime.errors import error_response, from_validation_error

    original = ServiceAppFactory.api_endpoint

    async def api_endpoint(self: Any, name: str, request: Any) -> Any:
        try:
            return await original(self, name, request)
        except ValidationError as exc:
            # Only the request body's own validation is a client mistake; a ValidationError
            # raised by the service's code is a server bug and stays a 500.
            if exc.title != self.service.apis[name].input_spec.__name__:
                raise
            return error_response(from_validation_error(exc))

    ServiceAppFactory.api_endpoint = api_endpoint  # type: ignore[method-assign]


def _patch_mount_newlines() -> None:
    """Let a path with a newline (``%0A``) reach the mounted app, to get its JSON 404.

    BentoML 1.4.40, ``_bentoml_impl/server/mount.py``: ``PassiveMount`` keeps Starlette's
    ``Mount`` pattern ``^/(?P<path>.*)$``, compiled without ``re.DOTALL``, so a decoded newline
    anywhere in the path makes the mount (the router's FastAPI app) never match, and BentoML answers
    its own text/plain 404 instead of the platform's envelope (tests/integration/test_malformed.py,
    ``newline`` names). Recompiling the mount's pattern with ``DOTALL`` lets such paths reach the
    app's own routes, whose ``[^/]+`` parameters already match newlines.
    """
    import re

    from _bentoml_impl.server.mount import PassiveMount

    if getattr(PassiveMount, "__servery_dotall__", False):
        return
    original = PassiveMount.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.path_regex = re.compile(self.path_regex.pattern, self.path_regex.flags | re.DOTALL)

    PassiveMount.__init__ = __init__  # type: ignore[method-assign]
    PassiveMount.__servery_dotall__ = True  # type: ignore[attr-defined]


def _patch_traffic_metrics_labels() -> None:
    """Label BentoML's traffic metrics by route template, never by the raw request path.

    BentoML 1.4.40, ``bentoml/_internal/server/http/instruments.py``,
    ``RunnerTrafficMetricsMiddleware.__call__``: ``endpoint = scope["path"]`` labels
    ``bentoml_service_request_total``, ``_request_duration_seconds`` (every bucket) and
    ``_request_in_progress``, so every distinct path a client sends (``/models/<any name>``,
    ``/no/such/path/<random>``) made new series for good (unbounded cardinality; measured in
    tests/integration/test_metrics_workers.py). Here the middleware sees the matched route's
    template (``/models/{name}``, ``/v2/{path:path}``) or ``/_unmatched``; the app still routes
    on the real path. Only requests that go through BentoML's middleware pay (~30 route matches,
    cached per path): the fast path's prediction routes never reach it.
    """
    import copy
    import functools

    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
    from starlette.routing import Match, Mount

    original = RunnerTrafficMetricsMiddleware.__call__
    if getattr(original, "__servery__", False):
        return

    def label(routes: Any, scope: dict[str, Any], prefix: str) -> str | None:
        partial = None
        for route in routes:
            match, child = route.matches(scope)
            if match is Match.NONE:
                continue
            if isinstance(route, Mount):
                inner = label(route.routes, {**scope, **child}, prefix + route.path)
                found = inner if inner is not None else f"{prefix}{route.path}/{{path:path}}"
            else:
                found = prefix + getattr(route, "path", "/_unmatched")
            if match is Match.FULL:
                return found
            partial = partial or found
        return partial

    @functools.lru_cache(maxsize=512)
    def endpoint(app: Any, kind: str, method: str, path: str) -> str:
        scope = {"type": kind, "method": method, "path": path, "root_path": ""}
        return label(getattr(app, "routes", ()), scope, "") or "/_unmatched"

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] == "/metrics" or "app" not in scope:
            return await original(self, scope, receive, send)
        name = endpoint(scope["app"], kind, scope.get("method", "GET"), scope["path"])
        if name == scope["path"]:
            return await original(self, scope, receive, send)
        # The original reads the label from scope["path"]: hand it a copy carrying the label and
        # a per-request copy of itself whose app gets the real scope back.
        inner = self.app

        async def real(_: Any, receive: Any, send: Any) -> None:
            await inner(scope, receive, send)

        if not self._is_setup:  # set up once, here: a copy would register the metrics again
            self._setup()
        shim = copy.copy(self)
        shim.app = real
        await original(shim, {**scope, "path": name}, receive, send)

    __call__.__servery__ = True  # type: ignore[attr-defined]
    RunnerTrafficMetricsMiddleware.__call__ = __call__  # type: ignore[method-assign]


class _Held:
    """A stand-in transport that keeps what is written (a response's head) instead of sending it."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _Prefixed:
    """A stand-in transport whose first write sends ``head`` and the data in one call.

    uvicorn calls more than ``write`` on it: ``close()`` after the last body chunk of a response
    that ends the connection (the client sent ``Connection: close``, or the server is shutting
    down). Anything else goes to the real transport, the held head first.
    """

    __slots__ = ("head", "transport")

    def __init__(self, transport: Any, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        if self.head:
            data, self.head = self.head + data, b""
        self.transport.write(data)

    def close(self) -> None:
        if self.head:
            self.transport.write(self.head)
            self.head = b""
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _patch_uvicorn_one_write() -> None:
    """Send a response's status line and headers in the same write as its body.

    uvicorn 0.54, ``uvicorn/protocols/http/httptools_impl.py``, ``RequestResponseCycle.send``
    writes the head when the app sends ``http.response.start`` and the body at
    ``http.response.body``: two ``transport.write`` calls per response, each a ``send(2)`` on
    uvloop and, with ``TCP_NODELAY``, a TCP segment of its own for the client to receive and
    acknowledge. For a response whose length is known (every prediction answer), the head is now
    held and written with the first body chunk: one system call and one segment. Streamed
    (chunked) responses, such as the LLM's server-sent events, still get their head at once, so a
    client sees the status before the first token. uvicorn's own code still builds and checks
    the head; this only defers its write (upstream has no option for it; h11's implementation is
    not used here: BentoML picks httptools when it is installed).
    """
    from uvicorn.protocols.http import httptools_impl

    cycle = httptools_impl.RequestResponseCycle
    if getattr(cycle.send, "__servery_one_write__", False):
        return
    original = cycle.send

    async def send(self: Any, message: Any) -> None:
        if self.response_started:
            head = getattr(self, "_servery_head", b"")
            if not head:
                return await original(self, message)
            self._servery_head = b""
            transport = self.transport
            self.transport = prefixed = _Prefixed(transport, head)
            try:
                await original(self, message)
            finally:
                self.transport = transport
            if prefixed.head and not self.disconnected:  # nothing written (HEAD, empty body)
                transport.write(prefixed.head)
            return None
        transport = self.transport
        self.transport = held = _Held()
        try:
            await original(self, message)
        finally:
            self.transport = transport
        if held.data:
            if self.chunked_encoding:  # a stream: its head goes out now
                transport.write(held.data)
            else:
                self._servery_head = held.data

    send.__servery_one_write__ = True  # type: ignore[attr-defined]
    cycle.send = send  # type: ignore[method-assign]


def _patch_llm_watcher_stop() -> None:
    """Stop the LLM service's worker without signalling its children (vLLM's engine processes).

    BentoML 1.4.40 (``bentoml/serving.py``, ``create_watcher``) makes every circus watcher with
    ``stop_children=True``: on SIGTERM circus signals each worker's child processes too, and
    vLLM's engine core aborts every request in flight the moment it gets SIGTERM
    (``vllm/v1/engine/core.py``), so streams were cut before the service's graceful shutdown
    (services/ops/shutdown.py) could let them finish. The LLM worker stops its engines itself in
    its shutdown hook; circus still kills the whole tree if the worker outlives
    ``graceful_timeout``. Applied in the ``bentoml serve`` process, where BentoML imports this
    package before it creates the watchers. Other watchers are unchanged.
    """
    import bentoml.serving

    original = bentoml.serving.create_watcher
    if getattr(original, "__servery__", False):
        return

    def create_watcher(name: str, args: list[str], **kwargs: Any) -> Any:
        watcher = original(name, args, **kwargs)
        if _serves(args, "llm"):
            watcher.stop_children = False
        return watcher

    create_watcher.__servery__ = True  # type: ignore[attr-defined]
    bentoml.serving.create_watcher = create_watcher  # type: ignore[assignment]


def _patch_arbiter_stop_order() -> None:
    """Remove the services' Unix sockets after the workers stop, not before.

    BentoML 1.4.40, ``bentoml/_internal/utils/circus/__init__.py``, ``Arbiter.stop`` closes its
    exit stack *before* circus stops the watchers, and that stack holds
    ``shutil.rmtree(uds_path)`` (``_bentoml_impl/server/serving.py``, ``serve_http``): on
    SIGTERM the directory of the dependencies' Unix sockets is deleted at once, so while the
    framework services drain (services/ops/shutdown.py) every *new* connection from the router
    fails (``ENOENT``) and the request answers 503; only pooled keep-alive connections still
    work. Measured in CI: 6 admitted requests to a service-placed model lost that way.

    Here ``stop`` only stops circus; the exit stack closes when the arbiter's loop has ended
    (``start`` returns), after every watcher stopped and circus closed its sockets. Applied in
    the ``bentoml serve`` process, which imports this package before it builds the arbiter.
    """
    # circus's own Arbiter is reached through super(): circus is BentoML's dependency, not one
    # this package pins (tests/integration/test_bento_build.py).
    from bentoml._internal.utils import circus as bentoml_circus

    arbiter = bentoml_circus.Arbiter
    if getattr(arbiter.stop, "__servery__", False):
        return

    def start(self: Any, cb: Any = None) -> None:
        self.exit_stack.__enter__()
        try:
            fut = super(arbiter, self).start(cb)
            if exc := fut.exception():
                raise exc
        finally:
            self.exit_stack.__exit__(None, None, None)

    def stop(self: Any) -> Any:
        return super(arbiter, self).stop()

    stop.__servery__ = True  # type: ignore[attr-defined]
    arbiter.start = start  # type: ignore[method-assign]
    arbiter.stop = stop  # type: ignore[method-assign]


def _serves(args: list[str], service: str) -> bool:
    """Whether a BentoML worker command line serves ``service`` (``--service-name NAME``)."""
    return any(a == "--service-name" and b == service for a, b in itertools.pairwise(args))


def freeze_heap() -> None:
    """Move everything allocated so far out of the GC's reach.

    A BentoML worker holds ~175 k tracked objects after start-up; each full collection walked them
    all (80-100 ms). Freezing after start-up cut that to 1-2 ms (STACK.md, "Defect 2").
    """
    gc.collect()
    gc.freeze()

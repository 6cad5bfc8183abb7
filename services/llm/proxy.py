"""A streaming reverse proxy: the router's ``/v1/*`` (OpenAI API) forwarded to the LLM service.

Clients talk to one port; the LLM service (its own BentoML process, vLLM engine inside) serves
the OpenAI routes. BentoML's client for a ``bentoml.depends`` service calls its ``@bentoml.api``
methods, not the routes of an ASGI app mounted in it, so the router forwards raw HTTP to the
service's address (``BentoMLContainer.remote_runner_mapping``: a Unix socket under ``bentoml
serve``) with aiohttp, which BentoML's own client also uses.

No buffering: each chunk the service writes (one SSE event per token batch) is sent to the client
as soon as aiohttp reads it (``iter_any``). A client that goes away mid-stream is noticed on the
ASGI ``receive`` channel (uvicorn silently drops sends to a closed connection, so writing alone
never notices): the upstream request is then cancelled and its connection closed, which makes
vLLM abort the generation in the engine.

Only the routes of services/llm/openai_api.py's allow-list are forwarded, to their canonical
path, matched on the raw path the client sent (``/v1/../metrics`` or ``/v1/models%3F`` are 404
here, never a decoded path the service reads otherwise); a request body is read up to
``max_body_bytes`` (413 past it). ``GET /v1/models`` for an API key limited to some models
(services/gateway/auth.py) lists only those: the service's answer is read whole and filtered, as
``GET /models`` is for the platform's own models. The gate's ``x-ratelimit-*`` headers for the
caller's key are added to the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from services.llm.openai_api import (
    MODELS,
    RATE_HEADERS,
    ROUTES,
    model_of,
    read_body,
    route_of,
)
from services.ops import tracing
from services.protocols.errors import openai_error, openai_response
from services.protocols.state import SCOPE_KEY
from services.runtime.errors import PayloadTooLarge

logger = logging.getLogger("servery")

# RFC 9110 hop-by-hop headers, plus the ones aiohttp sets itself for the upstream request, plus
# the client's credentials: the router checks API keys (services/gateway/auth.py); they go no
# further.
_HOP = frozenset(
    {
        "authorization",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_UNAVAILABLE = (
    b'{"error": {"message": "the LLM service is not reachable", '
    b'"type": "ServiceUnavailableError", "param": null, "code": 503}}'
)


class StreamingProxy:
    """ASGI app forwarding every HTTP request to ``target()``: ``file:///path.sock`` or
    ``unix:///path.sock`` (a Unix socket), or ``http://host:port``."""

    def __init__(
        self,
        target: Callable[[], str],
        *,
        connect_timeout_s: float | None = None,
        read_timeout_s: float | None = None,
        on_done: Callable[[str, int, float], None] | None = None,
        max_body_bytes: int = 16 * 2**20,
    ) -> None:
        """``read_timeout_s`` bounds each wait for bytes from the service (the first byte of an
        answer, the next chunk of a stream): past it the request is cancelled, answered 504 when
        nothing was sent yet, else the stream is ended. ``on_done(model, status, seconds)`` is
        called after every proxied request (the ``model`` of a JSON body, else ``-``; status 499
        when the client went away first). ``max_body_bytes``: the most of a request body read
        (``SERVERY_MAX_BODY_BYTES``)."""
        self._target = target
        self._max_body_bytes = max_body_bytes
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._on_done = on_done
        self._session: Any = None
        self._base = ""

    def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            uri = self._target()
            if uri.startswith(("unix://", "file://")):
                # BentoML 1.4.40 names a dependency's Unix socket file:///...sock
                from bentoml._internal.utils.uri import uri_to_path

                path = uri_to_path(uri) if uri.startswith("file://") else uri[len("unix://") :]
                connector = aiohttp.UnixConnector(path=path)
                self._base = "http://llm"
            else:
                connector = aiohttp.TCPConnector()
                self._base = uri.replace("tcp://", "http://", 1).rstrip("/")
            # No total timeout: a generation may stream for minutes (the engine bounds its
            # length); a service that stops sending is caught by the read timeout.
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout_s, sock_read=self._read_timeout_s
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            body, left = await read_body(receive, self._max_body_bytes)
        except PayloadTooLarge as e:
            return await openai_error(e)(scope, receive, send)
        if left is not None:  # the client went away
            return
        route = route_of(scope)
        if route is None or scope["method"] not in route.methods:
            return await _not_served(route is None)(scope, receive, send)
        if route.path == MODELS:
            key = scope.get(SCOPE_KEY)
            if key is not None and key.models is not None:
                send = _only_models(send, key.allows)
        if rate := scope.get(RATE_HEADERS):
            send = _with_headers(send, rate)
        start = time.perf_counter()
        status = [499]  # until the upstream answers: the client left first
        forward = asyncio.ensure_future(self._forward(scope, route.path, body, send, status))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait({forward, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (forward, watch):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if self._on_done is not None:
                model = (model_of(body) or "-")[:64]  # bounded: a metrics label
                self._on_done(model, status[0], time.perf_counter() - start)
        if forward in done:
            forward.result()  # re-raise what the forward raised

    async def _forward(
        self, scope: dict[str, Any], path: str, body: bytes, send: Any, status: list[int]
    ) -> None:
        import aiohttp

        query = scope.get("query_string", b"").decode("latin-1")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope.get("headers", [])
            if k.decode("latin-1").lower() not in _HOP
        ]
        # a traced request's trace goes on to the service, under a span of this call
        headers, span = tracing.outgoing(headers, scope["method"], path)
        started = False
        try:
            session = self._client()
            url = f"{self._base}{path}" + (f"?{query}" if query else "")
            async with session.request(scope["method"], url, data=body, headers=headers) as resp:
                out = [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in resp.headers.items()
                    if k.lower() not in _HOP
                ]
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                started = True
                status[0] = resp.status
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (aiohttp.ClientConnectionError, OSError, TimeoutError) as e:
            # aiohttp's read timeouts are TimeoutErrors; a connect timeout is "not reachable"
            timed_out = isinstance(e, TimeoutError) and not isinstance(
                e, aiohttp.ConnectionTimeoutError
            )
            if timed_out:
                logger.error(
                    "LLM service sent nothing for %s s: request cancelled", self._read_timeout_s
                )
            else:
                logger.error("LLM service not reachable: %s", e)
            if started:  # mid-stream: the status is sent; end the body, the client sees it cut
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            status[0] = 504 if timed_out else 503
            await send(
                {
                    "type": "http.response.start",
                    "status": status[0],
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send(
                {
                    "type": "http.response.body",
                    "body": _timeout_body(self._read_timeout_s) if timed_out else _UNAVAILABLE,
                }
            )
        finally:
            if span is not None:
                tracing.end(span, status[0])


def _only_models(send: Any, allows: Callable[[str | None], bool]) -> Any:
    """``send`` for a ``/v1/models`` answer that keeps only the models ``allows`` (by ``id``).

    The answer is held until its last chunk (a short JSON document), filtered, and sent with its
    ``content-length`` set again. Error answers pass unchanged; a 200 that is not the expected
    list becomes a 502, rather than a list nobody filtered.
    """
    held: list[dict[str, Any]] = []
    body = bytearray()

    async def filtered(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            held.append(message)
            return
        body.extend(message.get("body", b""))
        if message.get("more_body", False):
            return
        start, out = held[0], bytes(body)
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        status = start["status"]
        if status == 200:
            try:
                listing = json.loads(out)
                listing["data"] = [m for m in listing["data"] if allows(m.get("id"))]
                out = json.dumps(listing).encode()
            except (ValueError, TypeError, KeyError, AttributeError):
                logger.error("LLM service: /v1/models answer is not a model list")
                status, out = 502, _BAD_LISTING
                headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(out)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return filtered


_BAD_LISTING = (
    b'{"error": {"message": "the LLM service answered /v1/models with something else than '
    b'a model list", "type": "BadGatewayError", "param": null, "code": 502}}'
)


def _timeout_body(seconds: float | None) -> bytes:
    message = f"the LLM service sent nothing for {seconds} s; the request was cancelled"
    error = {"message": message, "type": "TimeoutError", "param": None, "code": 504}
    return json.dumps({"error": error}).encode()


def _not_served(unknown: bool) -> Any:
    """404 for a path off the allow-list (not echoed: it may be 10 KB of anything), 405 for a
    listed path with another method."""
    if unknown:
        served = ", ".join(sorted(ROUTES))
        return openai_response(404, f"no such route; served under /v1: {served}", "NotFoundError")
    return openai_response(405, "Method Not Allowed", "invalid_request_error")


def _with_headers(send: Any, headers: list[tuple[bytes, bytes]]) -> Any:
    """``send`` that adds ``headers`` to the response's start."""

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *headers]
        await send(message)

    return sending


async def _disconnected(receive: Any) -> None:
    """Return once the client has gone away (the request body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

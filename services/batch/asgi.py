"""One batch line as an HTTP request to the router's own handlers, in this process."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

DirectHandler = Callable[[Request, "re.Match[str]"], Awaitable[Response]]
"""A route's handler as the router's fast path calls it (services/gateway/fastpath.py
``Route.handler``): the request and the path's match -> the response (errors answered, never
raised)."""


class JsonBytes(bytes):
    """An answer whose content type is JSON (:class:`AsgiCaller`): it goes into the output
    line as it is."""


class AsgiCaller:
    """Runs a request through the router's handlers in this process, with the batch owner's
    key in the scope (``key_of`` makes it), so a key limited to some models is limited in its
    batches too.

    ``routes``: ``(pattern, handler)`` of the routes the router's fast path serves itself
    (``POST /predict``, ``POST /v2/models/{name}[/versions/{v}]/infer``): a line for one of them
    calls the same handler online requests reach, with no ASGI app in between (FastAPI's
    routing, its middleware and the response's ``send`` cost a batch line more router CPU than
    the model did, bench/studies/batch.py measured). Any other URL runs through ``app`` (the
    router's FastAPI app) as an ASGI request. Either way nothing in front of the handlers runs:
    no API-key gate (the owner's key is in the scope), no access log, no request timeout, no
    ``servery_request_duration_seconds``; the handlers count the request
    (``servery_requests_total``), as for online requests."""

    def __init__(
        self,
        app: Any,
        key_of: Callable[[str, list[str] | None], Any],
        routes: Sequence[tuple[re.Pattern[str], DirectHandler]] = (),
    ) -> None:
        self.app, self.key_of = app, key_of
        self.routes = list(routes)

    def _scope(self, method: str, url: str, key: Any) -> dict[str, Any]:
        from services.protocols.state import SCOPE_KEY

        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": url,
            "raw_path": url.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("batch", 0),
            "server": ("batch", 0),
            "app": self.app,
            SCOPE_KEY: key,
        }

    async def __call__(
        self, method: str, url: str, body: bytes, owner: str, models: list[str] | None
    ) -> tuple[int, bytes]:
        key = self.key_of(owner, models)
        if method == "POST":
            for pattern, handler in self.routes:
                match = pattern.match(url)
                if match is not None:
                    return await self._direct(handler, match, url, body, key)
        return await self._asgi(method, url, body, key)

    async def _direct(
        self, handler: DirectHandler, match: re.Match[str], url: str, body: bytes, key: Any
    ) -> tuple[int, bytes]:
        """A fast-path route's handler called as the fast path calls it; its answer's body
        taken as it is (no ``send``)."""
        scope = self._scope("POST", url, key)
        receive = _receiver(body)
        request = Request(scope, receive)
        request._body = body  # read as it is (services/compat/request_body.py)
        response = await handler(request, match)
        out = getattr(response, "body", None)
        if out is None:  # a streamed answer: sent as to a client
            return await _collect(response, scope, receive)
        for name, value in response.raw_headers:
            if name == b"content-type":
                if value.startswith(b"application/json"):
                    return response.status_code, JsonBytes(out)
                break
        return response.status_code, out

    async def _asgi(self, method: str, url: str, body: bytes, key: Any) -> tuple[int, bytes]:
        from services.llm.openai_api import ROUTES, model_of
        from services.runtime.errors import ServeryError

        route = ROUTES.get(url)
        if key is not None and route is not None and route.names_model:
            try:  # what the gate checks on /v1 (the handlers check /predict and /v2 themselves)
                key.check_model(model_of(body))
            except ServeryError as e:
                return e.status_code, json.dumps({"error": {"message": e.message}}).encode()
        return await _collect(self.app, self._scope(method, url, key), _receiver(body))


def _receiver(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI ``receive``: the body in one message, then a client that never leaves."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        return {"type": "http.disconnect"}

    return receive


async def _collect(app: Any, scope: dict[str, Any], receive: Any) -> tuple[int, bytes]:
    """Run ASGI ``app`` (or a response) and return its status and body (a :class:`JsonBytes`
    when its content type is JSON)."""
    status = [0]
    is_json = [False]
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status[0] = message["status"]
            is_json[0] = any(
                k.lower() == b"content-type" and v.startswith(b"application/json")
                for k, v in message.get("headers", ())
            )
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    body_out = b"".join(chunks)
    return status[0], JsonBytes(body_out) if is_json[0] else body_out

"""The router's HTTP gate: API keys, rate limits (services/gateway/auth.py) and the admin
endpoints, checked in front of every route, fast path or not (services/gateway/fastpath.py wraps
BentoML's app with it), after the body-size check (:func:`check_body_size`, every method).

Open without a key: the probes and metrics in :data:`OPEN_PATHS` and the console's static files.
``/admin/`` is guarded by :class:`~services.gateway.auth.AdminGuard` whether keys are on or not.
Refusals use each API's envelope: OpenAI's on ``/v1/``, OIP's ``{"error": "..."}`` on ``/v2``,
the platform's elsewhere. Allowed models are checked here when the path names the model
(``/v2/models/{name}...``, ``/models/{name}``) or, on an allow-listed ``/v1`` POST route
(services/llm/openai_api.py, by the raw path), from the request body (read once and replayed to
the proxy), which also gives the tokens charged; ``/predict`` checks its body's model in the
handler. Answers on ``/v1`` carry OpenAI's ``x-ratelimit-*`` headers for a rate-limited key.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response

from models.config import Settings
from services.gateway.auth import AdminGuard, Keyring
from services.llm.openai_api import (
    RATE_HEADERS,
    generation,
    read_body,
    replaying,
    route_of,
    too_large,
)
from services.protocols.errors import refusal
from services.protocols.state import ADMIN_KEY, SCOPE_KEY
from services.runtime.errors import BadRequest, PayloadTooLarge, RateLimited, ServeryError

OPEN_PATHS = frozenset(
    {"/livez", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
)
"""HTTP paths served without a key (liveness/readiness probes and Prometheus scrapes)."""

CONSOLE = "/console"
"""The web console's page and static assets (services/console/) are open: a browser cannot put a
key on ``<script src>``; they hold no data, and every call the page makes for data carries the
key the user typed in."""

ADMIN = "/admin/"

_MODEL_IN_PATH = re.compile(r"^/(?:v2/)?models/([^/]+)")


class HttpGate:
    """Admits or refuses one HTTP request, before any route runs (see
    services/gateway/fastpath.py). ``keys`` None: authentication is off, only ``/admin/`` is
    checked (by ``admin``)."""

    def __init__(
        self,
        keys: Keyring | None,
        admin: AdminGuard,
        *,
        default_max_tokens: int = 1024,
        max_body_bytes: int | None = None,
    ) -> None:
        self.keys = keys
        self.admin = admin
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes

    async def admit(self, scope: dict[str, Any], receive: Any) -> tuple[Response | None, Any]:
        """``(None, receive)`` to go on (``receive`` replays a body read here), or a refusal."""
        path: str = scope["path"]
        if path.startswith(ADMIN):
            return self._admin(scope), receive
        if self.keys is None or path in OPEN_PATHS or path == CONSOLE:
            return None, receive
        if path.startswith(CONSOLE + "/"):
            return None, receive
        llm = path.startswith("/v1/")
        key = None
        try:
            key = self.keys.authenticate(header(scope, b"authorization"))
            tokens = 0
            route = route_of(scope) if llm else None
            if (
                route is not None
                and (route.names_model or route.generates)
                and scope["method"] == "POST"
                and key.reads_llm_body
            ):
                body, left = await read_body(receive, self.max_body_bytes)
                receive = replaying(body, receive, left)
                asked = generation(body, route)
                if route.names_model:
                    key.check_model(asked.model)
                if route.generates:
                    tokens = asked.charge(self.default_max_tokens)
            elif key.models is not None and (found := _MODEL_IN_PATH.match(path)):
                key.check_model(found[1])
            key.admit(tokens)
        except ServeryError as e:
            refused = refusal(path, e)
            if llm and key is not None and isinstance(e, RateLimited):
                refused.raw_headers.extend(key.rate_headers())
            return refused, receive
        scope[SCOPE_KEY] = key
        if llm:
            scope[RATE_HEADERS] = key.rate_headers()
        return None, receive

    def _admin(self, scope: dict[str, Any]) -> Response | None:
        client = scope.get("client")
        try:
            key = self.admin.check(
                header(scope, b"authorization"),
                client[0] if client else "-",
                scope["method"],
                header(scope, b"content-type"),
            )
        except ServeryError as e:
            return refusal(scope["path"], e)
        scope[ADMIN_KEY] = True
        if key is not None:
            scope[SCOPE_KEY] = key
        return None


def http_gate(
    keys: Keyring | None, settings: Settings, *, llm_max_tokens_limit: int | None = None
) -> HttpGate:
    """The gate for ``keys`` (None: authentication off) as ``settings`` configure it.

    A completion that sets no ``max_tokens`` is charged ``llm_max_tokens_limit`` in all
    (``SERVERY_LLM_MAX_TOKENS_LIMIT``: the LLM service caps such a request to it) when that is
    set, else ``SERVERY_RATE_LIMIT_DEFAULT_MAX_TOKENS`` per choice."""
    return HttpGate(
        keys,
        AdminGuard(settings.admin_token, keys),
        default_max_tokens=llm_max_tokens_limit or settings.rate_limit_default_max_tokens,
        max_body_bytes=settings.max_body_bytes,
    )


async def check_body_size(
    scope: dict[str, Any], receive: Any, limit: int
) -> tuple[Response | None, Any]:
    """``(None, receive)`` when the body fits in ``limit`` bytes, else a 413 refusal; for every
    method.

    A declared ``Content-Length`` is checked as it is (uvicorn holds the body to it); a chunked
    body (``Transfer-Encoding``) is read here up to the limit and replayed. A request with
    neither has no body (RFC 9112 6.3)."""
    length = header(scope, b"content-length")
    try:
        if length is not None:
            if int(length) > limit:
                raise too_large(limit)
        elif header(scope, b"transfer-encoding") is not None:
            body, left = await read_body(receive, limit)
            receive = replaying(body, receive, left)
    except PayloadTooLarge as e:
        return refusal(scope["path"], e), receive
    except ValueError:  # not a number: uvicorn would have refused it already
        return refusal(scope["path"], BadRequest("invalid Content-Length")), receive
    return None, receive


def header(scope: dict[str, Any], name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k.lower() == name:
            return v.decode("latin-1")
    return None

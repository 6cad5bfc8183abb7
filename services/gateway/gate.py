"""The router's HTTP gate: API keys and rate limits (services/gateway/auth.py) checked in front of
every
route, fast path or not (services/gateway/fastpath.py wraps BentoML's app with it).

Open without a key: the probes and metrics in :data:`OPEN_PATHS`, and ``/admin/`` when
``SERVERY_ADMIN_TOKEN`` is set (the admin token guards it; both would use ``Authorization``).
Refusals use each API's envelope: OpenAI's on ``/v1/``, OIP's ``{"error": "..."}`` on ``/v2``,
the platform's elsewhere. Allowed models are checked here when the path names the model
(``/v2/models/{name}...``, ``/models/{name}``) or, on ``/v1/``, from the request body (read once
and replayed to the proxy); ``/predict`` checks its body's model in the handler.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.responses import Response

from models.config import Settings
from services.gateway.auth import Keyring
from services.protocols.errors import refusal
from services.protocols.state import SCOPE_KEY
from services.runtime.errors import BadRequest, PayloadTooLarge, ServeryError

OPEN_PATHS = frozenset(
    {"/livez", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
)
"""HTTP paths served without a key (liveness/readiness probes and Prometheus scrapes)."""

CONSOLE = "/console"
"""The web console's page and static assets (services/console/) are open: a browser cannot put a
key on ``<script src>``; they hold no data, and every call the page makes for data carries the
key the user typed in."""

_MODEL_IN_PATH = re.compile(r"^/(?:v2/)?models/([^/]+)")
_COMPLETIONS = ("/completions",)  # /v1/completions and /v1/chat/completions generate tokens


class HttpGate:
    """Admits or refuses one HTTP request, before any route runs (see
    services/gateway/fastpath.py)."""

    def __init__(
        self, keys: Keyring, *, admin_token_set: bool = False, default_max_tokens: int = 1024
    ) -> None:
        self.keys = keys
        self.admin_token_set = admin_token_set
        self.default_max_tokens = default_max_tokens

    async def admit(self, scope: dict[str, Any], receive: Any) -> tuple[Response | None, Any]:
        """``(None, receive)`` to go on (``receive`` replays a body read here), or a refusal."""
        path: str = scope["path"]
        if (
            path in OPEN_PATHS
            or path == CONSOLE
            or path.startswith(CONSOLE + "/")
            or (self.admin_token_set and path.startswith("/admin/"))
        ):
            return None, receive
        try:
            key = self.keys.authenticate(header(scope, b"authorization"))
            tokens = 0
            if path.startswith("/v1/"):
                if scope["method"] == "POST" and key.reads_llm_body:
                    body, receive = await buffer_body(receive)
                    model, tokens = llm_cost(body, path, self.default_max_tokens)
                    key.check_model(model)
            elif key.models is not None and (found := _MODEL_IN_PATH.match(path)):
                key.check_model(found[1])
            key.admit(tokens)
        except ServeryError as e:
            return refusal(path, e), receive
        scope[SCOPE_KEY] = key
        return None, receive


def http_gate(keys: Keyring | None, settings: Settings) -> HttpGate | None:
    """The gate for ``keys`` as ``settings`` configure it (None when authentication is off)."""
    if keys is None:
        return None
    return HttpGate(
        keys,
        admin_token_set=settings.admin_token is not None,
        default_max_tokens=settings.rate_limit_default_max_tokens,
    )


def too_large_message(limit: int) -> str:
    return f"request body larger than {limit} bytes (SERVERY_MAX_BODY_BYTES)"


async def check_body_size(
    scope: dict[str, Any], receive: Any, limit: int
) -> tuple[Response | None, Any]:
    """``(None, receive)`` when the body fits in ``limit`` bytes, else a 413 refusal.

    A declared ``Content-Length`` is checked as it is (uvicorn holds the body to it); a body sent
    without one (chunked) is read here up to the limit and replayed.
    """
    length = header(scope, b"content-length")
    try:
        if length is not None:
            if int(length) > limit:
                raise PayloadTooLarge(too_large_message(limit))
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            _, receive = await buffer_body(receive, limit)
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


async def buffer_body(receive: Any, limit: int | None = None) -> tuple[bytes, Any]:
    """Read the whole request body; returns it and a ``receive`` that replays it first.

    Raises :class:`~services.runtime.errors.PayloadTooLarge` once more than ``limit`` bytes arrived.
    """
    chunks: list[bytes] = []
    size = 0
    first: dict[str, Any]
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: replay the disconnect
            body, first = b"", message
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise PayloadTooLarge(too_large_message(limit))
        chunks.append(chunk)
        if not message.get("more_body", False):
            body = b"".join(chunks)
            first = {"type": "http.request", "body": body, "more_body": False}
            break
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return first
        return await receive()

    return body, replay


def llm_cost(body: bytes, path: str, default_max_tokens: int) -> tuple[str | None, int]:
    """The ``model`` of an OpenAI request and the tokens it is charged: ``max_completion_tokens``
    or ``max_tokens`` (else ``default_max_tokens``) times ``n`` on the completion routes, 0
    elsewhere and for a body that is not a JSON object (the LLM service answers 400)."""
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        return None, 0
    if not isinstance(doc, dict):
        return None, 0
    model = doc.get("model")
    model = model if isinstance(model, str) else None
    if not path.endswith(_COMPLETIONS):
        return model, 0
    limit = next(
        (
            v
            for v in (doc.get("max_completion_tokens"), doc.get("max_tokens"))
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0
        ),
        default_max_tokens,
    )
    n = doc.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    return model, limit * n

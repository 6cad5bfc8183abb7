"""What the HTTP front ends share: the router worker's model registry (on the app), the caller's
API key (in the ASGI scope, put there by the gate), and :func:`answer`, one inference request from
arrival to response."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from services.ops.logs import MODEL_KEY
from services.runtime.errors import ModelNotReady
from services.runtime.inference import Call
from services.runtime.registry import Registry

SCOPE_KEY = "servery.api_key"
"""ASGI scope entry holding the caller's :class:`~services.gateway.auth.ApiKey` once the gate
(services/gateway/gate.py) admitted it; handlers that learn the model from the body
(``/predict``, the LLM proxy) call its ``check_model``."""

ADMIN_KEY = "servery.admin"
"""ASGI scope entry set (True) by the gate once the caller may use ``/admin/``
(services/gateway/auth.py ``AdminGuard``); the admin handlers refuse a request without it."""


def registry_of(request: Request) -> Registry:
    """The registry the Router service put on its app (``app.state.registry``) when it started;
    503 until then."""
    registry: Registry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise ModelNotReady("models are still loading")
    return registry


async def answer(
    request: Request,
    call: Call,
    serving: Awaitable[Response],
    on_error: Callable[[BaseException], Response],
) -> Response:
    """Serve one HTTP inference request: ``serving`` decodes it, runs
    :func:`services.runtime.inference.infer` with ``call`` and encodes the answer; an error
    becomes ``on_error``'s envelope. The answer is counted with its status (a request the timeout
    cancels as 504), and the access log learns the version that answered. The caller's key
    (``SCOPE_KEY``) is named in ``call`` for its usage (services/ops/usage.py)."""
    key = request.scope.get(SCOPE_KEY)
    if key is not None:
        call.key = key.name
    try:
        response = await serving
    except asyncio.CancelledError:  # the request timeout cancelled it: the client gets a 504
        call.answered(504)
        raise
    except Exception as e:
        response = on_error(e)
    finally:
        served = call.served
        if served is not None:
            request.scope[MODEL_KEY] = (served.info.name, served.info.version)
    call.answered(response.status_code)
    return response

"""Request state the HTTP front ends share: the router worker's model registry (on the app) and
the caller's API key (in the ASGI scope, put there by the gate)."""

from __future__ import annotations

from starlette.requests import Request

from services.runtime.errors import ModelNotReady
from services.runtime.registry import Registry

SCOPE_KEY = "servery.api_key"
"""ASGI scope entry holding the caller's :class:`~services.gateway.auth.ApiKey` once the gate
(services/gateway/gate.py) admitted it; handlers that learn the model from the body
(``/predict``, the LLM proxy) call its ``check_model``."""


def registry_of(request: Request) -> Registry:
    """The registry the Router service put on its app (``app.state.registry``) when it started;
    503 until then."""
    registry: Registry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise ModelNotReady("models are still loading")
    return registry

"""servery's BentoML services. The Bento entry point is ``services:Router``.

Importing this package, or any module under it, has no side effects: a unit test can import
``services.runtime.batcher`` without building an app. Asking the package for a service
(``services.Router``, which is what ``bentoml serve services:Router`` and every BentoML worker
does; also ``LLM``, ``SklearnService``, ``XGBoostService``, ``TorchService``) first wires the
process, once (:func:`wire`): the BentoML fixes (:mod:`services.compat`, before BentoML builds
any app), logging, and the fast path around the app BentoML builds. torch and xgboost still load
only when a model of theirs is loaded, vLLM only when an engine starts.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

_SERVICES = {
    "Router": "services.gateway.router",
    "LLM": "services.llm.service",
    "SklearnService": "services.frameworks.sklearn_service",
    "TorchService": "services.frameworks.torch_service",
    "XGBoostService": "services.frameworks.xgboost_service",
}

__all__ = sorted(_SERVICES)

_wired = False


def wire() -> None:
    """Prepare this process to serve the Bento (idempotent)."""
    global _wired
    if _wired:
        return
    from services import compat
    from services.gateway import fastpath
    from services.ops import logs, tracing
    from services.protocols import errors
    from services.runtime.errors import RequestTimeout
    from services.settings import SETTINGS

    compat.apply()
    # bentoml.xgboost with the xgboost-cpu wheel (the Bento has no servery .pth file)
    from models import xgboost_dist

    xgboost_dist.install()
    # Timeouts and request-body errors answered inside BentoML get the platform's envelope
    # (compat sits below the layers that define it).
    compat.use_envelope(
        compat.Envelope(errors.error_response, RequestTimeout, errors.from_validation_error)
    )
    # BentoML configured this worker's logging before importing the service: request ids on every
    # line, JSON lines if asked for (SERVERY_LOG_FORMAT), INFO lines flushed every
    # SERVERY_LOG_FLUSH_MS.
    logs.configure(SETTINGS.log_format, SETTINGS.log_flush_ms / 1000.0)
    # BentoML's server logging leaves the root logger at WARNING; servery's own INFO lines (models
    # loaded and reloaded, shadow answers on "servery.shadow") are part of what an operator reads.
    logging.getLogger("servery").setLevel(logging.INFO)
    # OpenTelemetry from the OTEL_* variables (services/ops/tracing.py): read once here; BentoML's
    # own spans are moved onto the same pipeline before BentoML builds any app.
    tracing.configure(trace_predictions=SETTINGS.trace_predictions)
    # The fast path's wrapper is also the body-size check and the API-key gate: always installed.
    fastpath.install(
        timeout_s=SETTINGS.request_timeout_s,
        fast=SETTINGS.fast_path and not SETTINGS.trace_predictions,
        max_body_bytes=SETTINGS.max_body_bytes,
        max_in_flight=SETTINGS.max_in_flight,
        max_bytes_in_flight=SETTINGS.max_bytes_in_flight,
    )
    _wired = True


def __getattr__(name: str) -> Any:
    """``services.Router`` and the other services: wire the process, then import the service."""
    module = _SERVICES.get(name)
    if module is None:
        raise AttributeError(f"module 'services' has no attribute {name!r}")
    wire()
    service = getattr(importlib.import_module(module), name)
    globals()[name] = service  # later lookups skip this function
    return service

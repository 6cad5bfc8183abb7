"""servery's BentoML services. The Bento entry point is ``services:Router``.

Importing this package applies the BentoML fixes in :mod:`services.compat.patches` before BentoML
builds
any app, and stays cheap: torch and xgboost load only when a model of theirs is loaded.
"""

from __future__ import annotations

import logging

from services.compat import patches
from services.gateway import fastpath
from services.ops import logs
from services.settings import SETTINGS

patches.apply()
# BentoML configured this worker's logging before importing the service: request ids on every
# line, JSON lines if asked for (SERVERY_LOG_FORMAT), INFO lines flushed every SERVERY_LOG_FLUSH_MS.
logs.configure(SETTINGS.log_format, SETTINGS.log_flush_ms / 1000.0)
# BentoML's server logging leaves the root logger at WARNING; servery's own INFO lines (models
# loaded and reloaded, shadow answers on "servery.shadow") are part of what an operator reads.
logging.getLogger("servery").setLevel(logging.INFO)
_fast = SETTINGS.fast_path and not SETTINGS.trace_predictions
# The fast path's wrapper is also the body-size check and the API-key gate: always installed.
fastpath.install(
    timeout_s=SETTINGS.request_timeout_s,
    fast=_fast,
    max_body_bytes=SETTINGS.max_body_bytes,
    max_in_flight=SETTINGS.max_in_flight,
)

from services.frameworks.sklearn_service import SklearnService  # noqa: E402
from services.frameworks.torch_service import TorchService  # noqa: E402
from services.frameworks.xgboost_service import XGBoostService  # noqa: E402
from services.gateway.router import Router  # noqa: E402
from services.llm.service import LLM  # noqa: E402  (vLLM loads only when engines start)

__all__ = ["LLM", "Router", "SklearnService", "TorchService", "XGBoostService"]

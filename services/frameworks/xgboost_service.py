"""The XGBoost service: every XGBoost model placed ``service`` in the model config."""

from __future__ import annotations

import bentoml

from models.config import Framework
from services.frameworks.base import FrameworkService, service_config


@bentoml.service(name="xgboost", **service_config())
class XGBoostService(FrameworkService):
    """XGBoost models in their own process, with BentoML adaptive batching on ``predict``."""

    framework = Framework.XGBOOST

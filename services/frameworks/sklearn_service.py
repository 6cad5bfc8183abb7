"""The scikit-learn service: every scikit-learn model placed ``service`` in the model config."""

from __future__ import annotations

import bentoml

from models.config import Framework
from services.frameworks.base import FrameworkService, service_config


@bentoml.service(name="sklearn", **service_config())
class SklearnService(FrameworkService):
    """scikit-learn models in their own process, with BentoML adaptive batching on ``predict``."""

    framework = Framework.SKLEARN

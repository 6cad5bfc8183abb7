"""Model-store side of servery: settings, the model config, and the on-disk model format.

Importing the package imports nothing else (the names below load on first use): a ``.pth`` file
in servery's environment imports :mod:`models.xgboost_dist` at every interpreter start.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "models.config",
    "Framework": "models.config",
    "ModelConfig": "models.config",
    "ModelEntry": "models.config",
    "Placement": "models.config",
    "Settings": "models.config",
    "load_model_config": "models.config",
    "parse_model_config": "models.config",
    "StoreError": "models.store",
    "build_mlp": "models.store",
    "data_sha256": "models.store",
    "get_model": "models.store",
    "load_object": "models.store",
    "save_model": "models.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

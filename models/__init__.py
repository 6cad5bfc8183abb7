"""Model-store side of servery: settings, the model config, and the on-disk model format."""

from __future__ import annotations

from models.config import (
    ConfigError,
    Framework,
    ModelConfig,
    ModelEntry,
    Placement,
    Settings,
    load_model_config,
    parse_model_config,
)
from models.store import StoreError, build_mlp, data_sha256, get_model, load_object, save_model

__all__ = [
    "ConfigError",
    "Framework",
    "ModelConfig",
    "ModelEntry",
    "Placement",
    "Settings",
    "StoreError",
    "build_mlp",
    "data_sha256",
    "get_model",
    "load_model_config",
    "load_object",
    "parse_model_config",
    "save_model",
]

"""What the serving processes should serve now: the models file, the store and the aliases, read
together into one :class:`Desired` state, plus a cheap fingerprint to notice when it changes.

BentoML resolves ``name:latest`` once, when a service starts (bentoml#754 asks for more); servery's
processes poll instead: every ``SERVERY_RELOAD_INTERVAL_S`` they compare :func:`fingerprint` (a few
``stat`` calls per model, no file reads) with the last one and only on a change read everything
again (:func:`desired`) and reconcile (``services/runtime/registry.py``,
``services/frameworks/base.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from models.aliases import AliasError, AliasStore
from models.config import (
    ConfigError,
    ModelConfig,
    empty_model_config,
    load_model_config,
    salvage_model_config,
)
from models.versions import ModelPlan, PlanError, plan_model


@dataclass(frozen=True)
class Desired:
    """The config and, per served name, its plan or the reason it has none."""

    config: ModelConfig
    plans: dict[str, ModelPlan]
    errors: dict[str, str] = field(default_factory=dict)
    config_error: str | None = None
    """Why the models file could not be used as a whole (``config`` then holds what
    :func:`first_desired` salvaged from it)."""


def desired(config: ModelConfig, aliases: AliasStore) -> Desired:
    """Plan every model of ``config`` against the store (errors are per model, never raised)."""
    plans: dict[str, ModelPlan] = {}
    errors: dict[str, str] = {}
    for entry in config.models:
        try:
            plans[entry.name] = plan_model(
                entry,
                aliases.versions(entry.store_name),
                aliases.read(entry.store_name).aliases,
            )
        except (PlanError, AliasError) as e:
            errors[entry.name] = str(e)
    return Desired(config=config, plans=plans, errors=errors)


def read_desired(models_file: Path | str, aliases: AliasStore) -> Desired:
    """:func:`desired` for the config in ``models_file`` (raises ``ConfigError`` if unreadable)."""
    return desired(load_model_config(models_file), aliases)


def first_desired(models_file: Path | str, aliases: AliasStore) -> Desired:
    """:func:`read_desired` for a process starting: never raises. With an invalid models file it
    serves the entries that are valid on their own (:func:`models.config.salvage_model_config`),
    or nothing, and says why in ``config_error``, so a pod started after a bad promote serves
    what it can and keeps polling for a fixed file instead of crash-looping."""
    try:
        return read_desired(models_file, aliases)
    except ConfigError as e:
        error = str(e)
    try:
        config, invalid = salvage_model_config(models_file)
    except ConfigError:
        config, invalid = empty_model_config(), {}
    state = desired(config, aliases)
    return Desired(config, state.plans, {**invalid, **state.errors}, config_error=error)


def fingerprint(
    models_file: Path | str, config: ModelConfig | None, aliases: AliasStore
) -> tuple[object, ...]:
    """Changes whenever the models file, a model's versions or its aliases change."""
    try:
        st = os.stat(models_file)  # follows symlinks: a Kubernetes ConfigMap swap shows here
        out: list[object] = [(st.st_mtime_ns, st.st_ino, st.st_size)]
    except OSError:
        out = [None]
    if config is not None:
        for name in sorted({m.store_name for m in config.models}):
            out.append(aliases.fingerprint(name))
    return tuple(out)

"""Which versions a framework service holds, as plain functions (unit-testable, no BentoML).

Used by :class:`services.frameworks.base.FrameworkService`: the per-name table the row validator
reads, the plans of ``service``-placed models, and which idle, unplanned versions to unload.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from models.config import ModelConfig, ModelEntry, Placement
from models.versions import ModelPlan
from services.runtime.predictors import Runtime

Key = tuple[str, str]
"""(served name, version)"""

UNLOAD_GRACE_MIN_S = 30.0


@dataclass(frozen=True)
class Served:
    """One served name's loaded versions, as the row validator sees them (replaced, not mutated)."""

    default: str | None
    runtimes: Mapping[str, Runtime]

    def get(self, version: str | None) -> Runtime | None:
        version = version or self.default
        return None if version is None else self.runtimes.get(version)


def unload_grace_s(interval_s: float) -> float:
    """How long an unplanned version must sit unused before it is unloaded."""
    return max(UNLOAD_GRACE_MIN_S, 5 * interval_s)


def served_table(runtimes: Mapping[Key, Runtime], defaults: Mapping[str, str]) -> dict[str, Served]:
    """What :data:`_LOADED` should hold for these loaded versions and per-name defaults."""
    by_name: dict[str, dict[str, Runtime]] = defaultdict(dict)
    for (name, version), runtime in runtimes.items():
        by_name[name][version] = runtime
    return {
        name: Served(defaults[name] if defaults.get(name) in versions else None, versions)
        for name, versions in by_name.items()
    }


def idle_unplanned(
    loaded: Iterable[Key], keep: set[Key], last_used: Mapping[Key, float], now: float, grace: float
) -> list[Key]:
    """Loaded versions outside ``keep`` that nothing used for ``grace`` seconds."""
    return [k for k in loaded if k not in keep and now - last_used.get(k, float("-inf")) >= grace]


def service_entry(config: ModelConfig, model: str) -> ModelEntry | None:
    for entry in config.models:
        if entry.name == model and config.placement_of(entry) is Placement.SERVICE:
            return entry
    return None


def service_plans(config: ModelConfig, plans: Mapping[str, ModelPlan]) -> dict[str, ModelPlan]:
    """The plans of the models placed ``service`` (any framework: it is known per version)."""
    return {
        e.name: plans[e.name]
        for e in config.models
        if config.placement_of(e) is Placement.SERVICE and e.name in plans
    }

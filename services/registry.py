"""The router's table of served models: name -> info, placement and micro-batcher."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.config import Framework, ModelConfig, Placement, Settings
from services import metrics
from services.batcher import MicroBatcher, Result
from services.errors import ModelNotFound
from services.runtimes import ModelInfo, load_info, load_runtime

logger = logging.getLogger("servery")

# (served name, version, rows) -> (class indices, probabilities), answered by a framework service
RemotePredict = Callable[[str, str, np.ndarray], Awaitable[Result]]


@dataclass
class ServedModel:
    info: ModelInfo
    placement: Placement
    batcher: MicroBatcher

    def describe(self) -> dict[str, Any]:
        return {**self.info.describe(), "placement": self.placement.value, "ready": True}


class Registry:
    """Looks up served models by name and (optional) version; raises ModelNotFound otherwise."""

    def __init__(self, models: Mapping[str, ServedModel]) -> None:
        self._models = dict(models)

    def __len__(self) -> int:
        return len(self._models)

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        served = self._models.get(name)
        if served is None:
            raise ModelNotFound(
                f"model '{name}' is not served; served models: {sorted(self._models)}",
                param="model",
            )
        if version is not None and version != served.info.version:
            raise ModelNotFound(
                f"model '{name}' has no served version '{version}'; "
                f"served: '{served.info.version}'",
                param="version",
            )
        return served

    def describe(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self._models.values()]


def _batch_hook(info: ModelInfo, placement: Placement) -> Callable[[int, int], None]:
    rows_hist = metrics.BATCH_SIZE.labels(info.name, info.version, placement.value)
    reqs_hist = metrics.BATCH_REQUESTS.labels(info.name, info.version, placement.value)

    def on_batch(rows: int, requests: int) -> None:
        rows_hist.observe(rows)
        reqs_hist.observe(requests)

    return on_batch


def build_registry(
    config: ModelConfig, settings: Settings, remote: Mapping[Framework, RemotePredict]
) -> Registry:
    """Load inline models and resolve service-placed ones; fails loudly if any model is missing."""
    served: dict[str, ServedModel] = {}
    for entry in config.models:
        placement = config.placement_of(entry)
        if placement is Placement.INLINE:
            runtime = load_runtime(entry, settings.model_threads)
            info, predict, is_async = runtime.info, runtime.predict, False
        else:
            info, _ = load_info(entry)
            call = remote[info.framework]

            async def predict(x: np.ndarray, _call=call, _info=info) -> Result:
                return await _call(_info.name, _info.version, x)

            is_async = True
        batcher = MicroBatcher(
            predict,
            max_batch_size=config.batch_size_of(entry, settings),
            is_async=is_async,
            hold_s=settings.batch_hold_ms / 1000.0,
            on_batch=_batch_hook(info, placement),
        )
        served[entry.name] = ServedModel(info=info, placement=placement, batcher=batcher)
        logger.info("serving %s as '%s' (%s, %s)", info.tag, info.name, info.framework, placement)
    return Registry(served)

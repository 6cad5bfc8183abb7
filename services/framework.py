"""What the three framework services share: load their models, batch, predict.

Each framework service (``sklearn_service.py``, ``xgboost_service.py``, ``torch_service.py``) is a
thin ``@bentoml.service`` subclass of :class:`FrameworkService` naming its framework. It loads every
model of that framework whose placement is ``service`` in the model config, and offers:

* ``predict`` — public, BentoML adaptive batching (``batchable=True``); body
  ``{"rows": [{"model": "iris", "inputs": [5.1, 3.5, 1.4, 0.2]}, ...]}``, one result per row.
  Each request is validated on its own before it joins a batch, so a bad one fails alone.
* ``predict_batch`` — what the router calls with a whole micro-batch of validated rows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Annotated, Any, ClassVar

import bentoml
import numpy as np
from pydantic import AfterValidator, BaseModel, Field, Strict
from pydantic_core import PydanticCustomError

from models.config import Framework, Placement, load_model_config
from services.errors import ModelNotFound, error_response
from services.patches import freeze_heap
from services.runtimes import Runtime, load_info, load_runtime
from services.settings import SETTINGS

logger = logging.getLogger("servery")

# The models this process serves, filled by FrameworkService.__init__. Request validators run in
# BentoML's input parsing, before the service instance is reachable, so they look models up here.
_LOADED: dict[str, Runtime] = {}

Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]


class Row(BaseModel):
    """One row for one model."""

    model: str = Field(description="Served model name")
    version: str | None = Field(None, description="Exact version id; default: the served one")
    inputs: list[Number] = Field(description="Feature values of one row", min_length=1)


def _check_row(row: Row) -> Row:
    runtime = _LOADED.get(row.model)
    if runtime is None or (row.version is not None and row.version != runtime.info.version):
        raise PydanticCustomError(
            "model_not_found",
            "model '{model}' (version {version}) is not served here; served: {served}",
            {"model": row.model, "version": row.version or "any", "served": sorted(_LOADED)},
        )
    info = runtime.info
    if len(row.inputs) != info.n_features:
        raise ValueError(
            f"model '{row.model}' expects {info.n_features} features, got {len(row.inputs)}"
        )
    with np.errstate(over="ignore"):
        if not np.isfinite(np.asarray(row.inputs, dtype=info.dtype)).all():
            raise ValueError(f"inputs overflow {info.dtype.name}, the input type of '{row.model}'")
    return row


CheckedRow = Annotated[Row, AfterValidator(_check_row)]


class RowResult(BaseModel):
    model: str
    version: str
    prediction: int
    label: str
    probabilities: list[float]


def service_config() -> dict[str, Any]:
    """``@bentoml.service`` options shared by the framework services."""
    return {
        "workers": SETTINGS.service_workers,
        "traffic": {"timeout": SETTINGS.request_timeout_s},
        # BentoML 1.4.40's client (``_bentoml_impl/client/proxy2.py``, SessionManager) closes its
        # HTTP session every 100 requests or 300 s while calls are still in flight: the router
        # lost 10-32 % of requests at c=16-64 (bentoml/BentoML#5540, fix in PR #5541/#5698).
        # Calls go over a local Unix socket, so recycling the session buys nothing: never do it.
        "runner_connection": {"max_requests": 2**62, "max_age": 1e12},
    }


class FrameworkService:
    """Base class; subclasses set ``framework`` and are decorated with ``@bentoml.service``."""

    framework: ClassVar[Framework]

    def __init__(self) -> None:
        config = load_model_config(SETTINGS.models_file)
        self.runtimes: dict[str, Runtime] = {}
        for entry in config.models:
            if config.placement_of(entry) is not Placement.SERVICE:
                continue
            info, _ = load_info(entry)
            if info.framework is not self.framework:
                continue
            self.runtimes[entry.name] = load_runtime(entry, SETTINGS.model_threads)
            logger.info("%s service loaded %s as '%s'", self.framework, info.tag, entry.name)
        _LOADED.clear()
        _LOADED.update(self.runtimes)
        freeze_heap()

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.service_max_batch_size,
        max_latency_ms=SETTINGS.service_max_latency_ms,
    )
    async def predict(self, rows: list[CheckedRow]) -> list[RowResult]:
        """Predict rows of any models this service holds (adaptive batching across requests)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            groups[row.model].append(i)
        results: list[RowResult | None] = [None] * len(rows)
        for name, idx in groups.items():
            runtime = self.runtimes[name]
            info = runtime.info
            x = np.asarray([rows[i].inputs for i in idx], dtype=info.dtype)
            labels, proba = runtime.predict(x)
            for i, k, p in zip(idx, labels.tolist(), proba.tolist(), strict=True):
                results[i] = RowResult(
                    model=name,
                    version=info.version,
                    prediction=k,
                    label=info.class_names[k] if k < len(info.class_names) else str(k),
                    probabilities=p,
                )
        return results  # type: ignore[return-value]

    @bentoml.api
    async def predict_batch(self, model: str, version: str, inputs: np.ndarray) -> Any:
        """Internal: predict a validated micro-batch from the router (pickled numpy in and out)."""
        runtime = self.runtimes.get(model)
        if runtime is None or runtime.info.version != version:
            return error_response(ModelNotFound(f"model '{model}:{version}' is not served here"))
        if inputs.ndim != 2 or inputs.shape[1] != runtime.info.n_features:
            raise ValueError(f"router sent a {inputs.shape} batch for model '{model}'")
        labels, proba = runtime.predict(inputs)
        return {"labels": labels, "probabilities": proba}

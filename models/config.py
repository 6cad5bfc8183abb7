"""Typed settings and the model config: which models the Bento serves, and where.

Two layers, both validated with pydantic:

* :class:`Settings` — process-wide knobs from ``SERVERY_*`` environment variables (or a
  ``.env`` file). Read once at import of the services module and passed down; request paths
  never read the environment.
* :class:`ModelConfig` — the YAML file named by ``SERVERY_MODELS_FILE`` listing the served
  models. Adding a model of a known framework is one entry here; no new service class.

Example ``models.yaml``::

    defaults:
      placement: inline        # inline | service
    models:
      - name: iris             # the name clients send in "model"
        tag: iris:latest       # BentoML store tag (default: "<name>:latest")
      - name: digits
        placement: service     # run in the PyTorch service process instead
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODELS_FILE = Path(__file__).with_name("models.yaml")

# BentoML tag names: lowercase alphanumerics, "-", "_" and "."; we use the same for served names so
# a served name can never smuggle path separators or whitespace into URLs, metrics or logs.
NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?\Z")


class Framework(StrEnum):
    SKLEARN = "sklearn"
    XGBOOST = "xgboost"
    PYTORCH = "pytorch"


class Placement(StrEnum):
    INLINE = "inline"
    """Loaded in every router worker; requests are merged by the router's asyncio micro-batcher."""
    SERVICE = "service"
    """Loaded in the framework's own BentoML service; the router sends it whole micro-batches."""


class ConfigError(ValueError):
    """The model config file is missing, unreadable or invalid."""


class Settings(BaseSettings):
    """Process-wide settings, from ``SERVERY_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SERVERY_", env_file=".env", extra="ignore")

    models_file: Path = DEFAULT_MODELS_FILE
    """YAML file listing the served models (see :class:`ModelConfig`)."""

    router_workers: int = Field(2, ge=1, le=64)
    """Router worker processes. Each loads every inline model; 2 saturates a 2-core machine."""

    max_batch_size: int = Field(64, ge=1, le=65536)
    """Most rows the router's micro-batcher merges into one ``predict`` call."""

    batch_hold_ms: float = Field(2.0, ge=0, le=100)
    """How long the micro-batcher may hold a lone request for company when that pays (under load:
    gRPC calls reach a router worker one at a time, so without a hold every call is its own
    batch). Holds that gather nobody back off, so sequential traffic is almost never held. 0
    turns holds off; uvloop timers have 1 ms resolution, so values under 1 mean off."""

    max_rows_per_request: int = Field(1024, ge=1)
    """Most rows one request may carry; more is rejected with 413."""

    service_max_batch_size: int = Field(64, ge=1)
    """BentoML adaptive batching on the framework services' public ``predict``: batch cap."""

    service_max_latency_ms: int = Field(50, ge=1)
    """BentoML adaptive batching: latency budget before a request is answered 503 (overloaded)."""

    service_workers: int = Field(1, ge=1, le=64)
    """Worker processes of each framework service."""

    model_threads: int = Field(1, ge=1, le=256)
    """Threads one model call may use (torch intra-op, XGBoost nthread). 1 suits many workers."""

    request_timeout_s: float = Field(60.0, gt=0)
    """BentoML traffic timeout for every service (504 after this many seconds)."""

    trace_predictions: bool = False
    """Record OpenTelemetry spans for ``/predict`` and ``/v2/models/...`` requests. Off by
    default: BentoML builds spans even when none are exported, a large share of the router's CPU
    per request; turn it on together with a tracing exporter in BentoML's configuration."""

    fast_path: bool = True
    """Serve ``POST /predict`` and ``POST /v2/models/.../infer`` straight from the router's ASGI
    entry instead of through BentoML's per-request middleware (context, traffic metrics, tracing,
    access log, timeout): about 4x the requests per second on this project's 2-core machines.
    servery keeps its own per-model request counters, latency histogram, access log line and
    timeout on that path. Off when ``trace_predictions`` is on, so traced requests keep BentoML's
    spans."""

    grpc_enabled: bool = True
    """Serve the Open Inference Protocol V2 over gRPC from every router worker."""

    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds: loopback by default, ``0.0.0.0`` to accept remote clients."""

    grpc_port: int = Field(3001, ge=1, le=65535)
    """Port of the gRPC server. Every router worker binds it (``SO_REUSEPORT``) and the kernel
    spreads client connections, not single calls, across the workers."""


class ModelDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    placement: Placement = Placement.INLINE
    max_batch_size: int | None = Field(None, ge=1)


class ModelEntry(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(description="Name clients use in requests")]
    tag: str | None = Field(None, description="BentoML store tag; default '<name>:latest'")
    framework: Framework | None = Field(
        None, description="Overrides the 'framework' label stored with the model"
    )
    placement: Placement | None = None
    max_batch_size: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                f"model name {v!r} must be 1-64 lowercase letters, digits, '.', '_' or '-'"
            )
        return v

    @property
    def store_tag(self) -> str:
        tag = self.tag or self.name
        return tag if ":" in tag else f"{tag}:latest"


class ModelConfig(BaseModel):
    """The parsed model config file."""

    model_config = ConfigDict(extra="forbid")

    defaults: ModelDefaults = ModelDefaults()
    models: list[ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ModelConfig:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"model {m.name!r} is listed twice")
            seen.add(m.name)
        return self

    def placement_of(self, entry: ModelEntry) -> Placement:
        return entry.placement or self.defaults.placement

    def batch_size_of(self, entry: ModelEntry, settings: Settings) -> int:
        return entry.max_batch_size or self.defaults.max_batch_size or settings.max_batch_size


def parse_model_config(data: Any, source: str = "<config>") -> ModelConfig:
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid model config {source}: {e}") from e


def load_model_config(path: Path | str) -> ModelConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read model config {path}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"model config {path} is not valid YAML: {e}") from e
    return parse_model_config(data, str(path))

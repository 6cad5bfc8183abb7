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
        version_policy:        # which stored versions to serve (default: latest: 1)
          latest: 2            # or  all: true  or  specific: [<version>, ...]
        routing:               # optional traffic split over aliases / versions
          split: {production: 90, staging: 10}
          shadow: candidate    # gets a copy of the traffic; answers recorded, never returned

Every version an alias points at is served too (``servery models promote``), and the models file,
the store and the aliases are re-read while serving (``SERVERY_RELOAD_INTERVAL_S``).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODELS_FILE = Path(__file__).with_name("models.yaml")

# BentoML tag names: lowercase alphanumerics, "-", "_" and "."; we use the same for served names so
# a served name can never smuggle path separators or whitespace into URLs, metrics or logs.
NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?\Z")
VERSION_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?\Z")
"""A stored version id (BentoML's rule for a tag's version: at most 63 characters)."""


def check_model_name(name: object) -> str:
    """``name`` if it is a valid model name (served or stored), else ValueError saying why.

    The one rule for every name that becomes a path in the store or a label: the models file's
    names and tags, and the names ``servery models import`` reads from file names (``..`` or
    ``a/b`` never reach a path)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r} must be 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


class Framework(StrEnum):
    SKLEARN = "sklearn"
    XGBOOST = "xgboost"
    PYTORCH = "pytorch"
    ONNX = "onnx"
    """ONNX Runtime; inline only (no framework service hosts it)."""


class Postprocess(StrEnum):
    """What to make of a raw-tensor model's first output (its logits)."""

    NONE = "none"
    SOFTMAX = "softmax"
    """Classifier: ``predict_proba`` = softmax, ``predict`` = its argmax."""
    ARGMAX = "argmax"
    """Classifier without probabilities: ``predict`` = the argmax."""


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

    max_queue: int = Field(256, ge=1, le=1_000_000)
    """Load shedding: requests one model version may have unanswered (waiting for or in a model
    call) in one router worker; the next is answered 503 with ``Retry-After`` at once instead of
    queueing. Bounds the latency of admitted requests to about this many / the model's
    throughput. Per model: ``max_queue`` in the models file (or its ``defaults``)."""

    max_in_flight: int = Field(256, ge=0, le=1_000_000)
    """Load shedding ahead of the models: prediction requests (``/predict``, OIP REST infer) one
    router worker may have unanswered; the next is answered 503 ``overloaded`` with
    ``Retry-After`` before its body is parsed. Where the router's HTTP front end, not a
    model, is what saturates, requests otherwise pile up in the worker's event loop with no
    bound on their latency. OpenAI API requests (``/v1/``, streams included) count too. 0 turns
    it off; also off with ``SERVERY_FAST_PATH=false``."""

    max_bytes_in_flight: int = Field(16 * 2**20, ge=0, le=2**34)
    """Memory admission: request-body bytes one router worker may hold at once, every route
    (16 MiB). A request is admitted before any of its body is read when its ``Content-Length``
    (a chunked body: ``max_body_bytes``) fits beside the bodies in flight, or when nothing is in
    flight; else it is answered 503 ``overloaded`` with ``Retry-After``. Parsing costs a multiple
    of the body (JSON numbers become Python objects), so this, not ``max_in_flight`` x
    ``max_body_bytes`` (4 GiB by default), is what bounds a worker's memory under large
    bodies. 0 turns it off."""

    max_body_bytes: int = Field(16 * 2**20, ge=1024, le=2**31)
    """Largest request body the router reads (16 MiB); a larger one is answered 413 from its
    ``Content-Length`` before any of it is read (a chunked body: once the limit is passed). Also
    bounds LLM prompts sent through ``/v1/``."""

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

    shutdown_drain_s: float = Field(5.0, ge=0, le=300)
    """On SIGTERM, the framework services and the LLM service keep serving this long before their
    graceful shutdown (finish what is in flight, then stop), so requests the router admitted just
    before still find them up (services/ops/shutdown.py). 0: stop at once. Keep it well inside the
    orchestrator's grace period (Kubernetes ``terminationGracePeriodSeconds``)."""

    request_timeout_s: float = Field(60.0, gt=0)
    """BentoML traffic timeout for every service (504 after this many seconds)."""

    trace_predictions: bool = False
    """Record OpenTelemetry spans for ``/predict``, ``/v2/models/...`` and the OpenAI API under
    ``/v1/`` (router and LLM service). Off by default: BentoML builds spans even when none are
    exported, a large share of the router's CPU per request (and per streamed chunk); turn it on
    together with a tracing exporter in BentoML's configuration."""

    log_format: Literal["text", "json"] = "text"
    """``json``: every log line of every server process is one JSON object (time, level, logger,
    component, message, request_id, trace ids, and an access line's method, path, status,
    latency_ms, model, version); ``text``: BentoML's format. The Kubernetes manifests use json.
    See services/ops/logs.py."""

    log_flush_ms: float = Field(100.0, ge=0, le=10_000)
    """Most time an access-log line waits in its process before it is written out (nginx's
    ``access_log ... flush=``): one write per interval instead of one per request. Any other log
    line, exit and SIGTERM flush them at once. 0 writes every line as it is logged."""

    fast_path: bool = True
    """Serve ``POST /predict`` and ``POST /v2/models/.../infer`` straight from the router's ASGI
    entry instead of through BentoML's per-request middleware (context, traffic metrics, tracing,
    access log, timeout): about 4x the requests per second on this project's 2-core machines.
    servery keeps its own per-model request counters, latency histogram, access log line and
    timeout on that path. Off when ``trace_predictions`` is on, so traced requests keep BentoML's
    spans."""

    llm_enabled: bool = True
    """Run the LLM service (``services/llm/service.py``, vLLM) beside the router and serve its
    OpenAI API on the router's port under ``/v1``. Off: the Bento serves classifiers only and
    never imports vLLM (the test servers of the classifier suites run that way)."""

    grpc_enabled: bool = True
    """Serve the Open Inference Protocol V2 over gRPC from every router worker."""

    grpc_max_concurrent_rpcs: int = Field(64, ge=1, le=100_000)
    """Calls one router worker's gRPC server runs at once (grpc.aio's
    ``maximum_concurrent_rpcs``); more are refused with ``RESOURCE_EXHAUSTED``. With gRPC's 4 MiB
    message limit this bounds the memory gRPC requests can hold (64 x 4 MiB)."""

    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds: loopback by default, ``0.0.0.0`` to accept remote clients."""

    reload_interval_s: float = Field(2.0, ge=0.2, le=3600)
    """How often every serving process checks the models file, the store and the aliases for
    changes (a few ``stat`` calls per model) and, when something changed, loads the versions now
    needed, switches atomically and unloads the rest. A new version or a moved alias answers
    within this delay plus its load time; ``POST /admin/reload`` reloads at once."""

    admin_token: str | None = Field(None, min_length=16)
    """When set, ``POST /admin/reload`` needs ``Authorization: Bearer <token>``."""

    api_keys: SecretStr | None = None
    """Comma-separated API keys, each plaintext (16+ characters) or ``sha256:<hex digest>``;
    named ``env-1``, ``env-2``, ... Any key here or in ``api_keys_file`` turns authentication on:
    every request but the probes and ``/metrics`` then needs ``Authorization: Bearer <key>``
    (gRPC: ``authorization`` metadata). Unset or empty: no keys (local use);
    services/gateway/auth.py."""

    api_keys_file: Path | None = None
    """YAML/JSON file of named keys with optional allowed models and rate limits (e.g. a mounted
    Kubernetes Secret); each router worker re-reads it when it changes (rotation without a
    restart, within ``SERVERY_RELOAD_INTERVAL_S``); format in services/gateway/auth.py and
    docs/security.md."""

    rate_limit_requests_per_minute: float | None = Field(None, gt=0)
    """Requests per minute per API key, for keys whose entry sets none (unset: unlimited). A
    token bucket holding one minute's worth; each router worker enforces this divided by
    ``router_workers``."""

    rate_limit_tokens_per_minute: float | None = Field(None, gt=0)
    """LLM tokens per minute per API key, for keys whose entry sets none (unset: unlimited). A
    completion is charged ``max_tokens`` (or ``max_completion_tokens``) times ``n`` up front;
    divided by ``router_workers`` like the request limit."""

    rate_limit_default_max_tokens: int = Field(1024, ge=1)
    """Tokens charged to a completion request that sends no ``max_tokens`` (the engine may
    generate up to the context length), for keys with a token limit."""

    grpc_port: int = Field(3001, ge=1, le=65535)
    """Port of the gRPC server. Every router worker binds it (``SO_REUSEPORT``) and the kernel
    spreads client connections, not single calls, across the workers."""


class ModelDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    placement: Placement = Placement.INLINE
    max_batch_size: int | None = Field(None, ge=1)
    max_queue: int | None = Field(None, ge=1)


class VersionPolicy(BaseModel):
    """Which stored versions a model serves, as in Triton's ``version_policy``.

    At most one of ``latest`` (the newest N by creation time), ``all`` or ``specific`` (version
    ids or unique prefixes); none means ``latest: 1``. Versions named by an alias or by the
    model's routing table are served in addition.
    """

    model_config = ConfigDict(extra="forbid")

    latest: int | None = Field(None, ge=1, le=1024)
    all: bool = False
    specific: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        kinds = [
            k
            for k, on in (("latest", self.latest), ("all", self.all), ("specific", self.specific))
            if on
        ]
        if len(kinds) > 1:
            raise ValueError(f"version_policy takes one of latest, all, specific; got {kinds}")
        if not kinds:
            self.latest = 1
        return self

    def describe(self) -> str:
        if self.all:
            return "all"
        if self.specific:
            return "specific: " + ", ".join(self.specific)
        return f"latest: {self.latest}"


class Routing(BaseModel):
    """A model's routing table: weighted split over versions/aliases and an optional shadow.

    Targets are alias names, version ids, unique version prefixes or ``latest``. Weights are
    relative (90/10 and 0.9/0.1 are the same split). A request without ``version`` is assigned a
    target at random by weight, or, when it carries ``X-Servery-Route-Key``, by a hash of the key,
    so one key always lands on the same target while the table is unchanged.
    """

    model_config = ConfigDict(extra="forbid")

    split: dict[str, float] | None = Field(None, min_length=1)
    shadow: str | None = None

    @field_validator("split")
    @classmethod
    def _check_weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if any(w < 0 or w != w or w == float("inf") for w in v.values()):
            raise ValueError("split weights must be finite numbers >= 0")
        if sum(v.values()) <= 0:
            raise ValueError("split weights must not all be 0")
        return v


class InputDecl(BaseModel):
    """One input of a model that does not record its own (TorchScript, a pickled PyTorch module,
    an estimator without ``n_features_in_``), or an override of what it records."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, description="Input name; default input-0 (input-<i> for several)"
    )
    datatype: Literal[
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    ] = "FP32"
    shape: list[Annotated[int, Field(ge=-1)]] = Field(
        description="Shape of one row, without the batch dimension ([] for a scalar column)"
    )


class ModelEntry(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(description="Name clients use in requests")]
    tag: str | None = Field(None, description="BentoML store tag; default '<name>:latest'")
    framework: Framework | None = Field(
        None,
        description="Overrides the framework read from the stored model (its BentoML module or "
        "servery's 'framework' label)",
    )
    inputs: list[InputDecl] | None = Field(
        None, min_length=1, description="The model's inputs, for models that do not record them"
    )
    postprocess: Postprocess | None = Field(
        None, description="Raw-tensor models: softmax or argmax of the first output"
    )
    class_names: list[str] | None = Field(
        None, min_length=1, description="Class labels, in the order of the model's outputs"
    )
    placement: Placement | None = None
    max_batch_size: int | None = Field(None, ge=1)
    max_queue: int | None = Field(
        None, ge=1, description="Requests per version and router worker before 503 (load shedding)"
    )
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    routing: Routing | None = None

    @model_validator(mode="after")
    def _pinned_tag_is_a_policy(self) -> ModelEntry:
        # "tag: iris:<version>" (the foundation's way to pin) is "version_policy: specific".
        pinned = self.pinned_version
        if pinned is not None:
            same = self.version_policy.specific == [pinned]
            if "version_policy" in self.model_fields_set and not same:
                raise ValueError(
                    f"model {self.name!r}: tag {self.tag!r} pins a version; use either a "
                    "versioned tag or version_policy, not both"
                )
            self.version_policy = VersionPolicy(specific=[pinned])
        return self

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("tag")
    @classmethod
    def _check_tag(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name, _, version = v.partition(":")
        check_model_name(name)  # the store name is a folder of the store
        if ":" in v and version != "latest" and not VERSION_RE.match(version):
            raise ValueError(f"tag {v!r}: version {version!r} is not a version id")
        return v

    @property
    def store_tag(self) -> str:
        tag = self.tag or self.name
        return tag if ":" in tag else f"{tag}:latest"

    @property
    def store_name(self) -> str:
        """The model's name in the BentoML store (the tag without its version)."""
        return self.store_tag.split(":", 1)[0]

    @property
    def pinned_version(self) -> str | None:
        version = self.store_tag.split(":", 1)[1]
        return None if version == "latest" else version


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

    def queue_of(self, entry: ModelEntry, settings: Settings) -> int:
        return entry.max_queue or self.defaults.max_queue or settings.max_queue


def parse_model_config(data: Any, source: str = "<config>") -> ModelConfig:
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid model config {source}: {e}") from e


def read_config_text(path: Path | str, what: str = "model config") -> str:
    """The UTF-8 text of ``path``; ConfigError if it cannot be read or is not UTF-8 (a
    ``UnicodeDecodeError`` is a ValueError no caller expects from a read)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})"
        ) from None


def _load_yaml(path: Path) -> Any:
    text = read_config_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"model config {path} is not valid YAML: {e}") from e


def load_model_config(path: Path | str) -> ModelConfig:
    """The model config in ``path``; ConfigError (a ValueError) for anything wrong with it."""
    path = Path(path)
    return parse_model_config(_load_yaml(path), str(path))


def empty_model_config() -> ModelConfig:
    """A config serving nothing (what a process starts with when its file cannot be used)."""
    return ModelConfig.model_construct(defaults=ModelDefaults(), models=[])


def salvage_model_config(path: Path | str) -> tuple[ModelConfig, dict[str, str]]:
    """For a process starting with an invalid models file: the entries that are valid on their
    own (with valid ``defaults``), and why each other one is left out, by its name (or
    ``models[i]`` where the name itself is invalid). A name listed twice is left out both times.
    Raises ConfigError when nothing can be salvaged (unreadable, not YAML, no ``models`` list,
    invalid ``defaults``); a reload never salvages: it keeps the previous config instead."""
    path = Path(path)
    data = _load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ConfigError(f"model config {path} has no 'models' list")
    try:
        defaults = ModelDefaults.model_validate(data.get("defaults") or {})
    except ValidationError as e:
        raise ConfigError(f"invalid 'defaults' in model config {path}: {e}") from e
    valid: dict[str, ModelEntry] = {}
    errors: dict[str, str] = {}
    for i, raw in enumerate(data["models"]):
        name = raw.get("name") if isinstance(raw, dict) else None
        key = name if isinstance(name, str) and NAME_RE.match(name) else f"models[{i}]"
        try:
            entry = ModelEntry.model_validate(raw)
        except ValidationError as e:
            errors[key] = f"invalid entry in model config {path}: {e}"
            continue
        if entry.name in valid or entry.name in errors:
            valid.pop(entry.name, None)
            errors[entry.name] = f"model {entry.name!r} is listed twice in {path}"
            continue
        valid[entry.name] = entry
    config = ModelConfig.model_construct(defaults=defaults, models=list(valid.values()))
    return config, errors

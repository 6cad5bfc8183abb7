"""The LLM config: one schema and one set of defaults for the LLM service, ``servery llm validate``
and ``deploy/components/llm/llm.yaml``.

The file (``SERVERY_LLM_MODELS_FILE``; the same file ``servery llm validate`` reads)::

    models:
      - name: chat                 # what clients send in "model"
        tag: smollm2:latest        # store tag of a Hugging Face-format LLM (models/llm_store.py)
        max_model_len: 4096        # every engine knob below is optional (EngineKnobs)
        gpu_memory_utilization: 0.45
        devices: [0]               # which of the service's GPUs (default: the first TP ones)
    tasks:                         # optional: task name -> LLM name
      small: chat
    gpu:                           # optional, for validate: the GPUs the deployment has
      memory_gib: 79.6             # what torch / nvidia-smi report, not the marketing size
      count: 1

An engine knob is taken from the model's entry, else from the service-wide ``SERVERY_LLM_<KNOB>``
(:class:`ServiceKnobs`), else from :data:`DEFAULTS`: :func:`resolve` is that rule, used by the
service (``services/llm/settings.py`` builds vLLM's flags from it) and by validate alike.
:func:`placement` puts each engine on its GPUs and refuses what cannot start: devices out of
range, tensor-parallel sizes that do not match, shares of one GPU adding up to more than 1.
:func:`check` adds the memory estimate (:mod:`models.llm_memory`). Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.config import NAME_RE
from models.llm_memory import estimate

Dtype = Literal["auto", "float32", "float", "bfloat16", "float16", "half"]
KvCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]


class LLMConfigError(ValueError):
    """The LLM config file is missing, unreadable or invalid."""


class EngineKnobs(BaseModel):
    """vLLM engine settings an LLM entry (or the service, for all) may set; None: not set here."""

    model_config = ConfigDict(extra="forbid")

    max_model_len: int | None = Field(None, ge=16)
    """Context length (prompt + completion tokens); default: the model's own."""
    dtype: Dtype | None = None
    """Weight and activation dtype; ``auto``: the model's (vLLM casts float32 to 16 bits)."""
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """Share of each of its GPUs' memory this engine may take (weights, activations, CUDA graphs
    and KV cache). Engines sharing a GPU need shares that add up to 1 or less."""
    tensor_parallel_size: int | None = Field(None, ge=1, le=64)
    """GPUs one engine shards the model over."""
    quantization: str | None = None
    """vLLM quantization method (``awq``, ``gptq``, ``fp8``, ...); default: as the weights say."""
    max_num_seqs: int | None = Field(None, ge=1)
    """Most sequences decoded together; default: vLLM's for the GPU (1024 on an H100)."""
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """Most tokens in one forward pass; default: vLLM's for the GPU (8192 on an H100)."""
    enforce_eager: bool | None = None
    """No CUDA graphs: less memory and a faster start, slower decoding."""
    kv_cache_dtype: KvCacheDtype | None = None
    """``fp8`` halves the KV cache of a 16-bit model; ``auto``: the activation dtype."""
    cpu_kvcache_gib: float | None = Field(None, gt=0)
    """On CPU: the KV cache in GiB (vLLM's ``kv_cache_memory_bytes``). Ignored on GPU."""
    # engine features (models/llm_features.py checks the names against vLLM's own lists)
    enable_auto_tool_choice: bool | None = None
    """``tool_choice: auto``: the model decides to call tools (needs ``tool_call_parser``).
    Named and ``required`` tool choices work without it (guided decoding)."""
    tool_call_parser: str | None = None
    """vLLM tool parser for the model's output format (``hermes``, ``llama3_json``, ...)."""
    tool_strict_level: str | None = None
    """How far guided decoding pins tool calls: ``function`` (the call envelope), ``parameter``
    (the arguments' JSON schema too, as if every tool were ``strict``); default ``auto``."""
    tool_parser_plugin: str | None = None
    """A Python file registering more tool parsers (vLLM's ``--tool-parser-plugin``)."""
    reasoning_parser: str | None = None
    """vLLM reasoning parser (``deepseek_r1``, ``qwen3``, ...): ``reasoning_content`` apart."""
    chat_template: str | None = None
    """Jinja text (has ``{`` or a newline), or a file in the stored version's folder."""
    structured_outputs_backend: str | None = None
    """Guided decoding backend (``auto``, ``xgrammar``, ``guidance``, ``outlines``, ...)."""
    structured_outputs_compact: bool | None = None
    """Guided JSON without free whitespace (vLLM's ``disable_any_whitespace``; xgrammar and
    guidance): small models otherwise may pad JSON with spaces until ``max_tokens``."""
    enable_prefix_caching: bool | None = None
    """Reuse the KV cache of shared prompt prefixes; default: vLLM's (on)."""
    max_loras: int | None = Field(None, ge=1)
    """LoRA adapters in one batch (vLLM's ``max_loras``); with ``adapters`` only."""
    max_lora_rank: int | None = Field(None, ge=1)
    """Highest adapter rank the engine reserves room for (vLLM's choices: 8, 16, 32, ...)."""
    max_cpu_loras: int | None = Field(None, ge=1)
    """Adapters kept loaded in memory (vLLM's LRU cache; default ``max_loras``)."""


DEFAULTS = EngineKnobs(
    dtype="auto",
    gpu_memory_utilization=0.92,  # vLLM 0.32's CacheConfig default
    tensor_parallel_size=1,
    enforce_eager=False,
    kv_cache_dtype="auto",
    cpu_kvcache_gib=1.0,  # servery's: vLLM's CPU default takes 92 % of the machine
)
"""What an unset knob means. Knobs left None here are vLLM's to choose at start-up: the model's
context length, the weights' quantization, and the batch sizes vLLM picks for the GPU
(:func:`models.llm_memory.vllm_batch_defaults` reproduces that choice for the estimate)."""

KNOBS = tuple(EngineKnobs.model_fields)


class LLMEntry(EngineKnobs):
    """One served LLM: the name clients use, the store tag it loads, its knobs and devices."""

    name: str
    """Served name, the ``model`` of OpenAI requests."""
    tag: str = ""
    """BentoML store tag (``name[:version]``); default ``<name>:latest``."""
    devices: list[int] | None = None
    """Indexes into the service's GPUs (``SERVERY_LLM_GPUS``), one per tensor-parallel rank;
    default: the first ``tensor_parallel_size`` GPUs."""
    adapters: list[str] | Literal["all"] | None = None
    """LoRA adapters from the store (models/llm_lora.py) served on this LLM: their names, or
    ``all`` (every stored adapter of this base, added ones loaded while serving). Set: vLLM's
    LoRA support is on."""
    max_adapters: int = Field(16, ge=1)
    """Most adapter names this LLM serves; more are refused (validate) or not loaded (service)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"invalid served name {v!r}: use a-z, 0-9, '.', '_', '-'")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"devices must be distinct GPU indexes >= 0, not {v}")
        return v

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, list):
            bad = [a for a in v if not NAME_RE.match(a.split("@", 1)[0])]
            if bad or len(set(v)) != len(v):
                raise ValueError(f"adapters must be distinct store names, not {v}")
        return v

    @property
    def lora(self) -> bool:
        """Whether this LLM serves adapters (vLLM's LoRA support on)."""
        return self.adapters is not None

    @model_validator(mode="after")
    def _default_tag(self) -> LLMEntry:
        if not self.tag:
            self.tag = f"{self.name}:latest"
        elif ":" not in self.tag:
            self.tag = f"{self.tag}:latest"
        return self


class GpuResources(BaseModel):
    """The GPUs a deployment has: ``count`` GPUs of ``memory_gib`` each (for validate)."""

    model_config = ConfigDict(extra="forbid")

    memory_gib: float = Field(gt=0)
    count: int = Field(1, ge=1)


class LLMFile(BaseModel):
    """A whole LLM config file (see the module doc)."""

    model_config = ConfigDict(extra="forbid")

    models: list[LLMEntry] = Field(min_length=1)
    tasks: dict[str, str] = Field(default_factory=dict)
    gpu: GpuResources | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "llms" in data and "models" not in data:
            raise ValueError("the list of LLMs is 'models:' (was 'llms:')")
        return data

    @model_validator(mode="after")
    def _names_and_tasks(self) -> LLMFile:
        check_names_and_tasks([m.name for m in self.models], self.tasks)
        return self


def check_names_and_tasks(names: list[str], tasks: Mapping[str, str]) -> None:
    """ValueError when names repeat, or a task names no listed LLM or shadows one."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"LLM names must be unique; repeated: {', '.join(dupes)}")
    dangling = {t: m for t, m in tasks.items() if m not in names}
    if dangling:
        pairs = ", ".join(f"{t} -> {m}" for t, m in sorted(dangling.items()))
        raise ValueError(f"tasks point at no listed LLM: {pairs} (listed: {', '.join(names)})")
    shadowing = sorted(set(tasks) & set(names))
    if shadowing:
        raise ValueError(f"tasks named like a served LLM: {', '.join(shadowing)}")


class ServiceKnobs(EngineKnobs, BaseSettings):
    """The service-wide knobs, ``SERVERY_LLM_<KNOB>``, and the GPUs the service asks for."""

    model_config = SettingsConfigDict(
        env_prefix="SERVERY_LLM_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    gpus: int = Field(0, ge=0, le=64)
    """GPUs the service asks BentoML for (``resources={"gpu": N}``); 0 serves on CPU."""


def resolve(entry: EngineKnobs, service: EngineKnobs | None = None) -> EngineKnobs:
    """Every knob of ``entry``: its own, else the service-wide one, else :data:`DEFAULTS`."""
    values = {}
    for knob in KNOBS:
        for source in (entry, service, DEFAULTS):
            value = getattr(source, knob) if source is not None else None
            if value is not None:
                values[knob] = value
                break
    return EngineKnobs(**values)


def parse_config(raw: Any, source: str = "LLM config") -> LLMFile:
    """Validate a parsed YAML/JSON document; LLMConfigError lists every invalid field."""
    try:
        return LLMFile.model_validate(raw)
    except ValidationError as e:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        )
        raise LLMConfigError(f"{source} is invalid: {errors}") from None


def load_config(path: Path | str) -> LLMFile:
    """Read and validate an LLM config YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LLMConfigError(f"cannot read {path}: {e}") from None
    return parse_config(raw, str(path))


@dataclass(frozen=True)
class Placement:
    """Where each engine runs: its GPU indexes (into the service's GPUs) and memory share."""

    devices: dict[str, list[int]]
    shares: dict[int, float]
    """GPU index -> the sum of the shares of the engines on it."""
    problems: list[str]


def placement(entries: list[LLMEntry], gpus: int, service: EngineKnobs | None = None) -> Placement:
    """Put every engine on its GPUs and list what vLLM would refuse at start-up.

    vLLM 0.32 checks, per worker, that the GPU's free memory at start is at least
    ``gpu_memory_utilization x total`` (``vllm/v1/worker/utils.py`` ``request_memory``), so the
    shares of the engines on one GPU must add up to 1 or less (less by each process's CUDA
    context, ~0.5 GiB, which lies outside its share). ``gpus`` 0: on CPU, nothing to place.
    """
    devices: dict[str, list[int]] = {}
    shares: dict[int, float] = {}
    problems: list[str] = []
    if gpus <= 0:
        return Placement(devices, shares, problems)
    for entry in entries:
        knobs = resolve(entry, service)
        tp = knobs.tensor_parallel_size or 1
        who = f"LLM {entry.name!r}"
        chosen = entry.devices if entry.devices is not None else list(range(tp))
        if len(chosen) != tp:
            problems.append(
                f"{who}: devices {chosen} must list one GPU per tensor-parallel rank ({tp})"
            )
            continue
        outside = [d for d in chosen if d >= gpus]
        if outside:
            problems.append(
                f"{who}: needs GPU(s) {outside} (tensor_parallel_size {tp}, devices {chosen}) "
                f"but the service has {gpus} (SERVERY_LLM_GPUS)"
            )
            continue
        devices[entry.name] = chosen
        for d in chosen:
            shares[d] = shares.get(d, 0.0) + (knobs.gpu_memory_utilization or 0.0)
    for d, total in sorted(shares.items()):
        if total > 1 + 1e-9:
            on = ", ".join(
                f"{n} {resolve(e, service).gpu_memory_utilization:g}"
                for e in entries
                for n in [e.name]
                if d in devices.get(n, [])
            )
            problems.append(
                f"GPU {d}: the engines' gpu_memory_utilization shares add up to {total:.3g} > 1 "
                f"({on}); vLLM would refuse to start the later ones"
            )
    return Placement(devices, shares, problems)


def visible_devices(devices: list[int], parent: str | None, gpus: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for an engine on ``devices`` (indexes into the service's GPUs).

    ``parent`` is the service process's own ``CUDA_VISIBLE_DEVICES`` (BentoML sets it from
    ``resources={"gpu": N}``; may name GPUs by UUID, and need not start at 0); unset, the
    service's GPUs are 0 .. gpus-1.
    """
    ids = [s.strip() for s in parent.split(",") if s.strip()] if parent else []
    if not ids:
        ids = [str(i) for i in range(gpus)]
    if any(d >= len(ids) for d in devices):
        raise LLMConfigError(f"devices {devices} outside the visible GPUs {ids}")
    return ",".join(ids[d] for d in devices)


# --- reading a stored model ----------------------------------------------------------------------


def safetensors_parameters(path: Path | str) -> int:
    """Count the parameters of a directory's ``*.safetensors`` files from their headers only.

    A safetensors file starts with an 8-byte little-endian header length N and N bytes of JSON
    mapping each tensor name to ``{"dtype", "shape", "data_offsets"}`` (plus ``__metadata__``).
    Summing the product of every shape counts the parameters without reading a single weight, so
    a 70B model counts in milliseconds and torch is never imported. Tied weights are stored once,
    so they count once, as in ``sum(p.numel() for p in model.parameters())``. Packed quantized
    checkpoints (AWQ/GPTQ int32 words) count packed elements, not parameters: pass the real count.
    """
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise LLMConfigError(f"{path} has no *.safetensors files to count parameters from")
    total = 0
    for file in files:
        try:
            with file.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100 * 2**20:  # real headers are KiBs to a few MiB
                    raise ValueError(f"header length {size} is implausible")
                header = json.loads(f.read(size))
            total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise LLMConfigError(f"{file} is not a readable safetensors file: {e}") from None
    return total


ModelInfo = tuple[Mapping[str, Any], Mapping[str, Any]]
"""(store metadata, ``config.json``) of one stored LLM."""


def store_lookup(tag: str) -> ModelInfo:
    """Metadata and ``config.json`` of the stored LLM ``tag``; StoreError if it is not there."""
    from models.llm_store import hf_dir

    path, bento_model = hf_dir(tag)
    config = json.loads((path / "config.json").read_text())
    return dict(bento_model.info.metadata), config


def store_directory(tag: str) -> Path:
    """The stored LLM ``tag``'s Hugging Face directory."""
    from models.llm_store import hf_dir

    return hf_dir(tag)[0]


def _gib(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 10 else f"{x:.2f} GiB"  # small models stay readable


def check(
    config: LLMFile | Mapping[str, Any],
    *,
    service: EngineKnobs | None = None,
    gpu_memory_gib: float | None = None,
    gpus: int | None = None,
    lookup: Callable[[str], ModelInfo] = store_lookup,
    directory: Callable[[str], Path | None] | None = None,
    adapters: Mapping[str, Callable[..., Any]] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Every problem that stops ``config`` from running, and each LLM's memory estimate.

    ``service``: the service-wide knobs (validate passes ``SERVERY_LLM_*`` from its environment).
    ``gpu_memory_gib`` / ``gpus`` override the file's ``gpu:``; memory without a count means one
    GPU. Without either the config is checked for CPU (only ``cpu_kvcache_gib``).
    The engine features (parsers, chat template, adapters) are checked by
    :mod:`models.llm_features`: ``directory`` finds a version's folder for a chat template file,
    ``adapters`` (``resolve``, ``listing``) finds adapters (default: the store).
    """
    from models.llm_features import adapter_problems, feature_problems

    if not isinstance(config, LLMFile):
        try:
            config = parse_config(config)
        except LLMConfigError as e:
            return [str(e)], []
    memory = gpu_memory_gib or (config.gpu.memory_gib if config.gpu else None)
    count = gpus or (config.gpu.count if config.gpu else None) or (service and service.gpus)
    if memory is not None and not count:
        count = 1
    problems: list[str] = []
    if count:
        problems += placement(config.models, count, service).problems
    estimates: list[dict[str, Any]] = []
    for llm in config.models:
        who = f"LLM {llm.name!r} ({llm.tag})"
        knobs = resolve(llm, service)
        try:
            folder = (directory or store_directory)(llm.tag)
        except (LookupError, OSError):
            folder = None  # reported below, by lookup
        problems += [f"{who}: {p}" for p in feature_problems(knobs, folder)]
        found, adapted = adapter_problems(llm, knobs, **(adapters or {}))
        problems += [f"{who}: {p}" for p in found]
        try:
            metadata, hf_config = lookup(llm.tag)
            est = estimate(knobs, metadata, hf_config, gpu_memory_gib=memory if count else None)
        except (LookupError, LLMConfigError, OSError, ValueError) as e:
            problems.append(f"{who}: {e}")
            continue
        est = {"name": llm.name, "tag": llm.tag, **est, "adapters": [a.tag for a in adapted]}
        estimates.append(est)
        ctx = est["context_length"]
        if ctx and est["max_model_len"] > ctx:
            problems.append(
                f"{who}: max_model_len {est['max_model_len']} exceeds the model's context "
                f"length {ctx}"
            )
        if count and memory is not None and not est["fits"]:
            problems.append(
                f"{who}: the KV cache left, {_gib(est['kv_cache_gib'])} of "
                f"{knobs.gpu_memory_utilization:g} x {memory:g} GiB = {_gib(est['budget_gib'])} "
                f"(weights {_gib(est['weights_gib'])}, activations "
                f"{_gib(est['activation_gib'])}, CUDA graphs {_gib(est['cuda_graphs_gib'])}, "
                f"other {_gib(est['non_torch_gib'])}), does not hold one "
                f"{est['max_model_len']}-token sequence ({_gib(est['sequence_gib'])})"
            )
        elif not count and knobs.cpu_kvcache_gib is not None:
            one_seq = est["sequence_gib"]
            est["cpu_kvcache_gib"] = knobs.cpu_kvcache_gib
            if one_seq > knobs.cpu_kvcache_gib:
                problems.append(
                    f"{who}: one sequence of {est['max_model_len']} tokens needs "
                    f"{one_seq:.2f} GiB of KV cache, cpu_kvcache_gib is {knobs.cpu_kvcache_gib:g}"
                )
    return problems, estimates


def validate(config: LLMFile | Mapping[str, Any], **kw: Any) -> list[str]:
    """The problems that stop ``config`` from running (empty: it fits). See :func:`check`."""
    return check(config, **kw)[0]

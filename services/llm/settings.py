"""Typed settings of the LLM service (``SERVERY_LLM_*``) and the vLLM arguments built from them.

Which LLMs to serve comes from ``SERVERY_LLM_MODELS`` (``served=tag`` items, comma-separated, or
a JSON list) or from a YAML file named by ``SERVERY_LLM_MODELS_FILE``::

    models:
      - name: chat             # the name clients send in "model"
        tag: smollm2:latest    # store tag of a Hugging Face-format LLM (models/llm_store.py)
        max_model_len: 2048    # optional per-model overrides of the engine knobs below

Every served LLM gets an engine of its own. :func:`engine_argv` turns an entry plus the settings
into the command-line flags of vLLM's OpenAI server, which the service parses with vLLM's own
parser: one source of defaults and validation (vLLM's), and a pure function to unit-test here.
Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.config import NAME_RE

Dtype = Literal["auto", "float32", "float", "bfloat16", "float16", "half"]
GiB = 1 << 30


class EngineKnobs(BaseModel):
    """Engine settings that one served LLM may override (None: the service-wide value)."""

    model_config = ConfigDict(extra="forbid")

    max_model_len: int | None = Field(None, ge=16)
    """Context length (prompt + completion tokens); None: the model's own."""

    dtype: Dtype | None = None
    """Weight and activation dtype; ``auto`` lets vLLM choose (bfloat16 on CPU)."""

    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """Share of each GPU's memory the engine may use (weights + KV cache). With several LLMs on
    one GPU the shares must add up to less than 1."""

    quantization: str | None = None
    """vLLM quantization method (``awq``, ``gptq``, ``fp8``, ...); None: as the weights say."""

    max_num_seqs: int | None = Field(None, ge=1)
    """Most sequences the engine runs at once (vLLM's default when None)."""

    cpu_kvcache_gib: float | None = Field(None, gt=0)
    """On CPU: the KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``, the same as
    ``VLLM_CPU_KVCACHE_SPACE`` but fractional). None: vLLM sizes it. Ignored on GPU, where
    ``gpu_memory_utilization`` decides."""


class LLMEntry(EngineKnobs):
    """One served LLM: the name clients use and the store tag it is loaded from."""

    name: str
    """Served name, the ``model`` of OpenAI requests."""

    tag: str = ""
    """BentoML store tag (``name[:version]``); default ``<name>:latest``."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"invalid served name {v!r}: use a-z, 0-9, '.', '_', '-'")
        return v

    @model_validator(mode="after")
    def _default_tag(self) -> LLMEntry:
        if not self.tag:
            self.tag = f"{self.name}:latest"
        elif ":" not in self.tag:
            self.tag = f"{self.tag}:latest"
        return self


def parse_models(value: Any) -> Any:
    """``SERVERY_LLM_MODELS``: ``"chat=smollm2:latest,tiny=tiny-llm"``, ``"tiny-llm"`` (served
    under its store name) or a JSON list of entries."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, tag = item.partition("=")
        if not sep:  # a bare tag serves under its store name
            name, tag = item.split(":", 1)[0], item
        entries.append({"name": name.strip(), "tag": tag.strip()})
    return entries


class LLMSettings(EngineKnobs, BaseSettings):
    """Settings of the LLM service, from ``SERVERY_LLM_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="SERVERY_LLM_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    models: Annotated[list[LLMEntry], NoDecode] = Field(
        default_factory=lambda: [LLMEntry(name="smollm2")]
    )
    """The served LLMs (see :func:`parse_models`); ``models_file`` replaces this list."""

    models_file: Path | None = None
    """YAML file with a ``models:`` list of :class:`LLMEntry` (name, tag, per-model knobs)."""

    cpu_kvcache_gib: float | None = Field(1.0, gt=0)
    """On CPU: the KV cache size in GiB, service-wide (a model's own value wins). 1 GiB holds
    about 5 full 8k-token SmolLM2-135M sequences. Without a size vLLM reserves 92 % of the machine's
    memory (its ``gpu_memory_utilization`` default) and refuses to start wherever other processes
    hold more than 8 %."""

    max_tokens_limit: int | None = Field(None, ge=1)
    """Most tokens one request may ask to generate (``max_tokens`` or ``max_completion_tokens``,
    times ``n``); more is refused 400 before it reaches the engine. None: only the model's
    context length bounds it (vLLM refuses a request that cannot fit, 400)."""

    gpus: int = Field(0, ge=0, le=64)
    """GPUs the service asks BentoML for (``resources={"gpu": N}``); 0 serves on CPU."""

    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """GPUs one engine spreads a model over (must not exceed ``gpus``)."""

    enforce_eager: bool = False
    """Skip CUDA graphs / torch.compile: much faster start (~20 s instead of ~40 s on CPU),
    slower decoding on GPU."""

    pin_cpus: bool = True
    """On CPU with 2+ cores, pin the engine process to its model worker's core and this HTTP
    process to the others, so the stream keeps flowing (see ``services/llm/service.py``)."""

    hf_offline: bool = True
    """Set ``HF_HUB_OFFLINE=1`` for the engines: models come from the store, never the Hub."""

    request_timeout_s: float = Field(600.0, gt=0)
    """BentoML traffic timeout: a request that sends nothing for this long is answered 504.
    Streams are safe once their first chunk is out."""

    engine_args: str = ""
    """Extra vLLM engine flags, shell-quoted (``--seed 1 --max-num-batched-tokens 4096``),
    appended last so they win."""

    tasks: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    """Task names clients may send as ``model`` instead of an LLM's name, each mapped to a served
    LLM: ``SERVERY_LLM_TASKS="small=tiny,large=smollm2,code=smollm2"`` (or a JSON object). The
    answer names the LLM that served it."""

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, v: Any) -> Any:
        return parse_models(v)

    @field_validator("tasks", mode="before")
    @classmethod
    def _parse_tasks(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        text = v.strip()
        if text.startswith("{"):
            return json.loads(text)
        pairs = (item.partition("=") for item in text.split(",") if item.strip())
        return {k.strip(): t.strip() for k, sep, t in pairs if sep}

    @model_validator(mode="after")
    def _check(self) -> LLMSettings:
        if self.models_file is not None:
            self.models = load_models_file(self.models_file)
        if not self.models:
            raise ValueError("no LLM configured (SERVERY_LLM_MODELS is empty)")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"served LLM names repeat: {names}")
        for task, target in self.tasks.items():
            if target not in names:
                raise ValueError(f"task {task!r} points at {target!r}, not a served LLM {names}")
            if task in names:
                raise ValueError(f"task {task!r} has the name of a served LLM")
        if self.gpus and self.tensor_parallel_size > self.gpus:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} > gpus {self.gpus}")
        return self

    def resources(self) -> dict[str, Any]:
        """BentoML ``resources`` of the service: the GPUs when configured, else none (CPU)."""
        return {"gpu": self.gpus} if self.gpus else {}


def load_models_file(path: Path) -> list[LLMEntry]:
    """The ``models:`` list of an LLM models file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read LLM models file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ValueError(f"{path}: expected a mapping with a 'models:' list")
    return [LLMEntry.model_validate(m) for m in data["models"]]


def engine_argv(entry: LLMEntry, settings: LLMSettings, model_path: Path | str, *, on_cpu: bool):
    """vLLM OpenAI-server flags for ``entry`` served from ``model_path``.

    Per-model knobs win over the service-wide ones; the KV cache size is passed only on CPU
    (on GPU ``kv_cache_memory_bytes`` would override ``gpu_memory_utilization``).
    """

    def knob(field: str) -> Any:
        value = getattr(entry, field)
        return getattr(settings, field) if value is None else value

    argv = [
        "--model", str(model_path),
        "--served-model-name", entry.name,
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
        "--dtype", knob("dtype") or "auto",
    ]  # fmt: skip
    if (max_len := knob("max_model_len")) is not None:
        argv += ["--max-model-len", str(max_len)]
    if (quantization := knob("quantization")) is not None:
        argv += ["--quantization", quantization]
    if (max_seqs := knob("max_num_seqs")) is not None:
        argv += ["--max-num-seqs", str(max_seqs)]
    if on_cpu:
        if (gib := knob("cpu_kvcache_gib")) is not None:
            argv += ["--kv-cache-memory-bytes", str(int(gib * GiB))]
    elif (share := knob("gpu_memory_utilization")) is not None:
        argv += ["--gpu-memory-utilization", str(share)]
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    return argv + shlex.split(settings.engine_args)

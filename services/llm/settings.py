"""Typed settings of the LLM service (``SERVERY_LLM_*``) and the vLLM arguments built from them.

Which LLMs to serve comes from ``SERVERY_LLM_MODELS`` (``served=tag`` items, comma-separated, or
a JSON list) or from the LLM config file named by ``SERVERY_LLM_MODELS_FILE``, whose schema,
defaults and placement rules are :mod:`models.llm_config`'s, the same ``servery llm validate``
checks::

    models:
      - name: chat             # the name clients send in "model"
        tag: smollm2:latest    # store tag of a Hugging Face-format LLM (models/llm_store.py)
        max_model_len: 2048    # optional per-model engine knobs (models.llm_config.EngineKnobs)
        gpu_memory_utilization: 0.45
        devices: [0]

Every served LLM gets an engine of its own. :func:`engine_argv` turns an entry plus the
service-wide knobs into the command-line flags of vLLM's OpenAI server, which the service parses
with vLLM's own parser. The settings refuse, before any engine starts, LLMs whose GPUs or memory
shares cannot fit the service's GPUs (:func:`models.llm_config.placement`). Nothing here imports
vLLM.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from models.llm_config import (
    LLMConfigError,
    LLMEntry,
    ServiceKnobs,
    check_names_and_tasks,
    load_config,
    placement,
    resolve,
    visible_devices,
)
from models.llm_features import feature_problems, is_inline_template, template_path

GiB = 1 << 30

__all__ = ["GiB", "LLMEntry", "LLMSettings", "engine_argv", "engine_devices", "parse_models"]


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


class LLMSettings(ServiceKnobs):
    """Settings of the LLM service, from ``SERVERY_LLM_*`` environment variables. The engine
    knobs (``SERVERY_LLM_MAX_NUM_SEQS``, ...) and ``gpus`` are :class:`ServiceKnobs`'s: they apply
    to every LLM whose entry does not set its own."""

    model_config = SettingsConfigDict(
        env_prefix="SERVERY_LLM_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    models: Annotated[list[LLMEntry], NoDecode] = Field(
        default_factory=lambda: [LLMEntry(name="smollm2", adapters=["smollm2-demo-lora"])]
    )
    """The served LLMs (see :func:`parse_models`); ``models_file`` replaces this list. Default:
    SmolLM2 with its demo LoRA adapter (``make models-llm``; not loaded if not in the store)."""

    models_file: Path | None = None
    """YAML file with a ``models:`` list of :class:`LLMEntry` (name, tag, per-model knobs)."""

    max_tokens_limit: int | None = Field(None, ge=1)
    """Most tokens one request may ask to generate (``max_tokens`` or ``max_completion_tokens``,
    times ``n``); more is refused 400 before it reaches the engine. None: only the model's
    context length bounds it (vLLM refuses a request that cannot fit, 400)."""

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
            self.models, file_tasks = load_models_file(self.models_file)
            self.tasks = {**file_tasks, **self.tasks}  # SERVERY_LLM_TASKS adds to the file's
        if not self.models:
            raise ValueError("no LLM configured (SERVERY_LLM_MODELS is empty)")
        check_names_and_tasks([m.name for m in self.models], self.tasks)
        problems = placement(self.models, self.gpus, self).problems
        for entry in self.models:  # vLLM's parser names etc., read from its source: no import
            problems += [f"LLM {entry.name!r}: {p}" for p in feature_problems(resolve(entry, self))]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resources(self) -> dict[str, Any]:
        """BentoML ``resources`` of the service: the GPUs when configured, else none (CPU)."""
        return {"gpu": self.gpus} if self.gpus else {}


def load_models_file(path: Path) -> tuple[list[LLMEntry], dict[str, str]]:
    """The ``models:`` list and ``tasks:`` of an LLM config file (:mod:`models.llm_config`)."""
    try:
        config = load_config(path)
    except LLMConfigError as e:
        raise ValueError(str(e)) from None
    return config.models, config.tasks


def engine_devices(entry: LLMEntry, settings: LLMSettings, parent: str | None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for ``entry``'s engine (None on CPU): its GPUs among this
    process's (``parent``: the process's own ``CUDA_VISIBLE_DEVICES``, which BentoML sets)."""
    if not settings.gpus:
        return None
    devices = placement([entry], settings.gpus, settings).devices[entry.name]
    return visible_devices(devices, parent, settings.gpus)


def engine_argv(entry: LLMEntry, settings: LLMSettings, model_path: Path | str, *, on_cpu: bool):
    """vLLM OpenAI-server flags for ``entry`` served from ``model_path``.

    Each knob is the entry's, else the service-wide one, else the shared default
    (:func:`models.llm_config.resolve`); the KV cache size is passed only on CPU (on GPU
    ``kv_cache_memory_bytes`` would override ``gpu_memory_utilization``). Knobs that are None
    after that are vLLM's to choose.
    """
    knobs = resolve(entry, settings)
    argv = [
        "--model", str(model_path),
        "--served-model-name", entry.name,
        "--tensor-parallel-size", str(knobs.tensor_parallel_size),
        "--dtype", knobs.dtype or "auto",
    ]  # fmt: skip
    flags = {
        "max_model_len": "--max-model-len",
        "quantization": "--quantization",
        "max_num_seqs": "--max-num-seqs",
        "max_num_batched_tokens": "--max-num-batched-tokens",
    }
    for knob, flag in flags.items():
        if (value := getattr(knobs, knob)) is not None:
            argv += [flag, str(value)]
    if knobs.kv_cache_dtype and knobs.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", knobs.kv_cache_dtype]
    if on_cpu:
        if knobs.cpu_kvcache_gib is not None:
            argv += ["--kv-cache-memory-bytes", str(int(knobs.cpu_kvcache_gib * GiB))]
    else:
        argv += ["--gpu-memory-utilization", str(knobs.gpu_memory_utilization)]
    if knobs.enforce_eager:
        argv.append("--enforce-eager")
    return argv + feature_argv(entry, knobs, Path(model_path)) + shlex.split(settings.engine_args)


def feature_argv(entry: LLMEntry, knobs: Any, model_path: Path) -> list[str]:
    """vLLM flags of the engine features (models/llm_features.py): tool calling, reasoning, chat
    template, structured outputs, prefix caching and LoRA."""
    argv: list[str] = []
    if knobs.enable_auto_tool_choice:
        argv.append("--enable-auto-tool-choice")
    for knob in ("tool_call_parser", "tool_strict_level", "tool_parser_plugin", "reasoning_parser"):
        if value := getattr(knobs, knob):
            argv += [f"--{knob.replace('_', '-')}", value]
    if template := knobs.chat_template:
        inline = is_inline_template(template)
        argv += [
            "--chat-template",
            template if inline else str(template_path(template, model_path)),
        ]
    outputs: dict[str, Any] = {}
    if knobs.structured_outputs_backend:
        outputs["backend"] = knobs.structured_outputs_backend
    if knobs.structured_outputs_compact:
        outputs["disable_any_whitespace"] = True
    if outputs:
        argv += ["--structured-outputs-config", json.dumps(outputs)]
    if knobs.enable_prefix_caching is not None:
        argv.append(
            "--enable-prefix-caching"
            if knobs.enable_prefix_caching
            else "--no-enable-prefix-caching"
        )
    if entry.lora:
        argv.append("--enable-lora")
        for knob in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            if (value := getattr(knobs, knob)) is not None:
                argv += [f"--{knob.replace('_', '-')}", str(value)]
    return argv

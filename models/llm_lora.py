"""LoRA adapters in the model store: a PEFT adapter folder per version, tied to its base LLM.

``servery llm lora add NAME --base BASE PATH`` copies a PEFT adapter folder
(``adapter_config.json`` and ``adapter_model.safetensors``) into the store as a new version of
``NAME``, labelled ``task: lora-adapter``; metadata records the base LLM's store name and the
version it was added against, the rank, alpha and target modules. Adapters then version, alias,
promote, roll back, export and import like every other model (``servery models ...``).

Which version a name serves is the store's rule (:meth:`models.aliases.AliasStore.resolve`): the
``production`` alias, else the latest version; ``NAME@ALIAS`` (or ``NAME@VERSION``) names one
explicitly. The LLM service loads them into the base's vLLM engine (``services/llm/adapters.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.store import StoreError, get_model

TASK = "lora-adapter"
FORMAT = "peft"
SUBDIR = "lora"
"""The PEFT folder inside the stored adapter (``<model path>/lora``)."""
SEPARATOR = "@"
"""``NAME@REF``: an adapter at one alias or version."""


def check_peft_dir(path: Path | str) -> dict[str, Any]:
    """Validate a PEFT LoRA folder; returns its ``adapter_config.json``. Raises StoreError."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path} is not a directory")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except OSError:
        raise StoreError(f"{path} is not a PEFT adapter folder: no adapter_config.json") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}/adapter_config.json is not readable JSON: {e}") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise StoreError(f"{path} is not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    weights = ("adapter_model.safetensors", "adapter_model.bin")
    if not any((path / w).is_file() for w in weights):
        raise StoreError(f"{path} has no adapter weights ({' or '.join(weights)})")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise StoreError(f"{path}/adapter_config.json: rank r must be a positive integer")
    return config


def describe_adapter(config: dict[str, Any]) -> dict[str, Any]:
    """The metadata servery records from an ``adapter_config.json``."""
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # PEFT allows a regex
        targets = [targets]
    return {
        "rank": int(config["r"]),
        "alpha": float(config.get("lora_alpha") or config["r"]),
        "target_modules": sorted(str(t) for t in targets),
    }


def save_adapter(
    name: str, base: str, path: Path | str, *, source: str | None = None, extra: Any = None
) -> Any:
    """Copy the PEFT folder ``path`` into the store as a new version of ``name``, an adapter of
    the stored LLM ``base`` (``name[:version]``); returns the stored ``bentoml.Model``."""
    from models.llm_store import hf_dir, save_folder

    path = Path(path).resolve()
    config = check_peft_dir(path)
    if SEPARATOR in name:
        raise StoreError(f"adapter name {name!r} may not contain {SEPARATOR!r}")
    _, base_model = hf_dir(base)  # StoreError unless a stored LLM
    existing = stored(name)
    if existing is not None and existing.info.labels.get("task") != TASK:
        raise StoreError(f"{name!r} is in the store and is not a LoRA adapter ({existing.tag})")
    metadata = {
        **describe_adapter(config),
        "base": base_model.tag.name,
        "base_version": base_model.tag.version,
        "source": source or f"local directory {path}",
        **(extra or {}),
    }
    return save_folder(
        name, path, SUBDIR, labels={"task": TASK, "format": FORMAT}, metadata=metadata
    )


def stored(name: str) -> Any:
    """The latest stored version of ``name``, or None."""
    try:
        return get_model(f"{name}:latest")
    except StoreError:
        return None


@dataclass(frozen=True)
class Adapter:
    """One adapter version to serve: where its PEFT folder is and what it adapts."""

    name: str
    version: str
    path: Path
    base: str
    rank: int

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


def split_ref(served: str) -> tuple[str, str | None]:
    """``NAME@REF`` -> ``(NAME, REF)``; a plain name -> ``(NAME, None)``."""
    name, sep, ref = served.partition(SEPARATOR)
    return name, (ref if sep else None)


def resolve_adapter(served: str, aliases: Any = None) -> Adapter:
    """The version ``served`` (``NAME`` or ``NAME@REF``) names now; StoreError if none.

    ``NAME`` alone follows the store's default (``production`` alias, else latest).
    """
    from models.aliases import AliasError, AliasStore

    name, ref = split_ref(served)
    aliases = aliases or AliasStore()
    try:
        version, _ = aliases.resolve(name, ref)
    except AliasError as e:
        raise StoreError(str(e)) from None
    bento_model = get_model(f"{name}:{version}")
    if bento_model.info.labels.get("task") != TASK:
        raise StoreError(f"model {bento_model.tag} is not a LoRA adapter")
    path = Path(bento_model.path_of(SUBDIR))
    meta = bento_model.info.metadata
    return Adapter(name, version, path, str(meta.get("base", "")), int(meta.get("rank", 0)))


def adapters_of(base: str) -> list[str]:
    """Names of the stored adapters whose latest version adapts the LLM ``base`` (store name)."""
    import bentoml

    names = {
        m.tag.name
        for m in bentoml.models.list()
        if m.info.labels.get("task") == TASK and m.info.metadata.get("base") == base
    }
    return sorted(names)

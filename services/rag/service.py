"""The RAG service: embeddings, the vector store, ingestion, retrieval and RAG apps.

A BentoML service beside the LLM service (``bentoml.depends``), started only when RAG is
configured (``SERVERY_RAG_ENABLED``; ``auto``: the embedding model is in the store). One worker:
qdrant-client's embedded store is owned by one process. The model loads after the HTTP server
is up (``/v1`` answers 503 until then); a RAG app whose collection is empty and that names
files to ``ingest`` (the demo ``servery-docs``: docs/ and README.md) is filled then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import bentoml

from services.llm.proxy import StreamingProxy
from services.llm.service import LLM
from services.rag.api import RagState, build_app
from services.rag.settings import PROJECT, RagSettings
from services.settings import SETTINGS as ROUTER_SETTINGS

logger = logging.getLogger("servery")

SETTINGS = RagSettings()
STATE = RagState(SETTINGS)
app = build_app(STATE)

TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".rst")


def _llm_address() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.remote_runner_mapping.get()[LLM.name]


def files_of(paths: list[str], root: Path = PROJECT) -> list[tuple[str, str]]:
    """``(source, text)`` of the text files under ``paths`` (relative to ``root``)."""
    out = []
    for name in paths:
        path = root / name
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in found:
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES:
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    out.append((f.relative_to(root).as_posix(), f.read_text("utf-8")))
    return out


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="rag",
    workers=1,  # the embedded store has one owner
    traffic={"timeout": ROUTER_SETTINGS.request_timeout_s},
    tracing={"excluded_urls": [] if ROUTER_SETTINGS.trace_predictions else ["/v1/"]},
)
class RAG:
    """Embeddings, retrieval and RAG apps (services/rag/)."""

    # services/gateway/fastpath.py serves /v1/ outside BentoML's per-request middleware, as the
    # LLM service's.
    __servery_fast_path__ = {"kind": "llm", "api": app}

    llm = bentoml.depends(LLM)

    def __init__(self) -> None:
        self.state = STATE
        STATE.llm = StreamingProxy(
            _llm_address,
            connect_timeout_s=5.0,
            read_timeout_s=ROUTER_SETTINGS.request_timeout_s,
        )
        self._starting: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def start(self) -> None:
        self._starting = asyncio.create_task(self._start())

    async def _start(self) -> None:
        try:
            await asyncio.to_thread(STATE.start)
        except Exception as e:
            STATE.failed = e
            logger.exception("RAG: start failed")
            return
        for rag_app in STATE.apps.values():
            if not rag_app.ingest:
                continue
            try:
                assert STATE.store is not None
                if STATE.store.exists(rag_app.collection) and STATE.store.count(rag_app.collection):
                    continue
                docs = files_of(rag_app.ingest)
                result = await STATE.ingest(rag_app.collection, docs)
                logger.info(
                    "RAG: collection %s built from %s (%d documents, %d chunks)",
                    rag_app.collection, ", ".join(rag_app.ingest), len(docs), result["chunks"],
                )  # fmt: skip
            except Exception:
                logger.exception("RAG: could not build collection %s", rag_app.collection)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
        if STATE.embedder is not None:
            await STATE.embedder.close()
        if STATE.store is not None:
            STATE.store.close()
        if STATE.llm is not None:
            await STATE.llm.close()

    async def __is_ready__(self) -> bool:
        return STATE.ready

    async def __is_alive__(self) -> bool:
        return STATE.failed is None

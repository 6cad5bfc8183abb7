"""The RAG service's HTTP API (OpenAI envelope on every error), behind the router's ``/v1``.

* ``POST /v1/embeddings``: OpenAI's embeddings API (strings; ``float`` or ``base64``)
* ``GET /v1/rag/collections``; ``DELETE /v1/rag/collections/{name}``
* ``GET|POST|DELETE /v1/rag/collections/{name}/documents``: list, add (idempotent by content
  hash), remove documents
* ``POST /v1/rag/collections/{name}/query``: ``{"query", "k", "filter"}`` -> ``{"matches"}``
* ``POST /v1/chat/completions`` with a RAG app's name: retrieval, then the LLM
  (``services/rag/chat.py``)
* ``GET /v1/models``: the LLM service's list plus the embedding model and the RAG apps
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from services.llm.openai_api import parse_object, read_body, replaying
from services.protocols.errors import openai_error, openai_response
from services.rag import chat, metrics
from services.rag.chunking import chunk
from services.rag.settings import RagApp, RagSettings
from services.rag.store import StoreDown, VectorStore, check_filter
from services.runtime.errors import BadRequest, ModelNotFound, PayloadTooLarge, ServeryError

logger = logging.getLogger("servery")


class RagState:
    """What the RAG service holds: settings, apps, the embedder and the store (once started)."""

    def __init__(self, settings: RagSettings) -> None:
        self.settings = settings
        rag = settings.rag_file()
        self.model_name = rag.embeddings
        self.apps: dict[str, RagApp] = {a.name: a for a in rag.apps}
        self.embedder: Any = None
        self.store: VectorStore | None = None
        self.llm: Any = None  # the LLM proxy (services.llm.proxy.StreamingProxy)
        self.failed: BaseException | None = None

    def start(self) -> None:
        """Load the embedding model and open the store (blocking: run it in a thread)."""
        from services.rag.embedder import load

        embedder = load(self.model_name, self.settings.max_batch)
        s = self.settings
        self.store = VectorStore(
            embedder.dimensions,
            url=s.qdrant_url,
            api_key=s.qdrant_api_key,
            path=None if s.qdrant_url else s.store_path(),
            timeout_s=s.qdrant_timeout_s,
        )
        self.embedder = embedder
        logger.info("RAG: %s serving, vectors in %s", embedder.tag, self.store.name)

    @property
    def ready(self) -> bool:
        return self.embedder is not None and self.store is not None

    def require(self) -> VectorStore:
        if self.failed is not None:
            raise ServeryError.with_status(503, "the RAG service failed to start")
        if not self.ready:
            raise ServeryError.with_status(503, "the RAG service is still starting")
        assert self.store is not None
        return self.store

    def embedder_or_503(self) -> Any:
        self.require()
        return self.embedder

    async def embed(self, texts: list[str], use: str) -> tuple[Any, int]:
        self.require()
        try:
            vectors, tokens = await self.embedder.embed(texts)
        except Exception:
            metrics.EMBED_REQUESTS.labels(self.model_name, "500").inc()
            raise
        metrics.EMBED_REQUESTS.labels(self.model_name, "200").inc()
        metrics.EMBED_INPUTS.labels(self.model_name, use).inc(len(texts))
        metrics.EMBED_TOKENS.labels(self.model_name, use).inc(tokens)
        return vectors, tokens

    async def retrieve(
        self, collection: str, query: str, k: int, where: dict[str, Any], app: str = "-"
    ) -> list[dict[str, Any]]:
        store = self.require()
        started = time.perf_counter()
        await asyncio.to_thread(store.require, collection)
        vectors, _ = await self.embed([query], "query")
        matches = await asyncio.to_thread(store.search, collection, vectors[0], k, where, query)
        metrics.RETRIEVAL_SECONDS.labels(collection, app).observe(time.perf_counter() - started)
        metrics.MATCHES.labels(collection, app).observe(len(matches))
        return matches

    async def ingest(
        self,
        collection: str,
        documents: list[tuple[str, str]],
        size: int | None = None,
        overlap: int | None = None,
    ) -> dict[str, Any]:
        """Add ``(source, text)`` documents; one whose content hash is stored already is left
        as it is (nothing re-embedded), a changed one replaces its chunks."""
        store = self.require()
        size = size or self.settings.chunk_chars
        overlap = self.settings.chunk_overlap if overlap is None else overlap
        await asyncio.to_thread(store.ensure, collection)
        known = await asyncio.to_thread(store.documents, collection)
        added, unchanged, chunks_added = [], [], 0
        for source, text in documents:
            chunks = chunk(source, text, size, overlap)
            if source in known and chunks and known[source]["hash"] == chunks[0].doc_hash:
                unchanged.append(source)
                continue
            if source in known:
                await asyncio.to_thread(store.delete_sources, collection, [source])
            if chunks:
                vectors, _ = await self.embed([c.text for c in chunks], "ingest")
                await asyncio.to_thread(store.upsert, collection, chunks, vectors)
            added.append(source)
            chunks_added += len(chunks)
        metrics.CHUNKS_INGESTED.labels(collection).inc(chunks_added)
        return {"added": added, "unchanged": unchanged, "chunks": chunks_added}


def _body(raw: bytes) -> dict[str, Any]:
    return parse_object(raw) if raw else {}


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type="application/json")


def build_app(state: RagState) -> FastAPI:
    """The RAG service's app over ``state``."""
    app = FastAPI(title="servery RAG", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ServeryError)
    async def _servery(_: Request, exc: ServeryError) -> Response:
        if exc.status_code >= 500:
            logger.warning("RAG: %s", exc.message)
        return openai_error(exc)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        doc = _body(await request.body())
        model = doc.get("model")
        if model != state.model_name:
            raise ModelNotFound(f"no embedding model '{model}'; served: {state.model_name}")
        texts = doc.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts:
            raise BadRequest("input must be a string or a non-empty list of strings", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise BadRequest("input must be strings (token ids are not accepted)", param="input")
        if len(texts) > state.settings.max_inputs:
            raise BadRequest(f"at most {state.settings.max_inputs} inputs a request", param="input")
        if any(not t for t in texts):
            raise BadRequest("input strings must not be empty", param="input")
        fmt = doc.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
        dims = doc.get("dimensions")
        if dims is not None and dims != (width := state.embedder_or_503().dimensions):
            raise BadRequest(
                f"{state.model_name} makes {width}-dimensional vectors only", param="dimensions"
            )
        vectors, tokens = await state.embed(texts, "api")
        if fmt == "base64":
            rows: list[Any] = [
                base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors
            ]
        else:
            rows = list(vectors)
        return Response(
            orjson.dumps(
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": r}
                        for i, r in enumerate(rows)
                    ],
                    "model": state.model_name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
                option=orjson.OPT_SERIALIZE_NUMPY,
            ),
            media_type="application/json",
        )

    @app.get("/v1/rag/collections")
    async def collections() -> Response:
        store = state.require()
        return _json({"collections": await asyncio.to_thread(store.collections)})

    @app.delete("/v1/rag/collections/{name}")
    async def drop(name: str) -> Response:
        store = state.require()
        await asyncio.to_thread(store.drop, name)
        return _json({"dropped": name})

    @app.get("/v1/rag/collections/{name}/documents")
    async def documents(name: str) -> Response:
        store = state.require()
        docs = await asyncio.to_thread(store.documents, name)
        listed = [{"source": s, **d} for s, d in sorted(docs.items())]
        return _json({"collection": name, "documents": listed})

    @app.post("/v1/rag/collections/{name}/documents")
    async def add(name: str, request: Request) -> Response:
        doc = _body(await request.body())
        items = doc.get("documents")
        if not isinstance(items, list) or not items:
            raise BadRequest("documents must be a non-empty list of {source, text}")
        pairs = []
        for item in items:
            source, text = (
                (item.get("source"), item.get("text")) if isinstance(item, dict) else (None, None)
            )
            if not isinstance(source, str) or not source or not isinstance(text, str):
                raise BadRequest("each document needs a string 'source' and a string 'text'")
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > state.settings.max_document_bytes:
                raise PayloadTooLarge(
                    f"document '{source[:200]}' is {size} bytes; the most is "
                    f"{state.settings.max_document_bytes} (SERVERY_RAG_MAX_DOCUMENT_BYTES)"
                )
            pairs.append((source, text))
        size, overlap = doc.get("chunk_chars"), doc.get("chunk_overlap")
        for field, value in (("chunk_chars", size), ("chunk_overlap", overlap)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise BadRequest(f"{field} must be a non-negative integer", param=field)
        if size is not None and size < 100:
            raise BadRequest("chunk_chars must be at least 100", param="chunk_chars")
        try:
            result = await state.ingest(name, pairs, size, overlap)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return _json({"collection": name, **result})

    @app.delete("/v1/rag/collections/{name}/documents")
    async def remove(name: str, request: Request) -> Response:
        store = state.require()
        sources = request.query_params.getlist("source")
        if not sources:
            raise BadRequest("name the documents to remove: ?source=a.md&source=b.md")
        docs = await asyncio.to_thread(store.documents, name)
        gone = [s for s in sources if s in docs]
        await asyncio.to_thread(store.delete_sources, name, gone)
        return _json({"collection": name, "removed": gone})

    @app.post("/v1/rag/collections/{name}/query")
    async def query(name: str, request: Request) -> Response:
        doc = _body(await request.body())
        text = doc.get("query")
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("query must be a non-empty string", param="query")
        k = doc.get("k", 4)
        limit = state.settings.max_k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
            raise BadRequest(
                f"k must be an integer from 1 to {limit} (SERVERY_RAG_MAX_K)", param="k"
            )
        where = check_filter(doc.get("filter"))
        matches = await state.retrieve(name, text, k, where)
        return _json({"collection": name, "matches": matches})

    app.router.add_route("/v1/chat/completions", RagChat(state), methods=["POST"])
    app.router.add_route("/v1/models", ModelList(state), methods=["GET"])

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def _not_found(path: str) -> Response:
        return openai_response(404, f"no route /v1/{path}", "NotFoundError")

    return app


class RagChat:
    """ASGI endpoint: a chat with a RAG app (retrieve, rewrite, stream through the LLM proxy)."""

    def __init__(self, state: RagState) -> None:
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app: RagApp | None = None
        try:
            body, left = await read_body(receive, None)  # the router bounded it already
            if left is not None:
                return
            doc = parse_object(body)
            app = self.state.apps.get(doc.get("model"))  # type: ignore[arg-type]
            if app is None:  # not an app: straight to the LLM
                return await self.state.llm(scope, replaying(body, receive), send)
            question = chat.question_of(doc)
            try:
                matches = await self.state.retrieve(app.collection, question, app.k, {}, app.name)
            except ModelNotFound:
                raise ModelNotFound(
                    f"RAG app '{app.name}': its collection '{app.collection}' does not exist "
                    f"yet (servery rag ingest ... --collection {app.collection})"
                ) from None
        except ServeryError as e:
            outcome = "store_down" if isinstance(e, StoreDown) else str(e.status_code)
            metrics.RAG_CHATS.labels(app.name if app else "-", outcome).inc()
            return await openai_error(e)(scope, receive, send)
        context, sources = chat.context_of(matches, app.max_context_tokens)
        metrics.RAG_CHATS.labels(app.name, "answered").inc()
        rewritten = chat.rewrite(doc, app, context)
        await self.state.llm(scope, replaying(rewritten, receive), chat.with_sources(send, sources))


class ModelList:
    """``GET /v1/models``: the LLM service's models, then the embedding model and the RAG apps."""

    def __init__(self, state: RagState) -> None:
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        captured: dict[str, Any] = {"status": 502, "body": bytearray(), "headers": []}

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                captured["headers"] = message.get("headers", [])
            else:
                captured["body"] += message.get("body", b"")

        await self.state.llm(scope, receive, capture)
        if captured["status"] != 200:
            return await Response(
                bytes(captured["body"]), captured["status"], media_type="application/json"
            )(scope, receive, send)
        try:
            listing = json.loads(bytes(captured["body"]))
        except ValueError:
            listing = {"object": "list", "data": []}
        created = int(time.time())
        state = self.state
        listing["data"].append(
            {
                "id": state.model_name,
                "object": "model",
                "created": created,
                "owned_by": "servery",
                "root": state.embedder.tag if state.ready else state.model_name,
                "servery": {"task": "embeddings"},
            }
        )
        for app in state.apps.values():
            listing["data"].append(
                {
                    "id": app.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "servery",
                    "parent": app.llm,
                    "servery": {"task": "rag", "collection": app.collection, "k": app.k},
                }
            )
        await _json(listing)(scope, receive, send)

"""The vector store: Qdrant's API, embedded (qdrant-client's local mode) or a server by URL.

One code path for both: qdrant-client's ``QdrantClient(path=...)`` runs the same API in this
process (brute-force search over numpy arrays, persisted in a folder; one process may own it, so
the RAG service runs one worker), ``QdrantClient(url=...)`` talks to a Qdrant server
(``SERVERY_QDRANT_URL``). Each point is one chunk: its vector and a payload of ``source``,
``chunk`` (index), ``text`` and ``hash`` (the whole document's content hash). Calls block, so the
service runs them in a thread; a lock serialises them in local mode, which is not thread-safe.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.rag.chunking import Chunk
from services.runtime.errors import BadRequest, ModelNotFound, ServeryError

FILTER_FIELDS = ("source", "chunk")
"""Payload fields a query may filter on."""
_NAMESPACE = uuid.UUID("5e1f0c2a-6b1d-4c55-9a57-7a0f3b9e6d21")


class StoreDown(ServeryError):
    """The vector store did not answer (server mode): 503, naming it."""

    status_code = 503
    error_type = "vector_store_unavailable"


class VectorStore:
    """Collections of chunks in Qdrant (embedded or a server)."""

    def __init__(
        self,
        dimensions: int,
        *,
        url: str | None = None,
        api_key: str | None = None,
        path: Path | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        from qdrant_client import QdrantClient

        self.dimensions = dimensions
        if url:
            self.name = f"the Qdrant server at {url}"
            # no version check: it would call the server while the service starts
            self.client = QdrantClient(
                url=url, api_key=api_key, timeout=int(max(timeout_s, 1)), check_compatibility=False
            )
        elif path is None:  # in memory, for measurements: search is the same as with a path
            self.name = "an in-memory Qdrant store"
            self.client = QdrantClient(location=":memory:")
        else:
            path.mkdir(parents=True, exist_ok=True)
            self.name = f"the embedded Qdrant store in {path}"
            self.client = QdrantClient(path=str(path))
        self._lock = threading.Lock() if not url else None

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            if self._lock is None:
                return fn(*args, **kwargs)
            with self._lock:
                return fn(*args, **kwargs)
        except (ResponseHandlingException, ConnectionError, TimeoutError, OSError) as e:
            raise StoreDown(f"the vector store is not reachable: {self.name}") from e
        except UnexpectedResponse as e:
            if e.status_code == 404:
                raise ModelNotFound("no such collection") from e
            if (e.status_code is not None and e.status_code >= 500) or e.status_code in (401, 403):
                raise StoreDown(f"the vector store failed: {self.name} ({e.status_code})") from e
            raise

    # collections -------------------------------------------------------------------------
    def collections(self) -> list[dict[str, Any]]:
        names = [c.name for c in self._call(self.client.get_collections).collections]
        return [{"name": n, "chunks": self.count(n)} for n in sorted(names)]

    def exists(self, collection: str) -> bool:
        return bool(self._call(self.client.collection_exists, collection))

    def require(self, collection: str) -> None:
        if not self.exists(collection):
            raise ModelNotFound(f"collection '{collection}' does not exist")

    def ensure(self, collection: str) -> None:
        from qdrant_client import models as qm

        if self.exists(collection):
            return
        self._call(
            self.client.create_collection,
            collection,
            vectors_config=qm.VectorParams(size=self.dimensions, distance=qm.Distance.COSINE),
        )
        if self._lock is None:  # payload indexes only exist on a server
            for field, schema in (("source", qm.PayloadSchemaType.KEYWORD),):
                self._call(self.client.create_payload_index, collection, field, schema)

    def drop(self, collection: str) -> None:
        self.require(collection)
        self._call(self.client.delete_collection, collection)

    def count(self, collection: str) -> int:
        return int(self._call(self.client.count, collection, exact=True).count)

    # documents ---------------------------------------------------------------------------
    def documents(self, collection: str) -> dict[str, dict[str, Any]]:
        """``{source: {"hash", "chunks"}}`` of every document in ``collection``."""
        self.require(collection)
        docs: dict[str, dict[str, Any]] = {}
        offset = None
        while True:
            points, offset = self._call(
                self.client.scroll,
                collection,
                limit=1024,
                offset=offset,
                with_payload=["source", "hash"],
                with_vectors=False,
            )
            for p in points:
                payload = p.payload or {}
                doc = docs.setdefault(
                    payload.get("source", ""), {"hash": payload.get("hash"), "chunks": 0}
                )
                doc["chunks"] += 1
            if offset is None:
                return docs

    def delete_sources(self, collection: str, sources: Sequence[str]) -> None:
        from qdrant_client import models as qm

        if not sources:
            return
        selector = qm.FilterSelector(filter=_filter({"source": list(sources)}))
        self._call(self.client.delete, collection, points_selector=selector, wait=True)

    def upsert(self, collection: str, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        from qdrant_client import models as qm

        points = [
            qm.PointStruct(
                id=str(uuid.uuid5(_NAMESPACE, f"{c.source}\0{c.index}\0{c.doc_hash}")),
                vector=v.tolist(),
                payload={"source": c.source, "chunk": c.index, "text": c.text, "hash": c.doc_hash},
            )
            for c, v in zip(chunks, vectors, strict=True)
        ]
        for start in range(0, len(points), 512):
            self._call(self.client.upsert, collection, points[start : start + 512], wait=True)

    def search(
        self, collection: str, vector: np.ndarray, k: int, where: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """The ``k`` chunks nearest ``vector``: ``{"text", "source", "chunk", "score"}``."""
        found = self._call(
            self.client.query_points,
            collection,
            query=vector.tolist(),
            limit=k,
            query_filter=_filter(where) if where else None,
            with_payload=["text", "source", "chunk"],
        )
        return [
            {
                "text": p.payload.get("text", ""),
                "source": p.payload.get("source", ""),
                "chunk": p.payload.get("chunk", 0),
                "score": round(float(p.score), 6),
            }
            for p in found.points
        ]

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing at shutdown: nothing left to do about it
            pass


def check_filter(where: Any) -> dict[str, Any]:
    """A query's ``filter``: ``{"source": "a.md"}``, ``{"source": ["a.md", "b.md"]}``,
    ``{"chunk": 0}``; anything else is a 400."""
    if where is None:
        return {}
    if not isinstance(where, dict):
        raise BadRequest('filter must be an object like {"source": "docs/api.md"}')
    for field, value in where.items():
        if field not in FILTER_FIELDS:
            raise BadRequest(f"cannot filter on '{field}': filter fields are {list(FILTER_FIELDS)}")
        values = value if isinstance(value, list) else [value]
        kind = str if field == "source" else int
        if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            raise BadRequest(f"filter '{field}' takes a {kind.__name__} or a list of them")
    return where


def _filter(where: dict[str, Any]) -> Any:
    from qdrant_client import models as qm

    must = []
    for field, value in where.items():
        if isinstance(value, list):
            must.append(qm.FieldCondition(key=field, match=qm.MatchAny(any=value)))
        else:
            must.append(qm.FieldCondition(key=field, match=qm.MatchValue(value=value)))
    return qm.Filter(must=must)

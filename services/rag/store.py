"""The vector store: Qdrant's API, embedded (qdrant-client's local mode) or a server by URL.

One code path for both: qdrant-client's ``QdrantClient(path=...)`` runs the same API in this
process (brute-force search over numpy arrays, persisted in a folder; one process may own it, so
the RAG service runs one worker), ``QdrantClient(url=...)`` talks to a Qdrant server
(``SERVERY_QDRANT_URL``). Each point is one chunk: its vector and a payload of ``source``,
``chunk`` (index), ``text`` and ``hash`` (the whole document's content hash). Calls block, so the
service runs them in a thread; a lock serialises them in local mode, which is not thread-safe.
"""

from __future__ import annotations

import re
import threading
import uuid
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.compat.qdrant_local_access import fast_sqlite, local_points
from services.rag.chunking import Chunk
from services.rag.index import ExactIndex
from services.runtime.errors import BadRequest, ModelNotFound, ServeryError

FILTER_FIELDS = ("source", "chunk")
"""Payload fields a query may filter on."""
_NAMESPACE = uuid.UUID("5e1f0c2a-6b1d-4c55-9a57-7a0f3b9e6d21")
SPARSE = "bm25"
"""The sparse vector of each chunk: BM25 term weights; Qdrant applies the IDF (``Modifier.IDF``)."""
RRF_K = 60
"""Reciprocal rank fusion's constant (the usual 60; Qdrant's default is 2)."""
PREFETCH = 50
"""Candidates each of the dense and the keyword search hands to the fusion."""
_WORD = re.compile(r"[a-z0-9_]+")
_STOP = frozenset(
    "a an the of to in on for and or is are be do does i my how what which when where can with "
    "it its by at as from that this there".split()
)
_BM25_K1, _BM25_B, _BM25_AVG = 1.2, 0.75, 150.0
"""BM25's term-frequency saturation and length normalisation; the average chunk length is fixed
(tokens) so that a chunk's weights never change when others are added."""


def terms(text: str) -> list[str]:
    """The words BM25 counts: lower-case letters, digits and ``_``, without stop words."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def _term_id(word: str) -> int:
    return zlib.crc32(word.encode())


def sparse_document(text: str) -> tuple[list[int], list[float]]:
    """A chunk's BM25 term weights (tf saturated, length-normalised) by term id."""
    counts = Counter(_term_id(w) for w in terms(text))
    length = sum(counts.values())
    norm = _BM25_K1 * (1 - _BM25_B + _BM25_B * length / _BM25_AVG)
    ids = sorted(counts)
    return ids, [counts[i] * (_BM25_K1 + 1) / (counts[i] + norm) for i in ids]


def sparse_query(text: str) -> tuple[list[int], list[float]]:
    """A query's terms, each once (weight 1): the score is the sum of the matched terms'
    weights times their IDF."""
    ids = sorted({_term_id(w) for w in terms(text)})
    return ids, [1.0] * len(ids)


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
            fast_sqlite(self.client)  # services/compat/qdrant_local_access.py
        self._lock = threading.Lock() if not url else None
        self._hybrid: dict[str, bool] = {}
        self._indexes: dict[str, ExactIndex] | None = {} if not url else None
        """The embedded store's in-process copy of each searched collection (index.py)."""

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
            sparse_vectors_config={SPARSE: qm.SparseVectorParams(modifier=qm.Modifier.IDF)},
        )
        if self._lock is not None:
            fast_sqlite(self.client)
        if self._lock is None:  # payload indexes only exist on a server
            for field, schema in (("source", qm.PayloadSchemaType.KEYWORD),):
                self._call(self.client.create_payload_index, collection, field, schema)

    def drop(self, collection: str) -> None:
        self.require(collection)
        self._call(self.client.delete_collection, collection)
        self._hybrid.pop(collection, None)
        self._forget(collection)

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
        self._forget(collection)

    def _forget(self, collection: str) -> None:
        if self._indexes is not None:
            with self._lock or threading.Lock():
                self._indexes.pop(collection, None)

    def upsert(self, collection: str, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        from qdrant_client import models as qm

        hybrid = self.hybrid(collection)
        sparse = [sparse_document(c.text) for c in chunks] if hybrid else None
        points = [
            qm.PointStruct(
                id=str(uuid.uuid5(_NAMESPACE, f"{c.source}\0{c.index}\0{c.doc_hash}")),
                vector=({"": v.tolist(), SPARSE: _sparse(sparse[i])} if sparse else v.tolist()),
                payload={"source": c.source, "chunk": c.index, "text": c.text, "hash": c.doc_hash},
            )
            for i, (c, v) in enumerate(zip(chunks, vectors, strict=True))
        ]
        for start in range(0, len(points), 512):
            self._call(self.client.upsert, collection, points[start : start + 512], wait=True)
        if self._indexes is None or self._lock is None:
            return
        with self._lock:
            index = self._indexes.get(collection)
            ids = [str(p.id) for p in points]
            if index is None:
                return
            if index.has_any(ids):  # a point replaced: rebuilt on the next search
                self._indexes.pop(collection, None)
                return
            index.add(ids, np.asarray(vectors, np.float32), [p.payload for p in points], sparse)

    def _index(self, collection: str) -> ExactIndex:
        """The embedded store's in-process copy of ``collection``, read from it the first
        time (call with the lock held)."""
        assert self._indexes is not None
        index = self._indexes.get(collection)
        if index is not None:
            return index
        index = ExactIndex(self.dimensions)
        direct = local_points(self.client, collection, SPARSE)  # faster than a scroll
        if direct is not None:
            index.add(*direct)
            self._indexes[collection] = index
            return index
        offset = None
        while True:
            points, offset = self.client.scroll(
                collection, limit=4096, offset=offset, with_payload=True, with_vectors=True
            )
            ids, rows, payloads, sparse = [], [], [], []
            for p in points:
                vector = p.vector
                named = vector if isinstance(vector, dict) else {"": vector}
                ids.append(str(p.id))
                rows.append(named[""])
                payloads.append(p.payload or {})
                terms = named.get(SPARSE)
                sparse.append((terms.indices, terms.values) if terms is not None else ([], []))
            if ids:
                index.add(ids, np.asarray(rows, np.float32), payloads, sparse)
            if offset is None:
                break
        self._indexes[collection] = index
        return index

    def hybrid(self, collection: str) -> bool:
        """Whether ``collection`` has BM25 sparse vectors (collections made before them do not:
        they are searched by the dense vector alone)."""
        known = self._hybrid.get(collection)
        if known is None:
            info = self._call(self.client.get_collection, collection)
            known = SPARSE in (info.config.params.sparse_vectors or {})
            self._hybrid[collection] = known
        return known

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        where: dict[str, Any] | None = None,
        text: str | None = None,
    ) -> list[dict[str, Any]]:
        """The ``k`` best chunks for a query: ``{"text", "source", "chunk", "score"}``.

        With the query's ``text`` (and a collection with sparse vectors), hybrid: the dense
        search and a BM25 keyword search each propose ``PREFETCH`` chunks, fused by reciprocal
        rank (``score`` is the fused score); without it, the cosine similarity of ``vector``.
        """

        terms_of = sparse_query(text) if text else ([], [])
        if self._indexes is not None and self._lock is not None:
            hybrid = bool(terms_of[0]) and self.hybrid(collection)
            self.require(collection)
            try:
                with self._lock:
                    return self._index(collection).search(
                        vector,
                        k,
                        where,
                        terms_of[0] if hybrid else None,
                        prefetch=PREFETCH,
                        rrf_k=RRF_K,
                    )
            except (ValueError, KeyError) as e:  # the collection went between the two calls
                raise ModelNotFound("no such collection") from e
        return self.qdrant_search(collection, vector, k, where, text)

    def qdrant_search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        where: dict[str, Any] | None = None,
        text: str | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`search` by Qdrant's own query (a server's; in the embedded store, the local
        mode's brute force, which the in-process index matches)."""
        from qdrant_client import models as qm

        terms_of = sparse_query(text) if text else ([], [])
        query_filter = _filter(where) if where else None
        if terms_of[0] and self.hybrid(collection):
            limit = max(PREFETCH, k)
            query: Any = qm.RrfQuery(rrf=qm.Rrf(k=RRF_K))
            prefetch: Any = [
                qm.Prefetch(query=vector.tolist(), limit=limit, filter=query_filter),
                qm.Prefetch(
                    query=_sparse(terms_of), using=SPARSE, limit=limit, filter=query_filter
                ),
            ]
        else:
            query, prefetch = vector.tolist(), None
        found = self._call(
            self.client.query_points,
            collection,
            query=query,
            prefetch=prefetch,
            limit=k,
            query_filter=query_filter,
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


def _sparse(pair: tuple[list[int], list[float]]) -> Any:
    from qdrant_client import models as qm

    return qm.SparseVector(indices=pair[0], values=pair[1])


def _filter(where: dict[str, Any]) -> Any:
    from qdrant_client import models as qm

    must = []
    for field, value in where.items():
        if isinstance(value, list):
            must.append(qm.FieldCondition(key=field, match=qm.MatchAny(any=value)))
        else:
            must.append(qm.FieldCondition(key=field, match=qm.MatchValue(value=value)))
    return qm.Filter(must=must)

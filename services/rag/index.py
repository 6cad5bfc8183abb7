"""The embedded store's search: exact, in this process, over one contiguous float32 matrix.

qdrant-client's local mode searches by brute force in Python: 12 ms at 10 k chunks for the dense
vector alone and 82 ms with its sparse (BM25) search, 923 ms at 100 k (bench/RESULTS.md, "RAG").
The embedded store keeps Qdrant's local mode as the store of record (its folder, its API, the
same calls as a server) and answers searches from this copy of one collection: the unit vectors
as rows of one matrix (cosine = one matrix-vector product) and the BM25 weights as an inverted
index. Scores follow Qdrant's: cosine, the IDF of ``Modifier.IDF`` (``ln(1 + (N - n + .5) /
(n + .5))``), and reciprocal rank fusion ``1 / (rank + k)`` (rank from 0). ``VectorStore`` fills
it from the store on a collection's first search and keeps it in step with each upsert; a delete
drops it (rebuilt on the next search).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class ExactIndex:
    """One collection's points: dense rows, BM25 postings and the payload fields searches use."""

    def __init__(self, dimensions: int) -> None:
        self.dimensions = dimensions
        self._rows = np.zeros((0, dimensions), np.float32)
        self._n = 0
        self.ids: list[str] = []
        self.sources: list[str] = []
        self.chunks: list[int] = []
        self.texts: list[str] = []
        self._postings: dict[int, tuple[list[int], list[float]]] = {}
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._known: set[str] = set()

    def __len__(self) -> int:
        return self._n

    def has_any(self, ids: Sequence[str]) -> bool:
        return any(i in self._known for i in ids)

    def add(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any]],
        sparse: Sequence[tuple[Sequence[int], Sequence[float]]] | None = None,
    ) -> None:
        """Append points (ids not yet in the index)."""
        count = len(ids)
        if self._n + count > len(self._rows):  # grow by doubling: appends stay amortised O(1)
            grown = np.zeros((max(2 * len(self._rows), self._n + count, 1024), self.dimensions))
            grown = grown.astype(np.float32)
            grown[: self._n] = self._rows[: self._n]
            self._rows = grown
        self._rows[self._n : self._n + count] = vectors
        for offset, (point, payload) in enumerate(zip(ids, payloads, strict=True)):
            self.ids.append(point)
            self._known.add(point)
            self.sources.append(str(payload.get("source", "")))
            self.chunks.append(int(payload.get("chunk", 0)))
            self.texts.append(str(payload.get("text", "")))
            if sparse is not None:
                row = self._n + offset
                for term, weight in zip(*sparse[offset], strict=True):
                    rows, weights = self._postings.setdefault(term, ([], []))
                    rows.append(row)
                    weights.append(weight)
                    self._arrays.pop(term, None)
        self._n += count

    def _mask(self, where: dict[str, Any] | None) -> np.ndarray | None:
        if not where:
            return None
        mask = np.ones(self._n, bool)
        for field, value in where.items():
            wanted = set(value) if isinstance(value, list) else {value}
            column = self.sources if field == "source" else self.chunks
            mask &= np.fromiter((v in wanted for v in column), bool, self._n)
        return mask

    def _dense(
        self, vector: np.ndarray, limit: int, mask: np.ndarray | None
    ) -> tuple[list[int], np.ndarray]:
        scores = self._rows[: self._n] @ vector.astype(np.float32)
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
            limit = min(limit, int(mask.sum()))
        return _top(scores, limit)[0], scores

    def _postings_of(self, term: int) -> tuple[np.ndarray, np.ndarray] | None:
        if term not in self._postings:
            return None
        arrays = self._arrays.get(term)
        if arrays is None:
            rows, weights = self._postings[term]
            arrays = self._arrays[term] = (np.asarray(rows), np.asarray(weights, np.float32))
        return arrays

    def _keyword(self, terms: Sequence[int], limit: int, mask: np.ndarray | None) -> list[int]:
        scores = np.zeros(self._n, np.float32)
        hit = np.zeros(self._n, bool)
        for term in set(terms):
            found = self._postings_of(term)
            if found is None:
                continue
            rows, weights = found
            df = len(rows)
            idf = math.log((self._n - df + 0.5) / (df + 0.5) + 1)
            np.add.at(scores, rows, weights * idf)
            hit[rows] = True
        if mask is not None:
            hit &= mask
        candidates = np.flatnonzero(hit)
        if not len(candidates):
            return []
        order = _top(scores[candidates], min(limit, len(candidates)))[0]
        return [int(candidates[i]) for i in order]

    def search(
        self,
        vector: np.ndarray,
        k: int,
        where: dict[str, Any] | None = None,
        terms: Sequence[int] | None = None,
        prefetch: int = 50,
        rrf_k: int = 60,
    ) -> list[dict[str, Any]]:
        """The ``k`` best points: cosine alone, or with ``terms`` the fusion of the dense and
        the keyword search's ``prefetch`` best each. ``{"text", "source", "chunk", "score"}``."""
        if not self._n:
            return []
        mask = self._mask(where)
        if not terms:
            rows, scores = self._dense(vector, k, mask)
            ranked = [(r, float(scores[r])) for r in rows]
        else:
            fused: dict[int, float] = {}
            dense, _ = self._dense(vector, max(prefetch, k), mask)
            for ranking in (dense, self._keyword(terms, max(prefetch, k), mask)):
                for rank, row in enumerate(ranking):
                    fused[row] = fused.get(row, 0.0) + 1.0 / (rank + rrf_k)
            ranked = sorted(fused.items(), key=lambda item: -item[1])[:k]
        return [
            {
                "text": self.texts[r],
                "source": self.sources[r],
                "chunk": self.chunks[r],
                "score": round(s, 6),
            }
            for r, s in ranked
        ]


def _top(scores: np.ndarray, limit: int) -> tuple[list[int], np.ndarray]:
    """Indices of the ``limit`` highest ``scores``, best first."""
    if limit <= 0:
        return [], scores
    if limit < len(scores):
        part = np.argpartition(-scores, limit - 1)[:limit]
    else:
        part = np.arange(len(scores))
    return [int(i) for i in part[np.argsort(-scores[part], kind="stable")]], scores

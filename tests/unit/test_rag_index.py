"""The embedded store's in-process search (services/rag/index.py) answers as Qdrant does:
the same chunks, in the same order, with the same scores as qdrant-client's own query of the
same collection, for the dense search, the hybrid (dense + BM25, fused by rank) and filters,
and it stays in step with upserts and deletes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.rag.chunking import Chunk
from services.rag.store import VectorStore

WORDS = [f"w{i}" for i in range(400)]


def _fill(store: VectorStore, n: int, seed: int, start: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # each text a different length: BM25 scores do not tie (tied chunks come in either order)
    texts = [" ".join(rng.choice(WORDS, size=5 + start + i)) for i in range(n)]
    chunks = [Chunk(f"doc{(start + i) % 7}.md", start + i, t, "h") for i, t in enumerate(texts)]
    store.upsert("c", chunks, vectors)
    return vectors, texts


def _same(store: VectorStore, vector: np.ndarray, k: int, where: dict, text: str | None) -> None:
    ours = store.search("c", vector, k, where, text)
    theirs = store.qdrant_search("c", vector, k, where, text)
    np.testing.assert_allclose([m["score"] for m in ours], [m["score"] for m in theirs], atol=2e-5)
    # the same chunks, in the same order, but where scores tie (either order is right)
    scores = [m["score"] for m in theirs]
    alone = [i for i, s in enumerate(scores) if sum(abs(s - t) < 2e-5 for t in scores) == 1]
    assert [ours[i]["chunk"] for i in alone] == [theirs[i]["chunk"] for i in alone]
    assert {m["chunk"] for m in ours} == {m["chunk"] for m in theirs} or len(alone) < k


def test_the_in_process_index_answers_as_qdrant(tmp_path: Path) -> None:
    store = VectorStore(8, path=tmp_path / "q")
    store.ensure("c")
    vectors, texts = _fill(store, 300, 1)
    assert store.hybrid("c")
    for q in range(12):
        where = [{}, {"source": "doc3.md"}, {"source": ["doc1.md", "doc2.md"]}, {"chunk": 5}][q % 4]
        _same(store, vectors[q * 7], 5, where, None)
        _same(store, vectors[q * 7], 5, where, texts[q + 100])
    _fill(store, 50, 2, start=300)  # appended to the index
    store.delete_sources("c", ["doc4.md"])  # the index is rebuilt
    for q in range(4):
        _same(store, vectors[q], 4, {}, texts[q + 20])
    store.close()


def test_a_keyword_only_match_is_found(tmp_path: Path) -> None:
    store = VectorStore(3, path=tmp_path / "q")
    store.ensure("c")
    chunks = [
        Chunk("a.md", 0, "alpha about serving", "h"),
        Chunk("b.md", 0, "beta about routing", "h"),
        Chunk("c.md", 0, "SERVERY_FAST_PATH switches the fast path", "h"),
    ]
    store.upsert("c", chunks, np.eye(3, dtype=np.float32))
    near_a = np.array([1, 0.1, 0], np.float32) / np.float32(np.hypot(1, 0.1))
    assert [m["source"] for m in store.search("c", near_a, 2)] == ["a.md", "b.md"]
    found = store.search("c", near_a, 2, text="how do I turn off SERVERY_FAST_PATH?")
    assert {m["source"] for m in found} == {"a.md", "c.md"}
    store.close()


def test_the_embedded_store_writes_sqlite_in_wal_mode(tmp_path: Path) -> None:
    """services/compat/qdrant_local_access.py's fast_sqlite reaches into qdrant-client local
    mode's private attributes: this fails when they change (the fix then does nothing and 10 k
    chunks take minutes again)."""
    from services.compat.qdrant_local_access import fast_sqlite

    store = VectorStore(8, path=tmp_path)
    store.ensure("c")
    vectors, _ = _fill(store, 30, seed=3)
    [con] = fast_sqlite(store.client)  # the one collection's connection, reached
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    store.close()
    again = VectorStore(8, path=tmp_path)  # collections opened from the folder: set too
    assert again.count("c") == 30
    [con] = fast_sqlite(again.client)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert again.search("c", vectors[4], 1)[0]["chunk"] == 4
    again.close()


def test_the_index_reads_local_mode_arrays_as_a_scroll_does(tmp_path: Path) -> None:
    """services/compat/qdrant_local_access.py's local_points reads local mode's private arrays
    (fast); on this qdrant-client it must give what scrolling the collection gives, deleted
    points left out."""
    from services.compat.qdrant_local_access import local_points
    from services.rag.store import SPARSE

    store = VectorStore(8, path=tmp_path)
    store.ensure("c")
    _fill(store, 120, seed=4)
    store.delete_sources("c", ["doc2.md"])
    direct = local_points(store.client, "c", SPARSE)
    assert direct is not None, "qdrant-client's local mode changed: the index fills by scroll"
    ids, rows, payloads, sparse = direct
    records, _ = store.client.scroll("c", limit=1000, with_payload=True, with_vectors=True)
    assert len(ids) == len(records) == 120 - len([i for i in range(120) if i % 7 == 2])
    at = {point: i for i, point in enumerate(ids)}
    for record in records:
        i = at[str(record.id)]
        np.testing.assert_allclose(rows[i], record.vector[""], rtol=1e-6)
        assert payloads[i] == record.payload
        assert list(sparse[i][0]) == list(record.vector[SPARSE].indices)
        np.testing.assert_allclose(sparse[i][1], record.vector[SPARSE].values)
    store.close()

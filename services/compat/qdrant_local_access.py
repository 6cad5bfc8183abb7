"""Two reaches into qdrant-client's local mode (the embedded vector store) for speed.

Replaces: qdrant-client 1.20.0, nothing patched; services/rag/store.py calls both where it needs
them. :func:`fast_sqlite` reads ``QdrantClient._client.collections[name].storage.storage`` (the
``sqlite3`` connection of ``qdrant_client/local/persistence.py``, ``CollectionPersistence``) and
changes its journal; :func:`local_points` reads ``LocalCollection``'s arrays
(``qdrant_client/local/local_collection.py``: ``vectors[""]``, ``payload``, ``sparse_vectors``,
``deleted``, ``ids_inv``) in place of ``QdrantClient.scroll``.

Defect (costs, not bugs): ``CollectionPersistence.persist`` writes each point in its own
transaction, and SQLite's default rollback journal syncs the disk at each commit: most of an
upsert's time is those syncs. :func:`fast_sqlite` puts each collection's SQLite file in WAL mode
with ``synchronous=NORMAL``: a commit appends to the log without a sync (the log is synced at
checkpoints). The store stays consistent; a power loss (not a crash of the process) may lose the
last commits, which ``servery rag ingest`` re-sends (idempotent by content hash). Separately,
filling servery's in-process search copy (services/rag/index.py) by ``scroll`` builds a pydantic
record per point with copies of its vectors and sorts all ids again for every page;
:func:`local_points` copies the matrix instead.

Harm: upserting 10 k chunks took 85 s (118 points/s, about 90 % of it in the commits) and 100 k
over 20 minutes; with WAL 3.8 s, same run. Filling the search copy by scroll took 2.7-2.9 s at
10 k chunks and 29-44 s at 100 k; from the arrays 0.11 s and 5.1 s (docs/rag.md, "Production: a
Qdrant server").

Known for: qdrant-client 1.20.0. Guard: warn (both fall back to upstream's own behaviour where
the private attributes are not what they expect: :func:`fast_sqlite` changes nothing, writes are
only slow; :func:`local_points` returns None and the caller scrolls; a changed upstream definition
is caught by ``UPSTREAM``). tests/unit/test_rag_index.py checks both still reach what they expect.
Reported upstream: not reported (local mode is documented as for development and small
collections; no report of either cost found).
"""

from __future__ import annotations

from typing import Any

# What this fix was written against: services.compat.fingerprint() of each upstream definition.
UPSTREAM = {
    # QdrantClient._client is the QdrantLocal; QdrantLocal.collections its LocalCollections
    "qdrant_client.qdrant_client:QdrantClient.__init__": "5b3680626421738d",
    "qdrant_client.local.qdrant_local:QdrantLocal.__init__": "44db088606932345",
    "qdrant_client.local.qdrant_local:QdrantLocal._load": "86d696e126255e50",
    # the arrays local_points reads: how they are made, filled, updated and marked deleted
    "qdrant_client.local.local_collection:LocalCollection.__init__": "b11305717f3f5559",
    "qdrant_client.local.local_collection:LocalCollection.load_vectors": "ccd81e45e9685ac9",
    "qdrant_client.local.local_collection:LocalCollection._add_point": "702d68e07e06f792",
    "qdrant_client.local.local_collection:LocalCollection._update_point": "464161659f4b1d7b",
    "qdrant_client.local.local_collection:LocalCollection._delete_ids": "a907525842777dac",
    # the sqlite3 connection fast_sqlite sets, and the one-transaction-per-point write
    "qdrant_client.local.persistence:CollectionPersistence.__init__": "eaead9730845e3b3",
    "qdrant_client.local.persistence:CollectionPersistence.persist": "c36b320b6301f3e3",
}


def local_points(
    client: Any, collection: str, sparse_name: str
) -> tuple[list[str], Any, list, list] | None:
    """All live points of a local-mode collection, read from its arrays: ``(ids, vectors (as
    local mode holds them: normalised for cosine at upsert), payloads, sparse (indices,
    values))`` (the sparse vector named ``sparse_name``; empty pairs
    where the collection has none), or None where local mode's attributes are not those of
    qdrant-client 1.20.0 (the caller then scrolls). tests/unit/test_rag_index.py checks both
    ways give the same points."""
    import numpy as np

    try:
        coll = client._client.collections[collection]
        n = len(coll.ids_inv)
        live = np.flatnonzero(~np.asarray(coll.deleted[:n], bool))
        rows = np.asarray(coll.vectors[""][:n], np.float32)[live]
        payloads = [coll.payload[i] for i in live]
        ids = [str(coll.ids_inv[i]) for i in live]
        terms = coll.sparse_vectors.get(sparse_name)
        sparse = [(terms[i].indices, terms[i].values) for i in live] if terms else None
    except (AttributeError, KeyError, TypeError, IndexError):
        return None
    if rows.shape != (len(ids), rows.shape[1]) or len(payloads) != len(ids):
        return None
    return ids, rows, payloads, sparse or [([], [])] * len(ids)


def fast_sqlite(client: Any) -> list[Any]:
    """Put the SQLite file of each collection the local-mode ``client`` has open in WAL mode
    with ``synchronous=NORMAL``. Where the private attributes are gone (another qdrant-client),
    nothing is changed. Returns the connections it set (tests/unit/test_rag_index.py checks they
    are set on 1.20.0)."""
    done = []
    collections = getattr(getattr(client, "_client", None), "collections", None) or {}
    for collection in list(collections.values()):
        con = getattr(getattr(collection, "storage", None), "storage", None)
        if con is None or not hasattr(con, "execute"):
            continue
        if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        done.append(con)
    return done

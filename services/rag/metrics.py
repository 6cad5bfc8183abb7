"""RAG metrics (module level: BentoML's multiprocess registry merges them into ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RETRIEVAL_SECONDS = Histogram(
    "servery_rag_retrieval_seconds",
    "Retrieval time (query embedding + vector search), by collection and app ('-': the query "
    "endpoint)",
    ["collection", "app"],
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
MATCHES = Histogram(
    "servery_rag_matches",
    "Passages returned per retrieval, by collection and app",
    ["collection", "app"],
    buckets=(0, 1, 2, 4, 8, 16, 32, 64),
)
EMBED_REQUESTS = Counter(
    "servery_embeddings_requests",
    "Embedding requests (the /v1/embeddings endpoint and ingestion), by model and status",
    ["model", "status"],
)
EMBED_INPUTS = Counter(
    "servery_embeddings_inputs", "Strings embedded, by model and use", ["model", "use"]
)
EMBED_TOKENS = Counter(
    "servery_embeddings_tokens", "Tokens embedded, by model and use", ["model", "use"]
)
CHUNKS_INGESTED = Counter(
    "servery_rag_chunks_ingested", "Chunks added to a collection", ["collection"]
)
RAG_CHATS = Counter(
    "servery_rag_chat_requests",
    "Chat requests to a RAG app, by app and outcome (answered by the LLM, or refused first)",
    ["app", "outcome"],
)

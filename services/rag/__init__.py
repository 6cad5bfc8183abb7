"""Retrieval-augmented generation: embeddings, the vector store, ingestion, retrieval, RAG apps."""

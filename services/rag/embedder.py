"""The embedding model, served by sentence-transformers with concurrent requests merged.

Why sentence-transformers and not vLLM's pooling runner (the LLM service's machinery): on this
project's 2-core machines the batched sentence-transformers path embedded 3.5x the strings per
second of vLLM's pooling runner, which also took 67 s to start (docs/rag.md, "Why").

Requests queue; one task takes everything queued (up to ``max_batch`` strings), runs one
``encode`` in a thread, and hands each request its rows. While a batch runs the next one
gathers, so under load batches grow by themselves and a lone request waits for no window.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[tuple[np.ndarray, int]] = field(repr=False)


class Embedder:
    """One embedding model (a sentence-transformers folder) and its request merger."""

    def __init__(self, name: str, path: Path, *, max_batch: int = 256, tag: str = "") -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = name
        self.tag = tag or name
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.dimensions = int(self.model.get_embedding_dimension() or 0)
        self.max_tokens = int(self.model.max_seq_length)
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.largest_batch = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` now (blocking): unit-length float32 rows."""
        vectors = self.model.encode(
            texts,
            batch_size=64,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text counts for (as the model reads it: truncated to ``max_tokens``)."""
        lengths = self.model.tokenizer(
            texts, truncation=True, max_length=self.max_tokens, return_length=True
        )["length"]
        return [int(n) for n in lengths]

    def _encode_jobs(self, jobs: list[_Job]) -> tuple[np.ndarray, list[int]]:
        texts = [t for job in jobs for t in job.texts]
        lengths = self.tokens(texts)
        counts, start = [], 0
        for job in jobs:
            counts.append(sum(lengths[start : start + len(job.texts)]))
            start += len(job.texts)
        return self.encode(texts), counts

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Embed ``texts`` in the next batch: their rows and the tokens they count for."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[tuple[np.ndarray, int]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(texts, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].texts)
            while not self._queue.empty() and size < self.max_batch:
                job = self._queue.get_nowait()
                jobs.append(job)
                size += len(job.texts)
            texts = [t for job in jobs for t in job.texts]
            try:
                vectors, counts = await asyncio.to_thread(self._encode_jobs, jobs)
            except Exception as e:  # every waiting request fails with it, the loop goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(texts))
            start = 0
            for job, tokens in zip(jobs, counts, strict=True):
                rows = vectors[start : start + len(job.texts)]
                start += len(job.texts)
                if not job.future.done():  # the client may have gone
                    job.future.set_result((rows, tokens))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def load(name: str, max_batch: int) -> Embedder:
    """The stored embedding model ``name`` (latest version)."""
    from models.embeddings import st_dir

    path, bento_model = st_dir(name)
    return Embedder(name, path, max_batch=max_batch, tag=str(bento_model.tag))

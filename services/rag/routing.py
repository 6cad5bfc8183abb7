"""The router's ``/v1`` split: RAG routes and RAG-app chats to the RAG service, the rest to the LLM
service. Both are :class:`~services.llm.proxy.StreamingProxy` instances (streaming, abort on
disconnect, per-key model filter on ``/v1/models``, metrics)."""

from __future__ import annotations

from typing import Any

from services.llm.openai_api import MODELS, canonical_path, model_of, read_body, replaying
from services.protocols.errors import openai_error
from services.runtime.errors import PayloadTooLarge

CHAT = "/v1/chat/completions"


class V1Split:
    """ASGI app: ``/v1/models``, ``/v1/embeddings`` and ``/v1/rag/...`` go to ``rag``; a chat
    whose ``model`` is a RAG app too; everything else to ``llm``."""

    def __init__(self, llm: Any, rag: Any, apps: frozenset[str], max_body_bytes: int) -> None:
        self.llm, self.rag, self.apps, self.limit = llm, rag, apps, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = canonical_path(scope)
        if path == MODELS or path == "/v1/embeddings" or path.startswith("/v1/rag/"):
            return await self.rag(scope, receive, send)
        if path == CHAT and scope["method"] == "POST" and self.apps:
            try:
                body, left = await read_body(receive, self.limit)
            except PayloadTooLarge as e:
                return await openai_error(e)(scope, receive, send)
            receive = replaying(body, receive, left)
            if left is None and model_of(body) in self.apps:
                return await self.rag(scope, receive, send)
        await self.llm(scope, receive, send)

    async def close(self) -> None:
        for proxy in (self.llm, self.rag):
            await proxy.close()

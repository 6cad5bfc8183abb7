"""RAG apps over the OpenAI chat API: retrieve for the last user message, then let the LLM answer.

The request is rewritten (a system message with the numbered passages, ``model`` set to the app's
LLM) and handed to the LLM proxy, which streams the answer unbuffered and aborts the generation
when the client leaves. Sources come back three ways: the ``x-servery-sources`` header (JSON,
ASCII), a last SSE chunk before ``[DONE]`` whose ``sources`` lists them (``choices`` empty, as
OpenAI's usage chunk), and a ``sources`` field of a whole (non-streamed) answer.
"""

from __future__ import annotations

import json
from typing import Any

from services.rag.settings import RagApp
from services.runtime.errors import BadRequest

BYTES_PER_TOKEN = 4
"""Passages are kept within ``max_context_tokens`` estimated at 4 characters a token."""


def question_of(doc: dict[str, Any]) -> str:
    """The last user message's text (a string or the text parts of a list); 400 if none."""
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(
                    p.get("text", "")
                    for p in content
                    if isinstance(p, dict) and p.get("type") == "text"
                )
            if isinstance(content, str) and content.strip():
                return content.strip()
            break
    raise BadRequest("a RAG app needs a user message with text to retrieve for", param="messages")


def context_of(matches: list[dict[str, Any]], max_tokens: int) -> tuple[str, list[dict[str, Any]]]:
    """The numbered passages that fit in ``max_tokens`` (estimated), best first, and their
    sources (``{"n", "source", "chunk", "score"}``)."""
    budget = max_tokens * BYTES_PER_TOKEN
    parts: list[str] = []
    sources: list[dict[str, Any]] = []
    for match in matches:
        n = len(sources) + 1
        text = f"[{n}] {match['source']}\n{match['text']}"
        if parts and len(text) > budget:
            break
        parts.append(text[: max(budget, 0)])
        budget -= len(parts[-1]) + 2
        sources.append({"n": n, **{k: match[k] for k in ("source", "chunk", "score")}})
    return "\n\n".join(parts), sources


def rewrite(doc: dict[str, Any], app: RagApp, context: str) -> bytes:
    """The LLM request: the app's system prompt with the passages first, then the client's
    messages; ``model`` is the app's LLM."""
    system = {"role": "system", "content": app.prompt.replace("{context}", context)}
    out = {**doc, "model": app.llm, "messages": [system, *doc["messages"]]}
    return json.dumps(out).encode()


def sources_header(sources: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    return b"x-servery-sources", json.dumps(sources, ensure_ascii=True).encode("ascii")


def with_sources(send: Any, sources: list[dict[str, Any]]) -> Any:
    """``send`` for the LLM's answer with the sources added: the header; in a stream, one chunk
    before ``data: [DONE]``; in a whole JSON answer, a ``sources`` field."""
    state: dict[str, Any] = {"stream": False, "json": False, "start": None, "body": bytearray()}
    chunk = json.dumps({"object": "chat.completion.chunk", "choices": [], "sources": sources})
    extra = f"data: {chunk}\n\n".encode()

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), sources_header(sources)]
            ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            state["stream"] = b"text/event-stream" in ctype
            state["json"] = message["status"] == 200 and b"application/json" in ctype
            if state["json"]:
                state["start"] = {**message, "headers": headers}
                return  # held until the body is whole: its length changes
            await send({**message, "headers": headers})
            return
        body = message.get("body", b"")
        if state["json"]:
            state["body"] += body
            if message.get("more_body", False):
                return
            out = bytes(state["body"])
            try:
                answer = json.loads(out)
                answer["sources"] = sources
                out = json.dumps(answer).encode()
            except (ValueError, TypeError):
                pass
            start = state["start"]
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(out)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": out, "more_body": False})
            return
        if state["stream"] and b"data: [DONE]" in body:
            at = body.index(b"data: [DONE]")
            body = body[:at] + extra + body[at:]
        await send({**message, "body": body})

    return sending

"""The engine's token counts read from OpenAI answers as they pass through the router, for usage
per key (services/ops/usage.py); applied by the router's fast path (services/gateway/fastpath.py)
to every ``/v1`` POST whose route names a model (chat, completions, embeddings; RAG apps too,
whose chats the RAG service hands on to the LLM unchanged but for the messages).

* A whole answer: the JSON body's ``usage`` (a copy of the body is kept while it is sent, up to
  :data:`MAX_HELD` bytes).
* A stream: vLLM sends ``usage`` only when the request asks for it
  (``stream_options.include_usage``), in one last chunk with empty ``choices`` before
  ``data: [DONE]``. The tap asks for it on every stream that does not, and takes that chunk out
  of what the client receives, so every client gets the stream it asked for and every stream is
  counted. Why ask rather than read it only when present: most clients never ask (OpenAI's
  Python client does not by default), and counting chunks instead would be a guess (one chunk may
  carry several tokens; vLLM's ``stream_interval``). A client that asked keeps its chunk (and a
  client asking ``continuous_usage_stats`` its running counts; the last one is counted). One
  difference remains: vLLM then puts ``system_fingerprint`` (when configured) on the usage chunk
  instead of the stream's last one.

Only answers with status 200 are counted, under the model the request named (a served name,
else the engine would have refused it; absent, the answer's). A stream the client leaves before
its end counts as a request without tokens: the engine's count never arrives.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pydantic_core

from services.llm.openai_api import parse_object, read_body, replaying, route_of
from services.ops.usage import OPEN, TALLY
from services.protocols.state import SCOPE_KEY
from services.runtime.errors import BadRequest

logger = logging.getLogger("servery")

MAX_HELD = 8 * 2**20
"""The most of a whole answer copied to read its ``usage`` (a longer one counts no tokens)."""

_USAGE = b'"usage"'
_DONE = b"data: [DONE]"


async def tap(
    scope: dict[str, Any], receive: Any, send: Any, limit: int | None
) -> tuple[Any, Any, Callable[[], None] | None]:
    """``(receive, send, done)`` for one ``/v1`` request: ``send`` reads (and for a stream that
    did not ask for it, removes) the answer's ``usage``, ``done()`` counts the request once it
    ended. A request the tap does not count comes back as it was, with ``done`` None.

    ``limit``: the body size limit (checked already; read up to it again to be safe)."""
    route = route_of(scope)
    if route is None or not route.names_model or scope["method"] != "POST":
        return receive, send, None
    body, left = await read_body(receive, limit)
    if left is not None:  # the client left: nothing will be answered
        return replaying(body, receive, left), send, None
    try:
        doc = parse_object(body)
    except BadRequest:  # refused by the service behind in its own words
        return replaying(body, receive), send, None
    model = doc.get("model")
    reader = UsageReader(model if isinstance(model, str) else None)
    if doc.get("stream") is True and not _asks_usage(doc.get("stream_options")):
        options = doc.get("stream_options")
        if options is None or isinstance(options, dict):
            doc["stream_options"] = {**(options or {}), "include_usage": True}
            body = json.dumps(doc).encode()
            reader.strip = True
    key = scope.get(SCOPE_KEY)
    name = OPEN if key is None else key.name

    def done() -> None:
        reader.count(name)

    return replaying(body, receive), reader.wrap(send), done


def _asks_usage(options: Any) -> bool:
    return isinstance(options, dict) and options.get("include_usage") is True


class UsageReader:
    """Reads ``usage`` from one answer as :meth:`wrap`'s ``send`` passes it on."""

    def __init__(self, model: str | None) -> None:
        self.model = model
        self.strip = False
        """Take the usage-only chunk out of a stream (the tap asked for it, not the client)."""
        self.status = 0
        self.stream = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.answer_model: str | None = None
        self._held: bytearray | None = bytearray()
        self._partial = b""  # a stream's incomplete last event

    def wrap(self, send: Any) -> Any:
        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                ctype = next(
                    (v for k, v in message.get("headers", ()) if k.lower() == b"content-type"),
                    b"",
                )
                self.stream = b"text/event-stream" in ctype
            elif message["type"] == "http.response.body" and self.status == 200:
                if self.stream:
                    message = {**message, "body": self._events(message)}
                else:
                    self._hold(message)
            await send(message)

        return sending

    def _hold(self, message: dict[str, Any]) -> None:
        if self._held is None:
            return
        self._held += message.get("body", b"")
        if len(self._held) > MAX_HELD:
            self._held = None
            logger.warning("usage: an answer over %d bytes, its tokens not counted", MAX_HELD)
            return
        if not message.get("more_body", False):
            try:
                self._read(pydantic_core.from_json(bytes(self._held)))
            except ValueError:
                pass
            self._held = None

    def _events(self, message: dict[str, Any]) -> bytes:
        """The complete SSE events of what arrived so far (the usage-only one dropped when
        :attr:`strip`); an incomplete last event waits for the next chunk."""
        data = self._partial + message.get("body", b"")
        more = message.get("more_body", False)
        cut = data.rfind(b"\n\n") + 2 if more else len(data)
        if more and cut <= 1:  # no complete event yet
            self._partial = data
            return b""
        ready, self._partial = data[:cut], data[cut:]
        if _USAGE not in ready:
            return ready
        kept = []
        for event in ready.split(b"\n\n"):
            if _USAGE in event and self._usage_only(event):
                continue
            kept.append(event)
        return b"\n\n".join(kept)

    def _usage_only(self, event: bytes) -> bool:
        """Read the usage of one SSE event; True when it is the usage-only chunk to drop."""
        line = event.strip()
        if not line.startswith(b"data:") or line.endswith(_DONE):
            return False
        try:
            chunk = pydantic_core.from_json(line[5:].strip())
        except ValueError:
            return False
        if not isinstance(chunk, dict) or not self._read(chunk):
            return False
        return self.strip and chunk.get("choices") == []

    def _read(self, answer: Any) -> bool:
        """Take the counts of an answer or chunk with a ``usage``; whether it had one."""
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if not isinstance(usage, dict):
            return False
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        self.prompt_tokens = prompt if isinstance(prompt, int) else 0
        self.completion_tokens = completion if isinstance(completion, int) else 0
        if isinstance(answer.get("model"), str):
            self.answer_model = answer["model"]
        return True

    def count(self, key: str) -> None:
        """Count the request (a 200 answer) in ``key``'s usage."""
        model = self.model or self.answer_model
        if self.status != 200 or model is None:
            return
        TALLY.add(
            key,
            model[:64],
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )

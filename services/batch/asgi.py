"""One batch line as an HTTP request to the router's own ASGI app, in this process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any


class JsonBytes(bytes):
    """An answer whose content type is JSON (:class:`AsgiCaller`): it goes into the output
    line as it is."""


class AsgiCaller:
    """Runs a request through an ASGI app in this process (the router's FastAPI app): the
    handlers online requests reach, with the batch owner's key in the scope (``key_of`` makes
    it), so a key limited to some models is limited in its batches too."""

    def __init__(self, app: Any, key_of: Callable[[str, list[str] | None], Any]) -> None:
        self.app, self.key_of = app, key_of

    async def __call__(
        self, method: str, url: str, body: bytes, owner: str, models: list[str] | None
    ) -> tuple[int, bytes]:
        from services.llm.openai_api import ROUTES, model_of
        from services.protocols.state import SCOPE_KEY
        from services.runtime.errors import ServeryError

        key = self.key_of(owner, models)
        route = ROUTES.get(url)
        if key is not None and route is not None and route.names_model:
            try:  # what the gate checks on /v1 (the handlers check /predict and /v2 themselves)
                key.check_model(model_of(body))
            except ServeryError as e:
                return e.status_code, json.dumps({"error": {"message": e.message}}).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": url,
            "raw_path": url.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("batch", 0),
            "server": ("batch", 0),
            "app": self.app,
            SCOPE_KEY: key,
        }
        sent = False
        status = [0]
        is_json = [False]
        chunks: list[bytes] = []
        never = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()  # the client never leaves
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                is_json[0] = any(
                    k.lower() == b"content-type" and v.startswith(b"application/json")
                    for k, v in message.get("headers", ())
                )
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        body_out = b"".join(chunks)
        return status[0], JsonBytes(body_out) if is_json[0] else body_out

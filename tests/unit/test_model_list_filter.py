"""services/llm/proxy.py: a restricted API key's ``/v1/models`` answer, filtered in the proxy."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.llm.proxy import _only_models


def run(
    status: int, chunks: list[bytes], allowed: set[str]
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        filtered = _only_models(send, lambda m: m in allowed)
        headers = [(b"content-type", b"application/json"), (b"x-request-id", b"7")]
        await filtered({"type": "http.response.start", "status": status, "headers": headers})
        for i, chunk in enumerate(chunks):
            more = i < len(chunks) - 1
            await filtered({"type": "http.response.body", "body": chunk, "more_body": more})
            if more:
                assert not sent, "sent before the last chunk"

    asyncio.run(main())
    start, body = sent
    assert body["type"] == "http.response.body" and not body.get("more_body", False)
    return start["status"], dict(start["headers"]), body["body"]


def test_only_allowed_ids_are_listed_with_a_new_length() -> None:
    listing = {"object": "list", "data": [{"id": "a"}, {"id": "b"}, {"id": "c", "parent": "b"}]}
    text = json.dumps(listing).encode()
    status, headers, body = run(200, [text[:10], text[10:]], {"a", "c"})
    assert status == 200 and headers[b"x-request-id"] == b"7"
    assert json.loads(body) == {"object": "list", "data": [{"id": "a"}, {"id": "c", "parent": "b"}]}
    assert headers[b"content-length"] == str(len(body)).encode()


def test_an_error_answer_passes_unchanged() -> None:
    error = b'{"error": {"message": "the LLM engines are still starting", "code": 503}}'
    status, headers, body = run(503, [error], {"a"})
    assert (status, body) == (503, error)
    assert headers[b"content-length"] == str(len(error)).encode()


@pytest.mark.parametrize("bad", [b"not json", b'{"object": "list"}', b'{"data": [1, 2]}', b"[]"])
def test_a_listing_that_cannot_be_filtered_is_502_not_passed_on(bad: bytes) -> None:
    status, _, body = run(200, [bad], {"a"})
    assert status == 502
    assert json.loads(body)["error"]["type"] == "BadGatewayError"

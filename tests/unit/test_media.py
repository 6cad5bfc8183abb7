"""Content-Type and Content-Encoding of prediction bodies (services/protocols/media.py)."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from typing import Any

import pytest
from starlette.requests import ClientDisconnect, Request

from services.protocols.media import UnsupportedMediaType, check_content_type, decode, read_body
from services.runtime.errors import BadRequest, PayloadTooLarge

BODY = b'{"model": "iris", "inputs": [[1, 2, 3, 4]]}'


@pytest.mark.parametrize(
    "value",
    [None, "", "application/json", "Application/JSON; charset=utf-8", "application/ld+json"],
)
def test_json_or_no_content_type_is_accepted(value: str | None) -> None:
    check_content_type(value, binary=False)
    check_content_type(value, binary=True)


def test_octet_stream_only_where_binary_tensors_are_allowed() -> None:
    check_content_type("application/octet-stream", binary=True)
    with pytest.raises(UnsupportedMediaType) as e:
        check_content_type("application/octet-stream", binary=False)
    assert e.value.status_code == 415 and "application/json" in e.value.message


@pytest.mark.parametrize(
    "value", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x", "x"]
)
def test_other_content_types_are_415_naming_what_to_send(value: str) -> None:
    with pytest.raises(UnsupportedMediaType) as e:
        check_content_type(value, binary=True)
    assert value in e.value.message and "application/json" in e.value.message


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        (None, BODY),
        ("identity", BODY),
        ("gzip", gzip.compress(BODY)),
        (" X-GZIP ", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
    ],
)
def test_supported_encodings_decode(encoding: str | None, data: bytes) -> None:
    assert decode(data, encoding, 1024) == BODY


def test_unknown_encoding_is_415() -> None:
    with pytest.raises(UnsupportedMediaType, match="'br'"):
        decode(BODY, "br", 1024)


def test_inflated_size_is_bounded() -> None:
    bomb = gzip.compress(b"0" * 10_000)
    assert decode(bomb, "gzip", 10_000) == b"0" * 10_000
    with pytest.raises(PayloadTooLarge):
        decode(bomb, "gzip", 9_999)


@pytest.mark.parametrize(
    ("encoding", "data", "words"),
    [
        ("gzip", BODY, "not valid gzip"),
        ("deflate", gzip.compress(BODY), "not valid deflate"),
        ("gzip", gzip.compress(BODY)[:-12], "truncated"),
    ],
)
def test_corrupt_streams_are_400(encoding: str, data: bytes, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        decode(data, encoding, 1024)


def request_of(*messages: dict[str, Any], encoding: bytes | None = None) -> Request:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    headers = [(b"content-type", b"application/json")]
    if encoding is not None:
        headers.append((b"content-encoding", encoding))
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


def chunk(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


@pytest.mark.parametrize("split", [1, 2, 5])
def test_body_in_any_number_of_messages_reads_whole(split: int) -> None:
    size = -(-len(BODY) // split)
    parts = [BODY[i : i + size] for i in range(0, len(BODY), size)]
    messages = [chunk(p, i < len(parts) - 1) for i, p in enumerate(parts)]
    request = request_of(*messages)
    assert asyncio.run(read_body(request, binary=False, max_bytes=1000)) == BODY
    assert asyncio.run(request.body()) == BODY  # kept on the request: no second receive


def test_compressed_body_in_messages_is_decoded() -> None:
    packed = gzip.compress(BODY)
    request = request_of(chunk(packed[:10], True), chunk(packed[10:], False), encoding=b"gzip")
    assert asyncio.run(read_body(request, binary=False, max_bytes=1000)) == BODY


def test_client_gone_before_the_body_ends_is_a_disconnect() -> None:
    request = request_of(chunk(BODY[:5], True), {"type": "http.disconnect"})
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_body(request, binary=False, max_bytes=1000))

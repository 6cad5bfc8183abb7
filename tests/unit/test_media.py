"""Content-Type and Content-Encoding of prediction bodies (services/media.py)."""

from __future__ import annotations

import gzip
import zlib

import pytest

from services.errors import BadRequest, PayloadTooLarge
from services.media import UnsupportedMediaType, check_content_type, decode

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

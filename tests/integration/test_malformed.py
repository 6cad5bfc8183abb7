"""A corpus of malformed requests against every endpoint of a real ``bentoml serve`` (issue 7).

Native ``/predict`` and ``/models/{name}``, OIP REST (infer, metadata, ready) here, OIP gRPC
``ModelInfer`` in test_malformed_grpc.py: wrong, truncated and huge JSON, huge and non-finite
numbers, wrong depths and dtypes, odd shapes, lying binary-data headers, hostile names in paths.
Each request is its own test id and must get its protocol's 4xx with a short message in the right
envelope (platform ``{"error": {"type", "message"}}``, OIP ``{"error": "..."}``, gRPC
INVALID_ARGUMENT/NOT_FOUND), within a client timeout. test_malformed_grpc.py ends by checking that
the server is still ready and still answers exactly as the models do in-process.

Cases marked :func:`bug` are defects found here and reported, not fixed yet: strict xfails, so a
fix makes the run fail until the mark is removed (none are open now).

Limits in force: ``SERVERY_MAX_ROWS_PER_REQUEST`` (1024) -> 413 over REST, INVALID_ARGUMENT over
gRPC, decided on the declared shape before any data is converted (a huge declared shape allocates
nothing); gRPC messages over 4 MiB -> RESOURCE_EXHAUSTED (grpc's default). HTTP bodies up to
``SERVERY_MAX_BODY_BYTES`` (16 MiB, also after gzip/deflate) are read and parsed whole
(``test_ten_megabyte_bodies``); larger ones are 413.
"""

from __future__ import annotations

import gzip
import http.client
import json
import math
import struct
import zlib
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

TIMEOUT_S = 30
"""Client timeout per request: a hang fails the test instead of stalling the run."""

MAX_ERROR_BYTES = 64 * 1024
"""An error answer larger than this echoes the request instead of describing it."""

TEN_MB = 10 * 1024 * 1024
JSON = {"content-type": "application/json"}
GZ = {"content-encoding": "gzip"}
ZIP_BOMB = gzip.compress(b" " * (17 * 2**20))
"""17 MiB of spaces in ~17 KB: over SERVERY_MAX_BODY_BYTES (16 MiB) once inflated, so 413."""
IRIS = [5.1, 3.5, 1.4, 0.2]
IRIS_RAW = struct.pack("<4d", *IRIS)
TYPES = {
    400: ("bad_request",),
    404: ("model_not_found", "not_found"),  # not_found: no route matches the path at all
    413: ("payload_too_large",),
    415: ("unsupported_media_type",),
    422: ("invalid_input",),
}


def bug(reason: str) -> pytest.MarkDecorator:
    """A defect found here and reported; strict: once fixed, the test fails until this goes."""
    return pytest.mark.xfail(reason=f"BUG (reported): {reason}", strict=True, raises=AssertionError)


def send(server, method: str, path: str, body: Any = None, headers: dict | None = None):
    """Send a request exactly as written (http.client: no path normalisation); ``body`` is bytes,
    a str or a JSON value. Returns (status, lower-cased headers, body)."""
    if body is not None and not isinstance(body, bytes):
        body = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT_S)
    try:
        conn.request(
            method, path, body=body, headers=headers or {"content-type": "application/json"}
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_error(answer: tuple[int, dict, bytes], status: int, envelope: str) -> None:
    """``answer`` is ``status`` with a short, non-internal message in ``envelope``."""
    code, headers, body = answer
    assert code == status, (code, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:100])
    assert len(body) <= MAX_ERROR_BYTES, f"{len(body)}-byte error answer: {body[:100]!r}..."
    doc = json.loads(body)
    assert list(doc) == ["error"], doc
    if envelope == "oip":
        message = doc["error"]
    else:
        message = doc["error"]["message"]
        assert doc["error"]["type"] in TYPES[status], doc
    assert isinstance(message, str) and message.strip(), doc
    assert "internal" not in message.lower() and "Traceback" not in message, doc


def cases(rows: list[tuple]) -> list[Any]:
    """``(id, *values, [marks])`` rows -> pytest params; trailing MarkDecorators become marks."""
    out = []
    for row in rows:
        marks = [m for m in row if isinstance(m, pytest.MarkDecorator)]
        values = [v for v in row[1:] if not isinstance(v, pytest.MarkDecorator)]
        out.append(pytest.param(*values, id=row[0], marks=marks))
    return out


PREDICT = [
    # body syntax
    ("empty-body", b"", 400),
    ("truncated-json", '{"model": "iris", "inputs": [[5.1, 3.5', 400),
    ("form-encoded", "model=iris&inputs=1", 400),
    ("trailing-garbage", '{"model": "iris", "inputs": [[1, 2, 3, 4]]} x', 400),
    ("json-array", "[1, 2]", 400),
    ("json-null", "null", 400),
    ("binary-garbage", b"\xff\xfe\x00\x01garbage", 400),
    ("utf16", '{"model": "iris", "inputs": [[1, 2, 3, 4]]}'.encode("utf-16"), 400),
    ("lone-surrogate-escape", '{"model": "\\ud800", "inputs": [[1, 2, 3, 4]]}', 400),
    ("nested-10k-deep", '{"model": "iris", "inputs": ' + "[" * 10**4 + "]" * 10**4 + "}", 400),
    # fields
    ("missing-inputs", {"model": "iris"}, 400),
    ("missing-model", {"inputs": [IRIS]}, 400),
    ("model-not-string", {"model": ["iris"], "inputs": [IRIS]}, 400),
    ("unknown-field", {"model": "iris", "inputs": [IRIS], "x": 1}, 400),
    ("version-10k", {"model": "iris", "version": "v" * 10_240, "inputs": [IRIS]}, 400),
    # numbers
    ("1e400", '{"model": "iris", "inputs": [[1e400, 2, 3, 4]]}', 422),
    ("10**400-literal", '{"model": "iris", "inputs": [[1' + "0" * 400 + ", 2, 3, 4]]}", 422),
    ("NaN-literal", '{"model": "iris", "inputs": [[NaN, 2, 3, 4]]}', 422),
    ("Infinity-literal", '{"model": "iris", "inputs": [[1, -Infinity, 3, 4]]}', 422),
    ("float32-overflow", {"model": "digits", "inputs": [[3.5e38] * 64]}, 422),
    ("iris-1e308-scores-overflow", {"model": "iris", "inputs": [[1e308] * 4]}, 422),
    ("iris-svc-1e308", {"model": "iris-svc", "inputs": [[-1e308] * 4]}, 422),
    # depth, shape
    ("flat-row", {"model": "iris", "inputs": IRIS}, 422),
    ("3-d", {"model": "iris", "inputs": [[IRIS]]}, 422),
    ("ragged", {"model": "iris", "inputs": [IRIS, IRIS[:3]]}, 422),
    ("empty-inputs", {"model": "iris", "inputs": []}, 422),
    ("empty-row", {"model": "iris", "inputs": [[]]}, 422),
    ("29-of-30-features", {"model": "breast_cancer-svc", "inputs": [[1.0] * 29]}, 422),
    ("inputs-object", {"model": "iris", "inputs": {"a": IRIS}}, 422),
    ("inputs-string", {"model": "iris", "inputs": "5.1,3.5,1.4,0.2"}, 422),
    ("1025-rows", {"model": "iris", "inputs": [IRIS] * 1025}, 413),
    # dtypes
    ("strings", {"model": "iris", "inputs": [["5.1", 3.5, 1.4, 0.2]]}, 422),
    ("bools", {"model": "iris", "inputs": [[True, 3.5, 1.4, 0.2]]}, 422),
    ("objects", {"model": "iris", "inputs": [[{}, 3.5, 1.4, 0.2]]}, 422),
    ("nulls", {"model": "digits-svc", "inputs": [[None] * 64]}, 422),
    # names
    ("unknown-model", {"model": "nope", "inputs": [IRIS]}, 404),
    ("traversal-model", {"model": "../../etc/passwd", "inputs": [IRIS]}, 404),
    ("control-chars-model", {"model": "\x00\x1b[31m\u202e\ufeff", "inputs": [IRIS]}, 404),
    ("control-chars-version", {"model": "iris", "version": "\x00\r\n", "inputs": [IRIS]}, 404),
    ("10k-model-name", {"model": "m" * 10_240, "inputs": [IRIS]}, 404),
]


@pytest.mark.parametrize(("body", "status"), cases(PREDICT))
def test_predict(server, body: Any, status: int) -> None:
    assert_error(send(server, "POST", "/predict", body), status, "platform")


def _t(**kw: Any) -> dict[str, Any]:
    """An iris ``input-0`` tensor, with ``kw`` replacing its fields."""
    return {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": IRIS, **kw}


def _lit(datatype: str, data: str) -> str:
    """A body whose data is written literally (numbers JSON encoders refuse to write)."""
    tensor = f'{{"name": "input-0", "shape": [1, 4], "datatype": "{datatype}", "data": {data}}}'
    return f'{{"inputs": [{tensor}]}}'


BIN = _t(data=None, parameters={"binary_data_size": 32})


def _bin(tensor: dict, raw: bytes, length: int | str | None = None) -> tuple[bytes, dict]:
    """Body and headers of a binary-data request; ``length`` may lie about the JSON header."""
    header = json.dumps({"inputs": [tensor]}).encode()
    size = len(header) if length is None else length
    return header + raw, {"Inference-Header-Content-Length": str(size)}


BIN_HEADER = len(_bin(BIN, b"")[0])

INFER = [
    # body syntax
    ("empty-body", b"", 400),
    ("truncated-json", '{"inputs": [{"name": "input-0", "shape": [1, 4], "datat', 400),
    ("json-array", "[]", 400),
    ("binary-garbage", b"\xff\xfe\x00garbage", 400),
    ("no-inputs-field", {}, 400),
    ("empty-inputs", {"inputs": []}, 400),
    ("inputs-not-list", {"inputs": {"name": "input-0"}}, 400),
    ("two-inputs", {"inputs": [_t(), _t()]}, 400),
    ("wrong-input-name", {"inputs": [_t(name="x")]}, 400),
    ("id-not-string", {"inputs": [_t()], "id": 7}, 400),
    ("unknown-output", {"inputs": [_t()], "outputs": [{"name": "nope"}]}, 400),
    ("binary-flag-not-bool", {"inputs": [_t()], "parameters": {"binary_data_output": "y"}}, 400),
    ("shared-memory", {"inputs": [_t(parameters={"shared_memory_region": "r"})]}, 400),
    # numbers
    ("1e400", _lit("FP64", "[1e400, 2, 3, 4]"), 400),
    ("10**400-literal", _lit("INT64", "[1" + "0" * 400 + ", 2, 3, 4]"), 400),
    ("NaN-literal", _lit("FP64", "[NaN, 2, 3, 4]"), 400),
    ("Infinity-literal", _lit("FP64", "[Infinity, 2, 3, 4]"), 400),
    ("fp16-overflow", {"inputs": [_t(datatype="FP16", data=[1, 2, 3, 70000])]}, 400),
    ("iris-1e308-scores-overflow", {"inputs": [_t(data=[1e308] * 4)]}, 400),
    ("int8-out-of-range", {"inputs": [_t(datatype="INT8", data=[1, 2, 3, 1000])]}, 400),
    ("uint8-negative", {"inputs": [_t(datatype="UINT8", data=[1, 2, 3, -1])]}, 400),
    ("int64-fraction", {"inputs": [_t(datatype="INT64", data=[1.5, 2, 3, 4])]}, 400),
    # datatypes and data
    ("unknown-datatype", {"inputs": [_t(datatype="FP128")]}, 400),
    ("lowercase-datatype", {"inputs": [_t(datatype="fp64")]}, 400),
    ("bytes-datatype", {"inputs": [_t(datatype="BYTES", data=["5.1", "3.5", "1.4", "0.2"])]}, 400),
    ("bool-datatype", {"inputs": [_t(datatype="BOOL", data=[True, False, True, True])]}, 400),
    ("strings", {"inputs": [_t(data=["5.1", 3.5, 1.4, 0.2])]}, 400),
    ("bools", {"inputs": [_t(data=[True, 3.5, 1.4, 0.2])]}, 400),
    ("objects", {"inputs": [_t(data=[{}, 3.5, 1.4, 0.2])]}, 400),
    ("nulls", {"inputs": [_t(data=[None, 3.5, 1.4, 0.2])]}, 400),
    ("data-string", {"inputs": [_t(data="5.1,3.5,1.4,0.2")]}, 400),
    ("data-object", {"inputs": [_t(data={"a": 1})]}, 400),
    ("data-missing", {"inputs": [_t(data=None)]}, 400),
    ("ragged-data", {"inputs": [_t(shape=[2, 4], data=[IRIS, IRIS[:3]])]}, 400),
    # shapes
    ("shape-more-than-data", {"inputs": [_t(shape=[2, 4])]}, 400),
    ("shape-less-than-data", {"inputs": [_t(data=IRIS * 2)]}, 400),
    ("shape-wrong-width", {"inputs": [_t(shape=[2, 2])]}, 400),
    ("shape-1-d", {"inputs": [_t(shape=[4])]}, 400),
    ("shape-3-d", {"inputs": [_t(shape=[1, 4, 1])]}, 400),
    ("shape-empty", {"inputs": [_t(shape=[])]}, 400),
    ("shape-zero-rows", {"inputs": [_t(shape=[0, 4], data=[])]}, 400),
    ("shape-negative", {"inputs": [_t(shape=[-1, 4])]}, 400),
    ("shape-negative-both", {"inputs": [_t(shape=[-1, -4])]}, 400),
    ("shape-strings", {"inputs": [_t(shape=["1", "4"])]}, 400),
    ("shape-fraction", {"inputs": [_t(shape=[1.5, 4])]}, 400),
    ("shape-bool", {"inputs": [_t(shape=[True, 4])]}, 400),
    ("shape-null", {"inputs": [_t(shape=None)]}, 400),
    # huge declared shapes with small data: refused on the shape, nothing allocated
    ("shape-1e9-rows", {"inputs": [_t(shape=[10**9, 4])]}, 413),
    ("shape-2**63-rows", {"inputs": [_t(shape=[2**63, 4])]}, 413),
    ("shape-2**64-rows", {"inputs": [_t(shape=[2**64, 4])]}, 413),
    ("shape-1e9-wide", {"inputs": [_t(shape=[1, 10**9])]}, 400),
    ("shape-1025-rows", {"inputs": [_t(shape=[1025, 4], data=IRIS * 1025)]}, 413),
    # binary tensor data extension: Inference-Header-Content-Length and binary_data_size lie
    ("bin-length-longer", *_bin(BIN, IRIS_RAW, BIN_HEADER + 7), 400),
    ("bin-length-shorter", *_bin(BIN, IRIS_RAW, BIN_HEADER - 5), 400),
    ("bin-length-zero", *_bin(BIN, IRIS_RAW, 0), 400),
    ("bin-length-past-body", *_bin(BIN, IRIS_RAW, 10_000), 400),
    ("bin-length-negative", *_bin(BIN, IRIS_RAW, -1), 400),
    ("bin-length-not-int", *_bin(BIN, IRIS_RAW, "abc"), 400),
    ("bin-length-40-digits", *_bin(BIN, IRIS_RAW, "9" * 40), 400),
    ("bin-data-short", *_bin(BIN, IRIS_RAW[:-3]), 400),
    ("bin-data-short-a-value", *_bin(BIN, IRIS_RAW[:-8]), 400),
    ("bin-data-extra", *_bin(BIN, IRIS_RAW + b"xx"), 400),
    ("bin-size-negative", *_bin({**BIN, "parameters": {"binary_data_size": -1}}, IRIS_RAW), 400),
    ("bin-size-fraction", *_bin({**BIN, "parameters": {"binary_data_size": 3.5}}, IRIS_RAW), 400),
    ("bin-size-string", *_bin({**BIN, "parameters": {"binary_data_size": "32"}}, IRIS_RAW), 400),
    ("bin-size-2**70", *_bin({**BIN, "parameters": {"binary_data_size": 2**70}}, IRIS_RAW), 400),
    ("bin-and-json-data", *_bin({**BIN, "data": IRIS}, IRIS_RAW), 400),
    ("bin-shape-mismatch", *_bin({**BIN, "shape": [2, 4]}, IRIS_RAW), 400),
    ("bin-huge-shape", *_bin({**BIN, "shape": [10**9, 4]}, IRIS_RAW), 413),
    ("bin-bytes-datatype", *_bin({**BIN, "datatype": "BYTES"}, IRIS_RAW), 400),
    ("bin-nan", *_bin(BIN, struct.pack("<4d", math.nan, 1, 2, 3)), 400),
    # headers
    ("gzip-not-gzip", {"inputs": [_t()]}, {"content-encoding": "gzip"}, 400),
    ("brotli", {"inputs": [_t()]}, {"content-encoding": "br"}, 415),
    ("gzip-bomb", ZIP_BOMB, {"content-encoding": "gzip"}, 413),
    ("gzip-truncated", gzip.compress(json.dumps({"inputs": [_t()]}).encode())[:-9], GZ, 400),
    ("text-plain-garbage", "hello", {"content-type": "text/plain"}, 415),
    ("text-plain-json", {"inputs": [_t()]}, {"content-type": "text/plain"}, 415),
    ("form-json", {"inputs": [_t()]}, {"content-type": "application/x-www-form-urlencoded"}, 415),
]


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    cases([row if isinstance(row[2], dict) else (row[0], row[1], None, *row[2:]) for row in INFER]),
)
def test_oip_infer(server, body: Any, headers: dict | None, status: int) -> None:
    answer = send(server, "POST", "/v2/models/iris/infer", body, headers)
    assert_error(answer, status, "oip")


@pytest.mark.parametrize("delta", [7, -5, -BIN_HEADER])
def test_a_lying_header_length_is_named(server, delta: int) -> None:
    """The JSON header cut at the wrong length: the message names the header, not the body."""
    body, headers = _bin(BIN, IRIS_RAW, BIN_HEADER + delta)
    code, _, raw = send(server, "POST", "/v2/models/iris/infer", body, headers)
    assert code == 400 and "Inference-Header-Content-Length" in json.loads(raw)["error"], raw


PREDICT_BODY = json.dumps({"model": "iris", "inputs": [IRIS]}).encode()
PREDICT_HEADERS = [
    ("text-plain", PREDICT_BODY, {"content-type": "text/plain"}, 415),
    ("curl-d-form", PREDICT_BODY, {"content-type": "application/x-www-form-urlencoded"}, 415),
    ("multipart", PREDICT_BODY, {"content-type": "multipart/form-data; boundary=x"}, 415),
    ("octet-stream", PREDICT_BODY, {"content-type": "application/octet-stream"}, 415),
    ("gzip-not-gzip", PREDICT_BODY, {**JSON, **GZ}, 400),
    ("gzip-truncated", gzip.compress(PREDICT_BODY)[:-9], {**JSON, **GZ}, 400),
    ("brotli", PREDICT_BODY, {**JSON, "content-encoding": "br"}, 415),
    ("gzip-bomb", ZIP_BOMB, {**JSON, **GZ}, 413),
]


@pytest.mark.parametrize(("body", "headers", "status"), cases(PREDICT_HEADERS))
def test_predict_headers(server, body: bytes, headers: dict, status: int) -> None:
    """The body is JSON (or has no Content-Type) and plain, gzip or deflate: else 4xx, clearly."""
    assert_error(send(server, "POST", "/predict", body, headers), status, "platform")


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, PREDICT_BODY),  # no Content-Type at all (tritonclient sends none)
        ({"content-type": "application/json; charset=utf-8"}, PREDICT_BODY),
        ({"content-type": "application/vnd.api+json"}, PREDICT_BODY),
        ({**JSON, **GZ}, gzip.compress(PREDICT_BODY)),
        ({**JSON, "content-encoding": "x-gzip"}, gzip.compress(PREDICT_BODY)),
        ({**JSON, "content-encoding": "deflate"}, zlib.compress(PREDICT_BODY)),
        ({**JSON, "content-encoding": "identity"}, PREDICT_BODY),
    ],
    ids=["none", "charset", "plus-json", "gzip", "x-gzip", "deflate", "identity"],
)
def test_predict_accepts_json_plain_or_compressed(server, headers: dict, body: bytes) -> None:
    code, _, raw = send(server, "POST", "/predict", body, headers)
    assert code == 200 and json.loads(raw)["model"] == "iris", raw


# Hostile names for every route with a name or version in its path: (path text, known defects).
NAMES = [
    ("traversal", "../../etc/passwd", {}),
    ("traversal-encoded", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", {}),
    ("slash-encoded", "..%2F..%2Fetc%2Fpasswd", {}),
    ("backslashes", "%5c..%5c..%5cwin.ini", {}),
    ("dotdot-encoded", "%2e%2e", {}),
    ("nul", "iris%00", {}),
    ("control-chars", "%01%1b%7f", {}),
    ("newline", "ir%0Ais", {}),
    ("crlf-header-injection", "%0d%0aSet-Cookie:%20x=1", {}),
    ("invalid-utf8", "%ff%fe", {}),
    ("overlong-utf8", "%c0%ae%c0%ae", {}),
    ("encoded-surrogate", "%ed%a0%80", {}),
    ("rtl-override", "%e2%80%aeiris", {}),
    ("emoji", "%f0%9f%92%a9", {}),
    ("trailing-space", "iris%20", {}),
    ("10k-name", "n" * 10_240, {}),
]
NAME_ROUTES = [  # (route, method, envelope)
    ("/models/{}", "GET", "platform"),
    ("/v2/models/{}", "GET", "oip"),
    ("/v2/models/{}/ready", "GET", "oip"),
    ("/v2/models/iris/versions/{}", "GET", "oip"),
    ("/v2/models/iris/versions/{}/ready", "GET", "oip"),
    ("/v2/models/{}/infer", "POST", "oip"),
    ("/v2/models/iris/versions/{}/infer", "POST", "oip"),
]


def _name_cases() -> list[Any]:
    out = []
    for route, method, envelope in NAME_ROUTES:
        for label, text, defects in NAMES:
            marks = [m for key, m in defects.items() if key in (method, envelope)]
            out.append(
                pytest.param(
                    method,
                    route.format(text),
                    envelope,
                    id=f"{label}:{method}-{route}",
                    marks=marks,
                )
            )
    return out


@pytest.mark.parametrize(("method", "path", "envelope"), _name_cases())
def test_names_in_paths(server, method: str, path: str, envelope: str) -> None:
    body = {"inputs": [_t()]} if method == "POST" else None
    assert_error(send(server, method, path, body), 404, envelope)


TEN_MB_CASES = [
    ("predict-10MB-name", "/predict", {"model": "m" * TEN_MB, "inputs": [IRIS]}, 404),
    ("predict-10MB-rows", "/predict", {"model": "iris", "inputs": [IRIS] * (TEN_MB // 20)}, 413),
    ("predict-10MB-brackets", "/predict", b"[" * TEN_MB, 400),
    ("predict-10MB-field", "/predict", '{"model": "iris", "x": "' + "x" * TEN_MB + '"}', 400),
    (
        "infer-10MB-data",
        "/v2/models/iris/infer",
        {"inputs": [_t(shape=[TEN_MB // 32, 4], data=[1.5] * (TEN_MB // 8))]},
        413,
    ),
    ("infer-10MB-binary-tail", "/v2/models/iris/infer", *_bin(BIN, IRIS_RAW + bytes(TEN_MB)), 400),
    (
        "infer-10MB-nul-header",
        "/v2/models/iris/infer",
        bytes(TEN_MB),
        {"Inference-Header-Content-Length": str(TEN_MB)},
        400,
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status"),
    cases(
        [row if isinstance(row[3], dict) else (*row[:3], None, *row[3:]) for row in TEN_MB_CASES]
    ),
)
def test_ten_megabyte_bodies(
    server, path: str, body: Any, headers: dict | None, status: int
) -> None:
    """10 MB bodies (under the 16 MiB limit) are read and parsed, and still get a clean 4xx."""
    envelope = "platform" if path == "/predict" else "oip"
    assert_error(send(server, "POST", path, body, headers), status, envelope)


def chunked_status(url: str, method: str, path: str, mib: int) -> bytes:
    """Send ``method path`` with a chunked body of up to ``mib`` MiB; the status line answered."""
    import select
    import socket

    host, port = url.removeprefix("http://").split(":")
    chunk = b"%x\r\n%s\r\n" % (2**20, b"x" * 2**20)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        sock.sendall(head.encode())
        for _ in range(mib):
            if select.select([sock], [], [], 0)[0]:
                break  # answered before the body ended
            try:
                sock.sendall(chunk)
            except OSError:
                break
        else:
            sock.sendall(b"0\r\n\r\n")
        while b"\r\n" not in answer and (data := sock.recv(4096)):
            answer += data
    return answer.split(b"\r\n")[0]


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("GET", "/models"), ("DELETE", "/models/iris"), ("GET", "/livez")],
)
def test_chunked_bodies_are_bounded_for_every_method(server, method: str, path: str) -> None:
    """SERVERY_MAX_BODY_BYTES (16 MiB) holds for a chunked body whatever the method (issue 20
    item 3: only POST/PUT/PATCH bodies were bounded)."""
    assert chunked_status(server.url, method, path, 64) == b"HTTP/1.1 413 Request Entity Too Large"


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("text/plain", 415),
        ("application/json", 200),
    ],
)
def test_open_admin_reload_takes_no_cross_site_form(server, content_type: str, status: int):
    """Without keys or an admin token, a form a web page posts cross-site (no CORS preflight
    for these types) cannot trigger a reload (issue 20 item 6)."""
    r = httpx.post(
        f"{server.url}/admin/reload", content=b"{}", headers={"content-type": content_type}
    )
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"

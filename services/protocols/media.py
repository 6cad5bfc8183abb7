"""Request bodies of the prediction routes: ``Content-Type`` checked, ``Content-Encoding`` decoded.

``POST /predict`` and ``POST /v2/models/{name}/infer`` read their bodies through :func:`read_body`
(on the fast path and through FastAPI alike), so both answer the same way:

* ``Content-Type`` must be JSON (``application/json``, or any ``+json`` type) or absent
  (tritonclient's HTTP client sends none); OIP infer also takes ``application/octet-stream``
  (the binary tensor extension). Anything else, ``text/plain`` or a form from ``curl -d`` without
  ``-H``, is 415 with the header to send: a JSON body labelled as something else is a client
  mistake, not something to guess around.
* ``Content-Encoding`` may be ``identity``, ``gzip`` (``x-gzip``) or ``deflate`` (zlib), the
  request compressions tritonclient offers (``request_compression_algorithm``) and Triton accepts.
  The decompressed size is bounded by ``SERVERY_MAX_BODY_BYTES`` (413), so a small compressed body
  cannot expand into gigabytes; a corrupt or truncated stream is 400. Other encodings: 415.

Written here rather than taken from Starlette: its ``GZipMiddleware`` compresses responses only,
and FastAPI checks the content type only for parameters it parses itself (these routes read raw
bytes for speed).
"""

from __future__ import annotations

import zlib

from starlette.requests import Request

from services.compat.request_body import receive_body
from services.runtime.errors import BadRequest, PayloadTooLarge, ServeryError

JSON_TYPES = ("application/json",)
BINARY_TYPE = "application/octet-stream"
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class UnsupportedMediaType(ServeryError):
    status_code = 415
    error_type = "unsupported_media_type"


def check_content_type(value: str | None, *, binary: bool) -> None:
    """415 unless ``value`` is absent, JSON, or (``binary``) ``application/octet-stream``."""
    if not value:
        return
    media = value.partition(";")[0].strip().lower()
    if media in JSON_TYPES or media.endswith("+json") or (binary and media == BINARY_TYPE):
        return
    allowed = "application/json" + (" or application/octet-stream" if binary else "")
    raise UnsupportedMediaType(
        f"Content-Type '{value}' is not supported; send {allowed} "
        "(curl: -H 'Content-Type: application/json')"
    )


def decode(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """``body`` decompressed per ``encoding``, at most ``max_bytes`` of it (413 beyond)."""
    if not encoding:
        return body
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise UnsupportedMediaType(
            f"Content-Encoding '{encoding}' is not supported; use gzip, deflate or none"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise BadRequest(f"the body is not valid {name} data ({e})") from None
    if len(out) > max_bytes:
        raise PayloadTooLarge(f"the body decompresses to more than {max_bytes} bytes")
    if not inflater.eof:
        raise BadRequest(f"the {name} body is truncated")
    return out


async def read_body(request: Request, *, binary: bool, max_bytes: int) -> bytes:
    """The request's body, its content type checked and its content encoding undone."""
    # One pass over the raw ASGI headers (names are lower-case): this runs on every prediction.
    ctype = encoding = None
    for key, value in request.scope["headers"]:
        if key == b"content-type":
            ctype = value
        elif key == b"content-encoding":
            encoding = value
    if ctype is not None and ctype != b"application/json":
        check_content_type(ctype.decode("latin-1"), binary=binary)
    body = await receive_body(request)
    return body if encoding is None else decode(body, encoding.decode("latin-1"), max_bytes)

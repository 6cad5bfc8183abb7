"""Error envelopes: one renderer per protocol, for the one error hierarchy
(:mod:`services.runtime.errors`).

* the platform's ``{"error": {"type", "message", ...}}`` (``/predict``, ``/models``, ``/admin``,
  unknown routes): :func:`error_response`;
* the Open Inference Protocol's ``{"error": "message"}`` (``/v2``), where invalid inputs are 400
  (OIP has no 422): :func:`oip_error`;
* OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (``/v1``), as vLLM writes it:
  :func:`openai_error`.

:func:`refusal` picks the envelope by path (the gate refuses before any route runs). gRPC maps the
same errors to status codes in :mod:`services.protocols.oip.grpc`. A 5xx body never carries
internals: a :class:`ServeryError` 5xx says what it is; anything else is logged with its traceback
and answered ``internal server error``.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any, TypeVar

import orjson
import pydantic_core
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from services.runtime.errors import BadRequest, ModelNotFound, ServeryError

logger = logging.getLogger("servery")

MAX_REPORTED_ERRORS = 20
"""Most problems one error answer lists; ``errors`` gives the total. A hostile body can have
millions of problems (1.6 M unknown keys in 16 MiB): listing them all cost gigabytes."""

M = TypeVar("M", bound=BaseModel)

_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response without Starlette's JSONResponse overhead (compact, no re-validation).

    Serialised by orjson: an infer answer took 5 us with the standard library's encoder, 0.3 us
    with orjson, byte for byte the same text. numpy arrays and scalars serialise as numbers; a
    NaN or infinity (which JSON cannot carry) becomes ``null``, where ``json.dumps`` raised."""
    return Response(
        orjson.dumps(body, option=_ORJSON_OPTIONS),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def error_response(exc: BaseException) -> Response:
    """Map any exception to the platform envelope; 5xx bodies never carry internals."""
    if isinstance(exc, ServeryError) and exc.status_code < 500:
        return json_response(exc.to_dict(), exc.status_code, exc.headers())
    if isinstance(exc, ServeryError):
        if exc.logged:
            logger.warning("%s: %s", exc.error_type, exc.message)
        return json_response(exc.to_dict(), exc.status_code, exc.headers())
    logger.error("internal error while serving a request", exc_info=exc)
    return json_response(
        {"error": {"type": "internal_error", "message": "internal server error; see server log"}},
        500,
    )


def from_validation_error(exc: Any) -> ServeryError:
    """Map a pydantic ``ValidationError`` on a request body to the platform error.

    Errors raised by our own validators with type ``model_not_found`` become 404; a body that is
    not JSON, misses fields or has fields of the wrong type is a 400 naming each problem.
    """
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    for err in errors:
        if err["type"] == "model_not_found":
            return ModelNotFound(err["msg"])
    if any(err["type"] == "json_invalid" for err in errors):
        return BadRequest("request body is not valid JSON")
    problems = [
        {"loc": ".".join(str(p) for p in err["loc"]) or "body", "msg": err["msg"]}
        for err in errors[:MAX_REPORTED_ERRORS]
    ]
    summary = "; ".join(f"{p['loc']}: {p['msg']}" for p in problems[:5])
    return BadRequest(f"invalid request body: {summary}", detail=problems, errors=exc.error_count())


def parse_json_model(raw: bytes | str, model: type[M]) -> M:
    """Parse a JSON body into ``model`` at a cost bounded by the body, not by its mistakes.

    ``model.model_validate_json`` reports every unknown field of an ``extra="forbid"`` model as
    its own error: 1.6 M keys in a 16 MiB body made 1.2 GB of error objects before the answer
    was cut. Here the JSON is parsed by pydantic's own parser, unknown top-level fields are one
    error (the first :data:`MAX_REPORTED_ERRORS` and the total), and only then is the model
    validated (its remaining errors are bounded by its fields; list fields use ``fail_fast``).
    """
    try:
        data = pydantic_core.from_json(raw, cache_strings="keys")
    except ValueError as e:
        raise BadRequest("request body is not valid JSON") from e
    if isinstance(data, dict) and model.model_config.get("extra") == "forbid":
        fields = model.model_fields
        known = len(data.keys() & fields.keys())
        if known != len(data):
            first = list(islice((k for k in data if k not in fields), MAX_REPORTED_ERRORS))
            unknown = len(data) - known
            more = f" (and {unknown - len(first)} more)" if unknown > len(first) else ""
            raise BadRequest(
                f"invalid request body: unknown field(s) {', '.join(map(repr, first))}{more}; "
                f"allowed: {', '.join(fields)}",
                detail=[{"loc": str(k), "msg": "Extra inputs are not permitted"} for k in first],
                errors=unknown,
            )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from e


def oip_error(exc: BaseException) -> Response:
    """Map any exception to the OIP envelope ``{"error": "..."}``; 5xx never carry internals."""
    if isinstance(exc, ServeryError):
        status = 400 if exc.status_code == 422 else exc.status_code
        if status >= 500 and exc.logged:
            logger.warning("%s: %s", exc.error_type, exc.message)
        return json_response({"error": exc.message}, status, exc.headers())
    logger.error("internal error while serving an OIP request", exc_info=exc)
    return json_response({"error": "internal server error"}, 500)


_OPENAI_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    413: "BadRequestError",
    429: "RateLimitError",
}


def openai_response(
    status: int,
    message: str,
    err_type: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The OpenAI error envelope, as vLLM's own ``ErrorResponse`` writes it."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return json_response(body, status, headers)


def openai_error(exc: ServeryError) -> Response:
    """``exc`` in the OpenAI envelope (``type`` is the openai client's exception name)."""
    err_type = _OPENAI_TYPES.get(exc.status_code, exc.error_type)
    param = exc.details.get("param")  # the request field at fault, as vLLM names it
    return openai_response(exc.status_code, exc.message, err_type, param, exc.headers())


def refusal(path: str, exc: ServeryError) -> Response:
    """``exc`` in the envelope of the API that ``path`` belongs to."""
    if path.startswith("/v1/"):
        return openai_error(exc)
    if path == "/v2" or path.startswith("/v2/"):
        return oip_error(exc)
    return error_response(exc)

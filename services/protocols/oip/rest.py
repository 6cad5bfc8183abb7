"""Open Inference Protocol (KServe V2) over REST: the router's ``/v2`` routes.

This module only parses and serialises; :mod:`services.protocols.oip.core` holds the protocol
logic, and every inference runs through :func:`services.runtime.inference.infer`, like ``/predict``
and gRPC, so requests of all three front ends for one model share batches.

Besides JSON tensors it implements Triton's *binary tensor data* extension, which
``tritonclient.http`` uses by default: the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw little-endian bytes of every input
that has ``parameters.binary_data_size`` (in input order). Outputs requested with
``parameters.binary_data: true`` (or all outputs, with the request parameter
``binary_data_output: true``) come back the same way. Errors use the OIP envelope
``{"error": "message"}``; invalid inputs are 400 here (OIP has no 422).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response
from starlette.routing import Match

from services.protocols.errors import from_validation_error, json_response, oip_error
from services.protocols.media import read_body
from services.protocols.oip import core as oip
from services.protocols.oip.schemas import (
    ERRORS,
    INFER_ROUTE,
    Parameters,
    V2Health,
    V2InferenceRequest,
    V2ModelMetadata,
    V2RequestInput,
    V2ServerMetadata,
)
from services.protocols.state import answer, registry_of
from services.runtime import inference
from services.runtime.errors import BadRequest, InvalidInput, ModelNotReady, ServeryError
from services.runtime.inference import Call
from services.runtime.predictors import ModelInfo
from services.runtime.registry import ROUTE_KEY_HEADER
from services.settings import SETTINGS

logger = logging.getLogger("servery")

HEADER_LENGTH = "Inference-Header-Content-Length"

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol V2"])


def _flag(params: Parameters | None, key: str, default: bool) -> bool:
    value = params.get(key) if params else None
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter '{key}' must be true or false, got {value!r}")
    return value


_UNSUPPORTED = {
    "shared_memory_region": "the shared-memory extension is not supported",
    "classification": f"the classification extension is not supported; use '{oip.OUTPUT_LABEL}'",
}


def _reject_unsupported(params: Parameters | None, what: str) -> None:
    for key in (params or {}).keys() & _UNSUPPORTED.keys():
        raise InvalidInput(f"{what}: {_UNSUPPORTED[key]}")


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} '{header_length}' is not in [0, {len(body)}]")
    return body[:n], memoryview(body)[n:]


def _from_bytes(raw: memoryview, tensor: V2RequestInput) -> np.ndarray:
    if tensor.datatype == "BYTES":
        return oip.bytes_elements(raw, f"input '{tensor.name}'")
    dtype = oip.NUMERIC_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(
            f"input '{tensor.name}' has datatype '{tensor.datatype}'; servery models take "
            f"numeric tensors ({', '.join(oip.NUMERIC_DTYPES)})"
        )
    if len(raw) % dtype.itemsize:
        raise InvalidInput(
            f"input '{tensor.name}' has {len(raw)} bytes of binary data, not a multiple of "
            f"{dtype.itemsize} ({tensor.datatype})"
        )
    # Copy: frombuffer views are read-only and torch warns on them; the tensor is small.
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).copy()


def parse_infer_request(
    body: bytes, header_length: str | None
) -> tuple[V2InferenceRequest, list[oip.InputTensor]]:
    """Parse an infer body (JSON, or JSON header + binary tensors) into OIP input tensors."""
    header, binary = _split(body, header_length)
    try:
        req = V2InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        if header_length is not None and any(err["type"] == "json_invalid" for err in e.errors()):
            # Name the header: a wrong length, not a wrong body, is the likely mistake.
            raise BadRequest(
                f"the JSON header (the first {len(header)} bytes of the body, by "
                f"{HEADER_LENGTH}) is not valid JSON"
            ) from e
        raise from_validation_error(e) from e
    _reject_unsupported(req.parameters, "request")
    inputs: list[oip.InputTensor] = []
    offset = 0
    for t in req.inputs:
        _reject_unsupported(t.parameters, f"input '{t.name}'")
        size = t.parameters.get("binary_data_size") if t.parameters else None
        if size is None:
            if t.data is None:
                raise InvalidInput(f"input '{t.name}' has neither 'data' nor binary_data_size")
            data: Any = t.data
        else:
            if t.data is not None:
                raise InvalidInput(f"input '{t.name}' has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input '{t.name}': binary_data_size must be a byte count")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input '{t.name}' needs {size} bytes of binary data, "
                    f"{len(binary) - offset} left after the JSON header"
                )
            data = _from_bytes(binary[offset : offset + size], t)
            offset += size
        inputs.append(oip.InputTensor(t.name, t.datatype, t.shape, data))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes after the last binary input")
    return req, inputs


def output_plan(req: V2InferenceRequest, info: ModelInfo) -> tuple[tuple[str, ...], set[str]]:
    """The output names to return and those to return as binary data."""
    default = _flag(req.parameters, "binary_data_output", False)
    if not req.outputs:
        names = oip.requested_outputs(None, info)
        return names, set(names) if default else set()
    for o in req.outputs:
        _reject_unsupported(o.parameters, f"output '{o.name}'")
    binary = {o.name for o in req.outputs if _flag(o.parameters, "binary_data", default)}
    return oip.requested_outputs([o.name for o in req.outputs], info), binary


def encode_infer_response(
    info: ModelInfo,
    request_id: str | None,
    outputs: list[oip.OutputTensor],
    binary: set[str],
    routed_by: str | None = None,
) -> Response:
    """JSON response, or JSON header + raw output bytes when any output is binary.

    ``parameters.routed_by`` says what chose the version (see ``POST /predict``)."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.name in binary:
            raw = np.ascontiguousarray(t.data, dtype=t.data.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = t.data.ravel().tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": info.name, "model_version": info.version}
    if request_id is not None:
        body["id"] = request_id
    if routed_by is not None:
        body["parameters"] = {"routed_by": routed_by}
    body["outputs"] = entries
    if not chunks:
        return json_response(body)
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(
        b"".join([header, *chunks]),
        headers={HEADER_LENGTH: str(len(header))},
        media_type="application/octet-stream",
    )


async def infer_request(request: Request, name: str, version: str | None) -> Response:
    """Serve one infer request (also called by services.gateway.fastpath, outside FastAPI)."""
    call = Call()
    return await answer(request, call, _infer(request, call, name, version), oip_error)


async def _infer(request: Request, call: Call, name: str, version: str | None) -> Response:
    headers = request.headers
    plan: tuple[V2InferenceRequest, tuple[str, ...], set[str]] | None = None

    async def decode(info: ModelInfo, max_rows: int) -> Any:
        # The body is read once the model is known: an unknown model is 404 whatever was sent.
        nonlocal plan
        body = await read_body(request, binary=True, max_bytes=SETTINGS.max_body_bytes)
        req, inputs = parse_infer_request(body, headers.get(HEADER_LENGTH))
        names, binary = output_plan(req, info)
        plan = (req, names, binary)
        return oip.rows_from_inputs(inputs, info, max_rows)

    result = await inference.infer(
        registry_of(request),
        call,
        name,
        version,
        decode,
        SETTINGS.max_rows_per_request,
        lambda: headers.get(ROUTE_KEY_HEADER),
    )
    assert plan is not None  # decode ran: infer returned
    req, outputs, binary = plan
    info = result.info
    tensors = oip.output_tensors(info, result.outputs, outputs)
    return encode_infer_response(info, req.id, tensors, binary, result.routed_by)


@router.post("/models/{name}/infer", summary="OIP V2 inference", **INFER_ROUTE)
async def infer(request: Request, name: str) -> Response:
    """Infer with the served version of model ``name`` (JSON or binary tensors)."""
    return await infer_request(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="OIP V2 inference", **INFER_ROUTE)
async def infer_version(request: Request, name: str, version: str) -> Response:
    """Infer with model ``name`` at ``version`` (404 unless that version is served)."""
    return await infer_request(request, name, version)


@router.get(
    "",
    response_model=V2ServerMetadata,
    responses={code: ERRORS[code] for code in (401, 429, "default")},
    summary="OIP server metadata",
)
async def server_metadata() -> Response:
    return json_response(oip.server_metadata())


@router.get("/health/live", response_model=V2Health, summary="OIP liveness")
async def live() -> Response:
    return json_response({"live": True})


@router.get(
    "/health/ready", response_model=V2Health, responses={503: ERRORS[503]}, summary="OIP readiness"
)
async def ready(request: Request) -> Response:
    """200 when the router is ready (``/readyz``'s policy: ``Registry.ready``), else 503."""
    try:
        if not registry_of(request).ready():
            raise ModelNotReady("not every configured model can be served (see GET /models)")
    except Exception as e:
        return oip_error(e)
    return json_response({"ready": True})


def _model(request: Request, name: str, version: str | None, ready: bool) -> Response:
    try:
        registry = registry_of(request)
        routes = registry.routes(name)
        info = (routes.default if version is None else routes.resolve(version)[0]).info
        if ready and (why := registry.problem(name, version)) is not None:
            raise ModelNotReady(f"model '{name}' is not ready: {why}")
    except Exception as e:
        return oip_error(e)
    if ready:
        return json_response({"name": info.name, "ready": True})
    return json_response(oip.model_metadata(info, routes.ordered if version is None else ()))


_NOT_FOUND = {code: ERRORS[code] for code in (404, "default")}
_META: dict[str, Any] = {"response_model": V2ModelMetadata, "responses": _NOT_FOUND}
_READY: dict[str, Any] = {"response_model": V2Health, "responses": {**_NOT_FOUND, 503: ERRORS[503]}}


@router.get("/models/{name}", summary="OIP model metadata", **_META)
async def model_metadata(request: Request, name: str) -> Response:
    return _model(request, name, None, ready=False)


@router.get("/models/{name}/versions/{version}", summary="OIP model metadata (version)", **_META)
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return _model(request, name, version, ready=False)


@router.get("/models/{name}/ready", summary="OIP model readiness", **_READY)
async def model_ready(request: Request, name: str) -> Response:
    """200 when ``name`` is served and can answer, 503 when its framework service is
    unreachable, 404 when it is not served."""
    return _model(request, name, None, ready=True)


@router.get("/models/{name}/versions/{version}/ready", summary="OIP model readiness", **_READY)
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    return _model(request, name, version, ready=True)


_ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@router.api_route("/{path:path}", methods=_ANY_METHOD, include_in_schema=False)
async def no_route(request: Request, path: str) -> Response:
    """Unknown ``/v2`` routes (e.g. Triton's repository extension) answer in the OIP envelope."""
    for route in router.routes:
        if getattr(route, "endpoint", None) is not no_route:
            match, _ = route.matches(request.scope)
            if match is Match.PARTIAL:
                return oip_error(ServeryError.with_status(405, "method not allowed"))
    return oip_error(ServeryError.with_status(404, f"no OIP endpoint /v2/{path}"))

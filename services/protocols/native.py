"""The platform's own REST API: ``POST /predict``, ``GET /models``, ``GET /models/{name}``,
``POST /admin/reload`` and ``GET /v1/usage`` (an ``APIRouter`` the Router's app includes before
the LLM proxy's ``/v1`` route, so BentoML merges these routes into ``/docs.json``).

``/predict`` decodes its JSON body and calls :func:`services.runtime.inference.infer`, the
inference shared with OIP REST and gRPC; errors use the platform envelope
(:func:`services.protocols.errors.error_response`). With API keys configured the gate
(services/gateway/gate.py) has admitted the request; ``/predict``, whose model is in the body,
checks the key's allowed models here.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.responses import Response

from models.signature import OUTPUT_LABEL, OUTPUT_PROBA, Task
from services.ops import usage
from services.protocols.errors import error_response, json_response, openai_error, parse_json_model
from services.protocols.media import read_body
from services.protocols.state import ADMIN_KEY, SCOPE_KEY, answer, registry_of
from services.runtime.errors import Forbidden, ServeryError
from services.runtime.inference import Call, infer
from services.runtime.registry import ROUTE_KEY_HEADER
from services.settings import SETTINGS

_ROWS_SCHEMA = {
    "anyOf": [
        {
            "type": "array",
            "minItems": 1,
            "items": {"type": "array", "minItems": 1, "items": {}},
            "description": "Rows, each nested as the model's input shape (rows x features for "
            "a tabular model: each row holds its n_features finite numbers)",
        },
        {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object"},
            "description": "Records, one object per row, for a model fitted on a DataFrame "
            "(GET /models/{name}: input_schema.columns)",
        },
        {
            "type": "object",
            "description": "Input name -> rows, for a model with several inputs",
        },
    ],
}


class PredictRequest(BaseModel):
    """Body of ``POST /predict``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Served model name (see GET /models)")
    version: str | None = Field(
        None,
        description="Version id, unique prefix, alias (production, staging, ...) or 'latest'; "
        "default: the model's routing table (split, else the production alias, else latest)",
        max_length=128,
    )
    # Validated by the model's own rules (shape, dtype, finiteness) in one numpy pass, not by
    # pydantic per element; the schema still documents the shape for clients and fuzzers.
    inputs: Annotated[Any, WithJsonSchema(_ROWS_SCHEMA)] = Field(description="Rows to predict")


class PredictResponse(BaseModel):
    model: str = Field(description="Served model name")
    version: str = Field(description="The exact version that answered")
    routed_by: str = Field(
        description="What chose the version: 'alias:production' or 'latest' (the default), "
        "'split:<target>' (the routing table), 'version' or 'alias:<name>' (the request)"
    )
    task: str = Field(description="classification, regression or tensor")
    predictions: list[Any] = Field(
        description="Per row: the class index (classification), the prediction (regression: a "
        "float, or one per target), or the model's first output (tensor)"
    )
    labels: list[str] | None = Field(None, description="Classification: class name per row")
    probabilities: list[list[float]] | None = Field(
        None, description="Classification with probabilities: class probabilities per row"
    )
    outputs: dict[str, Any] | None = Field(
        None, description="Tensor models: every output by name, per row"
    )


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "Body is not JSON or misses/mistypes a field",
        401: "Missing or invalid API key (when keys are configured)",
        403: "The API key may not use this model",
        404: "Unknown model or version",
        413: "Too many rows in one request",
        422: "Inputs have the wrong shape, type or non-finite values",
        429: "The API key's rate limit is reached (Retry-After)",
        503: "Model not ready or overloaded",
    }.items()
}

router = APIRouter()


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    summary="Predict with a served model",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    },
)
async def predict(request: Request) -> Response:
    """Predict with ``model`` (at ``version``): classes and probabilities of a classifier, the
    values of a regressor, the outputs of a tensor model."""
    call = Call()
    return await answer(request, call, _predict(request, call), error_response)


async def _predict(request: Request, call: Call) -> Response:
    raw = await read_body(request, binary=False, max_bytes=SETTINGS.max_body_bytes)
    body = parse_json_model(raw, PredictRequest)
    key = request.scope.get(SCOPE_KEY)
    if key is not None:  # before the lookup: an unknown model is 403 too, not 404
        key.check_model(body.model)
    inputs = body.inputs
    result = await infer(
        registry_of(request),
        call,
        body.model,
        body.version,
        lambda info, max_rows: info.validate(inputs, max_rows),
        SETTINGS.max_rows_per_request,
        lambda: request.headers.get(ROUTE_KEY_HEADER),
    )
    info = result.info
    outputs = result.outputs
    body: dict[str, Any] = {
        "model": info.name,
        "version": info.version,
        "routed_by": result.routed_by,
        "task": info.task.value,
    }
    if info.task is Task.CLASSIFICATION:
        idx = outputs[OUTPUT_LABEL].tolist()
        names = info.class_names
        body["predictions"] = idx
        body["labels"] = [names[i] if 0 <= i < len(names) else str(i) for i in idx]
        if OUTPUT_PROBA in outputs:
            body["probabilities"] = outputs[OUTPUT_PROBA].tolist()
    elif info.task is Task.REGRESSION:
        body["predictions"] = outputs[OUTPUT_LABEL].tolist()
    else:
        listed = {name: arr.tolist() for name, arr in outputs.items()}
        body["predictions"] = next(iter(listed.values()))
        body["outputs"] = listed
    return json_response(body)


@router.get(
    "/models",
    responses={c: ERRORS[c] for c in (401, 429, 503)},
    summary="List served models",
)
async def list_models(request: Request) -> dict[str, Any]:
    """Every served model: versions, aliases, routing, load errors, schema and training metrics.

    Models configured but not served (nothing loaded), and models whose framework service is
    unreachable, are listed with ``ready: false`` and the reason; ``last_reload`` is this
    worker's latest reload report. An API key restricted to some models sees only those (and no
    ``last_reload``: it is the whole server's)."""
    registry = registry_of(request)
    key = request.scope.get(SCOPE_KEY)
    if key is not None and key.models is not None:
        return {"models": [m for m in registry.describe() if key.allows(m["name"])]}
    return {"models": registry.describe(), "last_reload": registry.last_reload}


@router.get(
    "/models/{name}",
    responses={c: ERRORS[c] for c in (401, 403, 404, 429, 503)},
    summary="Describe one served model",
)
async def get_model(request: Request, name: str) -> Response:
    try:
        return json_response(registry_of(request).describe_model(name))
    except ServeryError as e:
        return error_response(e)


@router.post(
    "/admin/reload",
    responses={
        401: {"model": ErrorResponse, "description": "Missing or wrong admin token or API key"},
        403: {"model": ErrorResponse, "description": "An API key limited to some models"},
        415: {"model": ErrorResponse, "description": "Open mode: not a JSON Content-Type"},
        429: {"model": ErrorResponse, "description": "Too many failed attempts"},
    },
    summary="Reload models now",
)
async def admin_reload(request: Request) -> Response:
    """Re-read the models file, the store and the aliases, load what is new, switch, unload.

    Reloads the router worker that receives the call at once and retries versions that failed
    before; the other workers see the same change on their next poll
    (``SERVERY_RELOAD_INTERVAL_S``).
    The report says what was loaded, unloaded and what failed (``ok: false``: a model kept its
    previous versions). Needs ``Authorization: Bearer <SERVERY_ADMIN_TOKEN>`` or an API key that
    may use every model when either is configured; else a JSON ``Content-Type`` (docs/security.md).
    """
    try:
        _check_admin(request)
        report = await registry_of(request).reload(force=True)
    except Exception as e:
        return error_response(e)
    return json_response(report)


def _check_admin(request: Request) -> None:
    # The gate (services/gateway/gate.py, always installed in front of the router's app) checked
    # the caller (services/gateway/auth.py AdminGuard) and marked the request; without the mark,
    # nothing checked it: refuse rather than serve unchecked.
    if request.scope.get(ADMIN_KEY) is not True:
        raise ServeryError.with_status(401, "admin endpoints need the admin token or an API key")


@router.get(
    "/v1/usage",
    responses={
        401: {"description": "Missing or invalid API key (when keys are configured)"},
        403: {"description": "all=true with an API key limited to some models"},
    },
    summary="Usage per API key and model",
)
async def get_usage(
    request: Request, every_key: Annotated[bool, Query(alias="all")] = False
) -> Response:
    """Requests, rows and LLM tokens (prompt: ``input_tokens``, completion: ``output_tokens``)
    of the caller's API key, per model, since the server started, summed over every router
    worker (OpenAI's usage API shape: one page, one bucket, results grouped by ``api_key_id``
    and ``model``; docs/clients.md). ``all=true``: every key's, for a key that may use every
    model (as ``/admin/reload``). Without API keys everything is counted under the key ``-``."""
    key = request.scope.get(SCOPE_KEY)
    if key is not None and every_key and key.models is not None:
        return openai_error(Forbidden("all=true needs an API key that may use every model"))
    keys = None if key is None or every_key else {key.name}
    multiproc_dir, since = _usage_source()
    return json_response(usage.report(keys, multiproc_dir=multiproc_dir, since=since))


_USAGE_SOURCE: list[tuple[str | None, float]] = []


def _usage_source() -> tuple[str | None, float]:
    """Where the usage counters live (``bentoml serve``'s multiprocess directory, or this
    process) and when they started; read once per worker."""
    if not _USAGE_SOURCE:
        import os

        _USAGE_SOURCE.append((os.environ.get("PROMETHEUS_MULTIPROC_DIR"), usage.server_start()))
    return _USAGE_SOURCE[0]

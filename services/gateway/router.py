"""The Router: the Bento's entry point and the platform's public HTTP API.

Routes (a FastAPI app mounted into the BentoML service, so BentoML merges them into ``/docs.json``
and keeps ``/livez``, ``/readyz`` and ``/metrics``):

* ``POST /predict`` — ``{"model", "version"?, "inputs": [[...], ...]}`` → predictions
* ``GET /models`` and ``GET /models/{name}`` — served models with versions, aliases, routing,
  load errors, schema and metrics
* ``POST /admin/reload`` — re-read the models file, the store and the aliases now
* ``/v1/*`` — the OpenAI API of the LLM service (``services/llm/service.py``), streamed through
  unbuffered by ``services/llm/proxy.py`` (when ``SERVERY_LLM_ENABLED``)
* ``GET /console/`` — the web console (``services/console/``: static pages that call the routes
  above and ``/metrics`` from the browser)

With API keys configured (``services/gateway/auth.py``) every route but the probes and ``/metrics``
needs
one, checked in front of BentoML's app (``services/gateway/gate.py``); ``/predict``, whose model is
in
the body, checks the key's allowed models here.

A model serves several store versions at once (``services/runtime/registry.py``): a request names
one
(``version``: id, unique prefix or alias) or the model's routing table picks one (split, else the
``production`` alias, else the newest); the response names the exact version and ``routed_by``.

Each model is served ``inline`` (loaded in every router worker, requests merged by the
:class:`~services.runtime.batcher.MicroBatcher`) or in its framework ``service`` (the router
validates,
micro-batches, and sends each batch with one ``bentoml.depends`` call). See the README for why
``inline`` is the default.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Annotated, Any

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.exceptions import HTTPException
from starlette.responses import Response

from models.config import Framework
from services import console
from services.compat.patches import freeze_heap
from services.frameworks.sklearn_service import SklearnService
from services.frameworks.torch_service import TorchService
from services.frameworks.xgboost_service import XGBoostService
from services.gateway import auth
from services.gateway.gate import SCOPE_KEY, http_gate
from services.gateway.media import read_body
from services.llm.proxy import StreamingProxy
from services.ops import logs, metrics
from services.ops.health import ServiceHealth, probe_of
from services.protocols.oip import rest as oip_rest
from services.runtime.errors import (
    BadRequest,
    ModelNotReady,
    Overloaded,
    ServeryError,
    error_response,
    from_validation_error,
    json_response,
)
from services.runtime.loader import Loader
from services.runtime.predictors import check_scores
from services.runtime.registry import ROUTE_KEY_HEADER, Registry, RemotePredict, RemotePrepare
from services.settings import SETTINGS

logger = logging.getLogger("servery")

KEYS = auth.keyring(SETTINGS)
"""This worker's API keys and their rate-limit buckets (None: authentication off), shared by the
HTTP gate and the gRPC servicer."""
GATE = http_gate(KEYS, SETTINGS)

_ROWS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "array", "minItems": 1, "items": {"type": "number"}},
    "description": "Rows x features; each row holds the model's n_features finite numbers",
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
    predictions: list[int] = Field(description="Predicted class index per row")
    labels: list[str] = Field(description="Predicted class name per row")
    probabilities: list[list[float]] = Field(description="Class probabilities per row")


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERRORS: dict[int | str, dict[str, Any]] = {
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

app = FastAPI(
    title="servery",
    version="0.1.0",
    docs_url=None,  # BentoML serves the Swagger UI at / and the merged spec at /docs.json
    redoc_url=None,
    openapi_url=None,
)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> Response:
    return error_response(ServeryError.with_status(exc.status_code, str(exc.detail)))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    return error_response(BadRequest(f"invalid request: {exc.errors()[:3]}"))


def _registry(request: Request) -> Registry:
    registry: Registry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise ModelNotReady("models are still loading")
    return registry


@app.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    summary="Predict with a served model",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    },
)
async def predict(request: Request) -> Response:
    """Predict classes and probabilities for ``inputs`` with ``model`` (at ``version``)."""
    model = metrics.UNKNOWN_MODEL
    version = ""
    start = time.perf_counter()
    counted = metrics.UNKNOWN_REQUESTS  # the version's own series once it is resolved
    try:
        try:
            raw = await read_body(request, binary=False, max_bytes=SETTINGS.max_body_bytes)
            body = PredictRequest.model_validate_json(raw)
        except ValidationError as e:
            raise from_validation_error(e) from e
        key = request.scope.get(SCOPE_KEY)
        if key is not None:  # before the lookup: an unknown model is 403 too, not 404
            key.check_model(body.model)
        registry = _registry(request)
        routes = registry.routes(body.model)
        pinned = body.version
        key = None
        if pinned is None and routes.split is not None:
            key = request.headers.get(ROUTE_KEY_HEADER)
        served, how = routes.route(pinned, key)
        info = served.info
        model, version = info.name, info.version
        request.scope[logs.MODEL_KEY] = (model, version)
        counted = served.metrics
        x = info.validate(body.inputs, SETTINGS.max_rows_per_request)
        labels, proba = await served.batcher.submit(x)
        check_scores(info, proba)
        if pinned is None and routes.shadow is not None:
            registry.mirror(routes, served, x, labels)
        idx = labels.tolist()
        names = info.class_names
        response = json_response(
            {
                "model": model,
                "version": version,
                "routed_by": how,
                "predictions": idx,
                "labels": [names[i] if i < len(names) else str(i) for i in idx],
                "probabilities": proba.tolist(),
            }
        )
    except asyncio.CancelledError:  # the request timeout cancelled it: the client gets a 504
        counted.answered(504, time.perf_counter() - start)
        raise
    except Exception as e:
        response = error_response(e)
        counted.answered(response.status_code, time.perf_counter() - start)
        return response
    counted.answered(200, time.perf_counter() - start)
    return response


@app.get(
    "/models",
    responses={c: _ERRORS[c] for c in (401, 429, 503)},
    summary="List served models",
)
async def list_models(request: Request) -> dict[str, Any]:
    """Every served model: versions, aliases, routing, load errors, schema and training metrics.

    Models configured but not served (nothing loaded), and models whose framework service is
    unreachable, are listed with ``ready: false`` and the reason; ``last_reload`` is this
    worker's latest reload report. An API key restricted to some models sees only those (and no
    ``last_reload``: it is the whole server's)."""
    registry = _registry(request)
    key = request.scope.get(SCOPE_KEY)
    if key is not None and key.models is not None:
        return {"models": [m for m in registry.describe() if key.allows(m["name"])]}
    return {"models": registry.describe(), "last_reload": registry.last_reload}


@app.get(
    "/models/{name}",
    responses={c: _ERRORS[c] for c in (401, 403, 404, 429, 503)},
    summary="Describe one served model",
)
async def get_model(request: Request, name: str) -> Response:
    try:
        return json_response(_registry(request).describe_model(name))
    except ServeryError as e:
        return error_response(e)


@app.post(
    "/admin/reload",
    responses={401: {"model": ErrorResponse, "description": "Missing or wrong admin token"}},
    summary="Reload models now",
)
async def admin_reload(request: Request) -> Response:
    """Re-read the models file, the store and the aliases, load what is new, switch, unload.

    Reloads the router worker that receives the call at once and retries versions that failed
    before; the other workers see the same change on their next poll
    (``SERVERY_RELOAD_INTERVAL_S``).
    The report says what was loaded, unloaded and what failed (``ok: false``: a model kept its
    previous versions). Needs ``Authorization: Bearer <SERVERY_ADMIN_TOKEN>`` when that is set.
    """
    try:
        _check_admin(request)
        report = await _registry(request).reload(force=True)
    except Exception as e:
        return error_response(e)
    return json_response(report)


def _check_admin(request: Request) -> None:
    # With API keys on and no admin token, the gate admitted this request with a valid key; with
    # an admin token, the gate leaves /admin/ to this check (both use the Authorization header).
    token = SETTINGS.admin_token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise ServeryError.with_status(401, "admin endpoints need 'Authorization: Bearer <token>'")


# Open Inference Protocol V2 over REST (/v2/...), same registry and batchers as /predict.
app.include_router(oip_rest.router)

if SETTINGS.llm_enabled:
    from services.llm.service import LLM

    def _llm_address() -> str:
        from bentoml._internal.configuration.containers import BentoMLContainer

        return BentoMLContainer.remote_runner_mapping.get()[LLM.name]

    # A raw ASGI app (not a FastAPI endpoint): the proxy streams the LLM service's answer as it is
    # written, and answers 504 when the service sends nothing for SERVERY_REQUEST_TIMEOUT_S.
    def _llm_done(model: str, status: int, seconds: float) -> None:
        # label values are client input: only served names/tasks keep their own series
        label = model if model in _LLM_NAMES else metrics.UNKNOWN_MODEL
        metrics.LLM_REQUESTS.labels(label, str(status)).inc()
        metrics.LLM_SECONDS.labels(label).observe(seconds)

    from services.llm.service import SETTINGS as _LLM_SETTINGS

    _LLM_NAMES = frozenset([m.name for m in _LLM_SETTINGS.models] + list(_LLM_SETTINGS.tasks))
    LLM_PROXY = StreamingProxy(
        _llm_address,
        connect_timeout_s=5.0,
        read_timeout_s=SETTINGS.request_timeout_s,
        on_done=_llm_done,
    )
    # The fast path (services/gateway/fastpath.py) serves /v1/ with this same proxy before BentoML's
    # middleware; the route serves it when the fast path is off.
    app.add_route("/v1/{path:path}", LLM_PROXY, methods=["GET", "POST"], include_in_schema=False)
else:
    LLM_PROXY = None

# The web console (services/console/): static pages under /console/, not on the prediction path.
console.mount(app, auth=KEYS is not None, llm=SETTINGS.llm_enabled)


def _remote(dependency: Any, framework: Framework, health: ServiceHealth) -> RemotePredict:
    """Call a framework service's ``predict_batch`` with a whole micro-batch; a call that cannot
    reach the service marks it down in ``health``, one that is answered marks it up."""
    import aiohttp
    import httpx
    from bentoml.exceptions import BentoMLException, ServiceUnavailable

    async def call(name: str, version: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        why = health.down(framework)
        if why is not None:
            # circus keeps a dead worker's socket open until its replacement listens: a call
            # would wait that long (seconds, up to the request timeout). Answer 503 now; the
            # probe (every 0.5 s while down) or the next answered call marks it up again.
            raise ModelNotReady(f"model '{name}' is not available: {why}")
        try:
            out = await dependency.to_async.predict_batch(model=name, version=version, inputs=x)
        except ServiceUnavailable as e:
            raise Overloaded(f"the {framework} service is overloaded; retry shortly") from e
        except (httpx.TransportError, aiohttp.ClientError, OSError) as e:
            # BentoML's client is httpx: a worker killed mid-call is a ReadError or
            # RemoteProtocolError, a socket nobody listens on a ConnectError
            health.mark_down(framework, f"a call failed: {type(e).__name__}")
            raise ModelNotReady(
                f"model '{name}' is not reachable in the {framework} service"
            ) from e
        except BentoMLException as e:
            raise RuntimeError(f"{framework} service failed for model '{name}'") from e
        health.mark_up(framework)
        return out["labels"], out["probabilities"]

    return call


def _prepare(dependency: Any, framework: Framework, health: ServiceHealth) -> RemotePrepare:
    """Ask a framework service to load a version before the router routes to it."""

    async def prepare(name: str, version: str) -> None:
        await dependency.to_async.prepare(model=name, version=version)
        health.mark_up(framework)  # it answered: a newly used service needs no probe first

    return prepare


@bentoml.service(
    name="router",
    workers=SETTINGS.router_workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    # OpenTelemetry spans cost a large share of the router's CPU per request even when none are
    # exported (STACK.md); the prediction routes skip them unless SERVERY_TRACE_PREDICTIONS.
    tracing={"excluded_urls": [] if SETTINGS.trace_predictions else ["/predict", "/v2/models/"]},
    # BentoML's /readyz would also be 503 whenever any dependency is (even one serving no model),
    # taking every model out of rotation while one service restarts; Registry.ready decides.
    runner_probe={"enabled": False},
)
@bentoml.asgi_app(app, path="/")
class Router:
    """Entry service: validates, micro-batches and routes every prediction."""

    # services/gateway/fastpath.py serves this service's prediction routes outside BentoML's
    # middleware.
    __servery_fast_path__ = "router"

    sklearn = bentoml.depends(SklearnService)
    xgboost = bentoml.depends(XGBoostService)
    torch = bentoml.depends(TorchService)
    if SETTINGS.llm_enabled:
        llm = bentoml.depends(LLM)

    def __init__(self) -> None:
        services = {
            Framework.SKLEARN: self.sklearn,
            Framework.XGBOOST: self.xgboost,
            Framework.PYTORCH: self.torch,
        }
        probes = {f.value: probe_of(dep) for f, dep in services.items()}
        if SETTINGS.llm_enabled:
            probes["llm"] = probe_of(self.llm)
        self.health = ServiceHealth(probes)
        loader = Loader(
            SETTINGS,
            remote={f: _remote(dep, f, self.health) for f, dep in services.items()},
            prepare={f: _prepare(dep, f, self.health) for f, dep in services.items()},
        )
        self.registry = loader.initial()
        self.registry.health = self.health
        self.registry.other_services = ("llm",) if SETTINGS.llm_enabled else ()
        app.state.registry = self.registry
        freeze_heap()
        metrics.watch_gc()

    async def __is_ready__(self) -> bool:  # async: BentoML runs it on the event loop
        """``/readyz``: every configured model has a version serving (a failed reload that kept
        the old version serving stays ready; a model with nothing loaded is not), the services
        they need have started, and one of them answers now (``Registry.ready``)."""
        return self.registry.ready()

    @bentoml.on_startup
    async def _watch_services(self) -> None:
        """Probe the framework services (and the LLM service) the models need, now and then."""
        self._health_watcher = asyncio.get_running_loop().create_task(
            self.health.watch(self.registry.services, SETTINGS.reload_interval_s)
        )

    @bentoml.on_startup
    async def _watch_models(self) -> None:
        """Poll the models file, the store and the aliases, and reload on change."""
        self._watcher = asyncio.get_running_loop().create_task(
            self.registry.watch(SETTINGS.reload_interval_s)
        )

    @bentoml.on_startup
    async def _start_grpc(self) -> None:
        """Serve OIP V2 over gRPC from this worker, on its event loop (see
        services/protocols/oip/grpc.py).

        BentoML runs startup hooks in each worker's lifespan, after ``__init__`` built the
        registry, so ``bentoml serve`` starts gRPC with no second command.
        """
        self._grpc_server = None
        if SETTINGS.grpc_enabled:
            from services.protocols.oip import (
                grpc as oip_grpc,  # grpc and tritonclient load only when used
            )

            self._grpc_server = await oip_grpc.serve(self.registry, SETTINGS, keys=KEYS)

    @bentoml.on_shutdown
    async def _stop_grpc(self) -> None:
        """Stop accepting gRPC calls (in-flight ones get a short grace period) and the watcher."""
        for name in ("_watcher", "_health_watcher"):
            watcher = getattr(self, name, None)
            if watcher is not None:
                watcher.cancel()
        server = getattr(self, "_grpc_server", None)
        if server is not None:
            from services.protocols.oip import grpc as oip_grpc

            await server.stop(oip_grpc.STOP_GRACE_S)

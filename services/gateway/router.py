"""The Router: the Bento's entry service and the platform's public HTTP API, assembled here.

Its app (a FastAPI app mounted into the BentoML service, so BentoML merges the routes into
``/docs.json`` and keeps ``/livez``, ``/readyz`` and ``/metrics``) includes the front ends:

* ``POST /predict``, ``GET /models``, ``GET /models/{name}``, ``POST /admin/reload``: the
  platform's API (``services/protocols/native.py``)
* ``/v2/*``: the Open Inference Protocol over REST (``services/protocols/oip/rest.py``); gRPC is
  started by this service in every worker (``services/protocols/oip/grpc.py``)
* ``/v1/*``: the OpenAI API of the LLM service (``services/llm/service.py``), streamed through
  unbuffered by ``services/llm/proxy.py`` (when ``SERVERY_LLM_ENABLED``)
* ``GET /console/``: the web console (``services/console/``)

The three prediction front ends call one inference function (``services/runtime/inference.py``)
over this worker's :class:`~services.runtime.registry.Registry`, built here at start by the
:class:`~services.runtime.loader.Loader`. With API keys configured (``services/gateway/auth.py``)
every route but the probes and ``/metrics`` needs one, checked in front of BentoML's app
(``services/gateway/gate.py``, installed by ``services/gateway/fastpath.py``).

Each model is served ``inline`` (loaded in every router worker, requests merged by the
:class:`~services.runtime.batcher.MicroBatcher`) or in its framework ``service`` (the router
validates, micro-batches, and sends each batch with one ``bentoml.depends`` call; see
docs/configuration.md for why ``inline`` is the default).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import Field, WithJsonSchema
from starlette.exceptions import HTTPException
from starlette.responses import Response

from models.config import Framework
from services import console
from services.batch import api as batch_api
from services.batch.settings import BatchSettings
from services.frameworks.sklearn_service import SklearnService
from services.frameworks.torch_service import TorchService
from services.frameworks.xgboost_service import XGBoostService
from services.gateway import auth
from services.gateway.gate import http_gate
from services.llm.proxy import StreamingProxy
from services.ops import metrics
from services.ops.health import ServiceHealth, probe_of
from services.ops.heap import freeze_heap
from services.protocols import native
from services.protocols.errors import error_response
from services.protocols.oip import rest as oip_rest
from services.rag.settings import RagSettings
from services.runtime.errors import BadRequest, ModelNotReady, Overloaded, ServeryError
from services.runtime.loader import Loader
from services.runtime.registry import RemotePredict, RemotePrepare
from services.settings import SETTINGS

logger = logging.getLogger("servery")

KEYS = auth.keyring(SETTINGS)
"""This worker's API keys and their rate-limit buckets (None: authentication off), shared by the
HTTP gate and the gRPC servicer."""


def _llm_max_tokens_limit() -> int | None:
    """SERVERY_LLM_MAX_TOKENS_LIMIT: what the LLM service caps a completion that sets no
    ``max_tokens`` to, so what the gate charges it."""
    if not SETTINGS.llm_enabled:
        return None
    from services.llm.service import SETTINGS as LLM_SETTINGS

    return LLM_SETTINGS.max_tokens_limit


GATE = http_gate(KEYS, SETTINGS, llm_max_tokens_limit=_llm_max_tokens_limit())

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


# The platform's API: /predict, /models, /models/{name}, /admin/reload.
app.include_router(native.router)
# Open Inference Protocol V2 over REST (/v2/...), same registry and batchers as /predict.
app.include_router(oip_rest.router)
# The OpenAI Files and Batch API (services/batch/): before the LLM proxy's /v1 route.
BATCH = BatchSettings()
if BATCH.enabled:
    app.include_router(batch_api.router)

if SETTINGS.llm_enabled:
    from services.llm.service import LLM

    def _llm_address() -> str:
        from bentoml._internal.configuration.containers import BentoMLContainer

        return BentoMLContainer.remote_runner_mapping.get()[LLM.name]

    # A raw ASGI app (not a FastAPI endpoint): the proxy streams the LLM service's answer as it is
    # written, and answers 504 when the service sends nothing for SERVERY_REQUEST_TIMEOUT_S.
    def _llm_done(model: str, status: int, seconds: float) -> None:
        # label values are client input: bounded by services/llm/labels.py
        label = _LLM_LABELS.label(model, status)
        metrics.LLM_REQUESTS.labels(label, str(status)).inc()
        metrics.LLM_SECONDS.labels(label).observe(seconds)

    from services.llm.labels import ModelLabels, configured_names
    from services.llm.service import SETTINGS as _LLM_SETTINGS

    _LLM_LABELS = ModelLabels(configured_names(_LLM_SETTINGS))
    LLM_PROXY = StreamingProxy(
        _llm_address,
        connect_timeout_s=5.0,
        read_timeout_s=SETTINGS.request_timeout_s,
        on_done=_llm_done,
        max_body_bytes=SETTINGS.max_body_bytes,
    )
    RAG_ON = RagSettings().active(llm_enabled=True)
    if RAG_ON:  # RAG (services/rag/): its own service, started only when configured
        from services.rag.routing import V1Split
        from services.rag.service import RAG
        from services.rag.service import STATE as _RAG_STATE

        def _rag_address() -> str:
            from bentoml._internal.configuration.containers import BentoMLContainer

            return BentoMLContainer.remote_runner_mapping.get()[RAG.name]

        _LLM_LABELS.add(_RAG_STATE.apps)
        RAG_PROXY = StreamingProxy(
            _rag_address,
            connect_timeout_s=5.0,
            read_timeout_s=SETTINGS.request_timeout_s,
            on_done=_llm_done,
        )
        LLM_PROXY = V1Split(
            LLM_PROXY, RAG_PROXY, frozenset(_RAG_STATE.apps), SETTINGS.max_body_bytes
        )
    # The fast path (services/gateway/fastpath.py) serves /v1/ with this same proxy before BentoML's
    # middleware; the route serves it when the fast path is off.
    app.add_route(
        "/v1/{path:path}", LLM_PROXY, methods=["GET", "POST", "DELETE"], include_in_schema=False
    )
    if BATCH.enabled:  # the fast path's /v1 mount: files and batches are served here
        LLM_PROXY = batch_api.BatchSplit(LLM_PROXY)
else:
    LLM_PROXY = None
    RAG_ON = False

# The web console (services/console/): static pages under /console/, not on the prediction path.
console.mount(app, auth=KEYS is not None, llm=SETTINGS.llm_enabled)

CLIENT_APIS = ("predict", "models")
"""The Router's BentoML APIs (below): what ``bentoml.SyncHTTPClient``/``AsyncHTTPClient`` find in
``/schema.json``. Their requests are the platform's own (``POST /predict`` with ``model``,
``inputs``, ``version``; ``POST /models``), so the platform's handlers answer them (the fast path
for ``/predict``, else the mounted app: services/protocols/native.py), with the same keys,
errors, metrics and speed as every other client's: :func:`serve_client_apis_from_app` takes
BentoML's copies of these routes out of the app it builds."""


# BentoML's clients call every API with POST: the model list answers it as it answers GET.
app.add_api_route("/models", native.list_models, methods=["POST"], include_in_schema=False)


def serve_client_apis_from_app(built: Any) -> None:
    """Drop the routes BentoML adds for :data:`CLIENT_APIS` from the Starlette app it built for
    the Router (they come before the mounted app and would shadow its handlers); the schema
    stays. Called by services/gateway/fastpath.py on the entry service's app."""
    built.router.routes[:] = [
        r for r in built.router.routes if getattr(r, "name", None) not in CLIENT_APIS
    ]


async def _in_process(handler: Any, body: dict[str, Any]) -> Any:
    """``handler`` (a platform route) called in-process with JSON ``body``: its JSON answer, or
    the error it answered raised as a :class:`ServeryError` with its status and message."""
    import json

    from starlette.requests import Request as StarletteRequest

    raw = json.dumps(body).encode()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "app": app}
    response = await handler(StarletteRequest(scope, receive))
    answer = json.loads(response.body)
    if response.status_code != 200:
        error = answer.get("error", {})
        raise ServeryError.with_status(response.status_code, str(error.get("message", error)))
    return answer


def _batches() -> Any:
    """This worker's batch jobs (services/batch/): lines run in-process with the batch
    owner's key (its name and models as they were when the batch was created), those for the
    prediction routes straight through the fast path's handlers (services/gateway/fastpath.py,
    the functions their FastAPI routes call too) when it is on, the rest through ``app``."""
    from services.batch.worker import AsgiCaller, Batches
    from services.gateway.fastpath import prediction_routes

    def key_of(owner: str, models: list[str] | None) -> auth.ApiKey | None:
        if not owner:  # created without keys
            return None
        return auth.ApiKey(owner, b"", None if models is None else frozenset(models))

    # as online requests: with the fast path off, every line runs through ``app``
    fast = SETTINGS.fast_path and not SETTINGS.trace_predictions  # as services/__init__.py
    direct = [(r.pattern, r.handler) for r in prediction_routes()] if fast else []
    batches = Batches(BATCH, AsgiCaller(app, key_of, direct))
    batch_api.BATCHES[:] = [batches]
    return batches


def _remote(dependency: Any, framework: Framework, health: ServiceHealth) -> RemotePredict:
    """Call a framework service's ``predict_batch`` with a whole micro-batch; a call that cannot
    reach the service marks it down in ``health``, one that is answered marks it up."""
    import aiohttp
    import httpx
    from bentoml.exceptions import BentoMLException, ServiceUnavailable

    async def call(name: str, version: str, x: np.ndarray) -> dict[str, np.ndarray]:
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
        return out["outputs"]  # type: ignore[no-any-return]

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
    # exported (docs/internals/stack.md); the prediction routes skip them unless
    # SERVERY_TRACE_PREDICTIONS.
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
    __servery_fast_path__ = {
        "kind": "router",
        "api": app,
        "gate": GATE,
        "llm_proxy": LLM_PROXY,
        "own_routes": serve_client_apis_from_app,
    }

    sklearn = bentoml.depends(SklearnService)
    xgboost = bentoml.depends(XGBoostService)
    torch = bentoml.depends(TorchService)
    if SETTINGS.llm_enabled:
        llm = bentoml.depends(LLM)
    if RAG_ON:
        rag = bentoml.depends(RAG)

    # BentoML's clients: the schema of the platform's /predict and /models (CLIENT_APIS). Over
    # HTTP the platform's handlers answer these routes; the methods serve in-process callers.
    @bentoml.api(route="/predict")
    async def predict(
        self,
        model: Annotated[str, Field(description="Served model name (see models())")],
        inputs: Annotated[Any, WithJsonSchema(native._ROWS_SCHEMA), Field(description="Rows")],
        version: Annotated[
            str | None,
            Field(description="Version id, prefix, alias or 'latest'; default: the routing table"),
        ] = None,
    ) -> native.PredictResponse:
        """Predict with ``model`` (at ``version``): classes and probabilities of a classifier,
        the values of a regressor, the outputs of a tensor model (as ``POST /predict``)."""
        body = {"model": model, "inputs": inputs}
        if version is not None:
            body["version"] = version
        return await _in_process(native.predict, body)  # type: ignore[return-value]

    @bentoml.api(route="/models")
    async def models(self) -> dict[str, Any]:
        """Every served model: versions, aliases, routing, readiness, schema (``GET /models``)."""
        return {"models": self.registry.describe(), "last_reload": self.registry.last_reload}

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
        self.batches = _batches() if BATCH.enabled else None
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
    async def _consume_batches(self) -> None:
        """The batch queue's consumer, in every router worker (``SERVERY_BATCH_WORKER``): a
        job takes the whole server while no online request comes (services/batch/worker.py)."""
        if self.batches is not None and BATCH.worker:
            self._batch_consumer = asyncio.get_running_loop().create_task(self.batches.consume())

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
        for name in ("_watcher", "_health_watcher", "_batch_consumer"):
            watcher = getattr(self, name, None)
            if watcher is not None:
                watcher.cancel()
        server = getattr(self, "_grpc_server", None)
        if server is not None:
            from services.protocols.oip import grpc as oip_grpc

            await server.stop(oip_grpc.STOP_GRACE_S)

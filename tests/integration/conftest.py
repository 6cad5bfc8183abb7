"""A real Bento served once per session with every demo model in both placements."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn

from bench.harness.server import Server, cpu_llm_env, free_port, start_server
from bench.harness.store import bentoml_store, save_iris
from tests.conftest import eventually

DEMOS = ("iris", "breast_cancer", "digits")
# served name -> store name; "-svc" entries run in their framework service
PLACEMENTS = {**{d: d for d in DEMOS}, **{f"{d}-svc": d for d in DEMOS}}

MIXED_CONFIG = "defaults:\n  placement: inline\nmodels:\n" + "".join(
    f"  - name: {name}\n    tag: {store}\n"
    + ("    placement: service\n" if name.endswith("-svc") else "")
    for name, store in PLACEMENTS.items()
)


def dataset(store_name: str) -> np.ndarray:
    """Real feature rows for a demo model (the sklearn dataset it was trained on)."""
    from sklearn import datasets

    loader = {
        "iris": datasets.load_iris,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }[store_name]
    return loader().data


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[OtlpCollector]:
    """The OTLP/HTTP receiver the session's :func:`server` exports its spans to."""
    collector = OtlpCollector()
    try:
        yield collector
    finally:
        collector.server.stop()


@pytest.fixture(scope="session")
def server(
    demo_store: Path, tmp_path_factory: pytest.TempPathFactory, otlp_collector: OtlpCollector
) -> Iterator[Server]:
    """OpenTelemetry is on the standard way (services/ops/tracing.py), sampling only requests
    whose caller's ``traceparent`` is sampled: no other request makes a span
    (tests/integration/test_otel_server.py)."""
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_collector.port}",
        "OTEL_TRACES_SAMPLER": "parentbased_always_off",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans reach the receiver sooner
    }
    srv = start_server(
        demo_store,
        MIXED_CONFIG,
        tmp_path_factory.mktemp("serve"),
        env={"SERVERY_GRPC_PORT": str(free_port()), **otel},
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def local_predict(demo_store: Path):
    """In-process predictions with the same runtimes the server uses: name -> rows -> result."""
    from models.config import ModelEntry
    from services.runtime.predictors import load_runtime

    with bentoml_store(demo_store):
        runtimes = {d: load_runtime(ModelEntry(name=d)) for d in DEMOS}

    def predict(served_name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        runtime = runtimes[PLACEMENTS[served_name]]
        out = runtime.predict(np.asarray(rows, dtype=runtime.info.dtype))
        return out["predict"], out["predict_proba"]

    return predict


LLM_NAME = "tiny"
"""Served name of the tiny test LLM in :func:`llm_server`."""


@pytest.fixture(scope="session")
def tiny_llm_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A temporary store holding ``tiny-llm`` (training/tiny_llm.py, ~15 s): ``(BENTOML_HOME,
    the model's Hugging Face directory)``, the latter for tests that count tokens with its
    tokenizer. Skipped where vLLM is not installed."""
    pytest.importorskip("vllm")
    from models.llm_store import hf_dir
    from training.tiny_llm import save

    home = tmp_path_factory.mktemp("llm-store") / "bentoml"
    with bentoml_store(home):
        saved = save("tiny-llm")
        save_iris()  # the router serves at least one classifier
        return home, hf_dir(str(saved.tag))[0]


@pytest.fixture(scope="module")
def llm_server(
    tiny_llm_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The Bento (``services:Router``) with the LLM service (vLLM on CPU) serving the tiny LLM as
    ``tiny``, with a 1 GiB KV cache and no CUDA graphs / compile. Every
    LLM test talks to the router's port, as clients do: ``/v1`` goes through its streaming
    proxy. Module-scoped: the engine's processes are gone before the next test module runs."""
    env = {
        **cpu_llm_env(f"{LLM_NAME}=tiny-llm"),
        "SERVERY_LLM_TASKS": f"small={LLM_NAME}",
        "SERVERY_LLM_MAX_TOKENS_LIMIT": "1024",  # as deploy/ caps it (4096 there)
        # test_sigterm_lets_the_stream_in_flight_finish (the last LLM test) stops this server
        "SERVERY_SHUTDOWN_DRAIN_S": "3",
    }
    srv = start_server(
        tiny_llm_store[0],
        "models:\n  - name: iris\n",
        tmp_path_factory.mktemp("llm-serve"),
        env=env,
        ready_timeout=300,
    )
    try:
        yield srv
    finally:
        srv.stop()  # also waits for vLLM's engine processes to go


class Background:
    """A uvicorn server in a thread."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **kwargs))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        eventually(lambda: self.server.started, "uvicorn started in its thread", every=0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class OtlpCollector:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (``/v1/traces``): a Starlette app decoding
    OpenTelemetry's own protobuf messages; ``bodies`` holds what it received."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        self.bodies: list[bytes] = []

        async def traces(request: Request) -> Response:
            self.bodies.append(await request.body())
            return Response(
                ExportTraceServiceResponse().SerializeToString(),
                media_type="application/x-protobuf",
            )

        self.port = free_port()
        app = Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])
        self.server = Background(app, host="127.0.0.1", port=self.port)

    def spans(self) -> list[tuple[str, str, str]]:
        """Every span received, as (service, span name, trace id)."""
        return [(s["service"], s["name"], s["trace"]) for s in self.details()]

    def details(self) -> list[dict[str, Any]]:
        """Every span received: service, name, kind, trace, parent and span ids, attributes."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        out = []
        for body in list(self.bodies):
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                res = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attrs = {
                            a.key: a.value.string_value or a.value.int_value for a in s.attributes
                        }
                        out.append(
                            {
                                "service": res.get("service.name", ""),
                                "name": s.name,
                                "kind": s.kind,
                                "trace": s.trace_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "span": s.span_id.hex(),
                                "attrs": attrs,
                            }
                        )
        return out

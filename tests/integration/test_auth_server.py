"""API keys and rate limits on a real server: REST (httpx) and OIP gRPC (tritonclient and the raw
stub), with the fast path on and off. Each server runs one router worker, so a key's whole
per-router limit lives in one bucket and the counts below are exact. The OpenAI API under /v1/ is
checked without vLLM: the router's gate and streaming proxy in front of a stand-in service."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from bench.harness.server import Server, free_port, metric_samples, start_server
from bench.harness.store import bentoml_store, save_iris
from models.config import Settings
from services.gateway import auth
from services.gateway.fastpath import FastPath
from services.gateway.gate import http_gate
from services.llm.proxy import StreamingProxy
from tests.conftest import eventually, settled
from tests.integration.conftest import Background

KEY_ALL = "all-models-key-0123456789"
KEY_IRIS = "iris-only-key-0123456789"
KEY_LIMITED = "limited-key-0123456789ab"
KEY_GRPC = "grpc-limited-key-01234567"
MODELS = "models:\n  - name: iris\n  - name: other\n    tag: iris\n"
ROW = [5.1, 3.5, 1.4, 0.2]
INFER = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
OPEN = ["/livez", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"]


def keys_file(path: Path, with_all: bool) -> Path:
    iris = "sha256:" + hashlib.sha256(KEY_IRIS.encode()).hexdigest()
    text = "keys:\n"
    if with_all:
        text += f"  - name: all\n    key: {KEY_ALL}\n"
    text += (
        f"  - name: iris\n    key: {iris}\n    models: [iris]\n"
        f"  - name: limited\n    key: {KEY_LIMITED}\n    requests_per_minute: 60\n"
        f"  - name: grpc-limited\n    key: {KEY_GRPC}\n    requests_per_minute: 60\n"
    )
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """``fast``: keys from a file, the fast path on. ``bentoml``: the fast path off, the all-models
    key from ``SERVERY_API_KEYS`` and the others from a file. Started side by side."""
    work = tmp_path_factory.mktemp("auth")
    home = work / "bentoml"
    with bentoml_store(home):
        save_iris()
    common = {"SERVERY_ROUTER_WORKERS": "1"}
    envs = {
        "fast": {**common, "SERVERY_API_KEYS_FILE": str(keys_file(work / "a.yaml", True))},
        "bentoml": {
            **common,
            "SERVERY_FAST_PATH": "false",
            "SERVERY_API_KEYS": KEY_ALL,
            "SERVERY_API_KEYS_FILE": str(keys_file(work / "b.yaml", False)),
        },
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(start_server, home, MODELS, work / name, env=env)
            for name, env in envs.items()
        }
        started = {}
        try:
            for name, future in futures.items():
                started[name] = future.result()
            yield started
        finally:
            for future in futures.values():
                if future.exception() is None:
                    future.result().stop()


@pytest.fixture(params=["fast", "bentoml"])
def server(request: pytest.FixtureRequest, servers: dict[str, Server]) -> Server:
    return servers[request.param]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_probes_and_metrics_are_open(server: Server) -> None:
    for path in OPEN:
        assert httpx.get(server.url + path).status_code == 200, path


@pytest.mark.parametrize(
    ("method", "path", "body", "envelope"),
    [
        ("POST", "/predict", {"model": "iris", "inputs": [ROW]}, "platform"),
        ("GET", "/models", None, "platform"),
        ("GET", "/models/iris", None, "platform"),
        ("GET", "/docs.json", None, "platform"),
        ("GET", "/v2", None, "oip"),
        ("GET", "/v2/models/iris", None, "oip"),
        ("POST", "/v2/models/iris/infer", INFER, "oip"),
        ("GET", "/v1/models", None, "openai"),
    ],
)
def test_rest_needs_a_valid_key(
    server: Server, method: str, path: str, body: dict | None, envelope: str
) -> None:
    url = server.url + path
    for headers in ({}, bearer(KEY_ALL[:-1] + "x"), {"Authorization": f"Basic {KEY_ALL}"}):
        r = httpx.request(method, url, json=body, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert r.headers["www-authenticate"].startswith("Bearer")
        error = r.json()["error"]
        if envelope == "oip":
            assert isinstance(error, str)
        elif envelope == "openai":
            assert error["type"] == "AuthenticationError" and error["code"] == 401
        else:
            assert error["type"] == "unauthenticated"
    r = httpx.request(method, url, json=body, headers=bearer(KEY_ALL))
    # the LLM service is off in these servers: past the key, /v1 is an unknown route
    assert r.status_code == (404 if path.startswith("/v1/") else 200), r.text


def test_key_limited_to_a_model_gets_403_on_others(server: Server) -> None:
    iris = bearer(KEY_IRIS)
    predict = {"model": "other", "inputs": [ROW]}
    r = httpx.post(server.url + "/predict", json=predict, headers=iris)
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
    r = httpx.post(server.url + "/predict", json={**predict, "model": "nope"}, headers=iris)
    assert r.status_code == 403  # an unknown model is refused the same way (no probing)
    r = httpx.post(server.url + "/v2/models/other/infer", json=INFER, headers=iris)
    assert r.status_code == 403 and "other" in r.json()["error"]
    assert httpx.get(server.url + "/models/other", headers=iris).status_code == 403
    r = httpx.post(server.url + "/predict", json={**predict, "model": "iris"}, headers=iris)
    assert r.status_code == 200 and r.json()["labels"] == ["setosa"]
    assert httpx.post(server.url + "/v2/models/iris/infer", json=INFER, headers=iris).is_success


def test_rate_limit_429_with_retry_after_then_recovers(server: Server) -> None:
    """60 a minute: a burst of 60 passes, the next waits about a second."""
    with httpx.Client(base_url=server.url, headers=bearer(KEY_LIMITED)) as client:
        statuses = []
        while len(statuses) < 200:
            r = client.post("/predict", json={"model": "iris", "inputs": [ROW]})
            statuses.append(r.status_code)
            if r.status_code != 200:
                break
        assert r.status_code == 429 and len(statuses) > 60, statuses
        assert r.json()["error"]["type"] == "rate_limited"
        assert r.headers["retry-after"] == "1"
        r = client.get("/v2/models/iris")  # every route counts, in its own envelope
        assert r.status_code == 429 and isinstance(r.json()["error"], str)
        time.sleep(float(r.headers["retry-after"]))
        assert client.get("/models").status_code == 200
    assert httpx.get(server.url + "/models", headers=bearer(KEY_ALL)).status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'servery_auth_rejected_total{key="limited",reason="rate_limited"} 2.0' in metrics


def test_grpc_needs_a_valid_key(servers: dict[str, Server]) -> None:
    client = tg.InferenceServerClient(url=servers["fast"].grpc_url)
    x = tg.InferInput("input-0", [1, 4], "FP64")
    x.set_data_from_numpy(np.array([ROW]))
    assert client.is_server_live() and client.is_server_ready()  # open, like the HTTP probes
    for headers in (None, {"authorization": "Bearer wrong-key-0123456789"}):
        for call in (
            lambda h: client.infer("iris", [x], headers=h),
            lambda h: client.get_server_metadata(headers=h),
            lambda h: client.get_model_metadata("iris", headers=h),
            lambda h: client.is_model_ready("iris", headers=h),
        ):
            with pytest.raises(InferenceServerException) as e:
                call(headers)
            assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    result = client.infer("iris", [x], headers={"authorization": f"Bearer {KEY_ALL}"})
    assert result.as_numpy("predict").tolist() == [0]
    iris = {"authorization": f"Bearer {KEY_IRIS}"}
    assert client.infer("iris", [x], headers=iris).as_numpy("predict").tolist() == [0]
    with pytest.raises(InferenceServerException) as e:
        client.infer("other", [x], headers=iris)
    assert e.value.status() == "StatusCode.PERMISSION_DENIED"
    client.close()


def test_grpc_rate_limit_is_resource_exhausted_with_retry_after(
    servers: dict[str, Server],
) -> None:
    request = pb.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input-0", datatype="FP64", shape=[1, 4])
    request.inputs[0].contents.fp64_contents.extend(ROW)
    metadata = (("authorization", f"Bearer {KEY_GRPC}"),)
    with grpc.insecure_channel(servers["fast"].grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = 0
        while calls < 200:
            calls += 1
            try:
                stub.ModelInfer(request, metadata=metadata)
            except grpc.RpcError as e:
                error = e
                break
        assert calls > 60 and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = dict(error.trailing_metadata() or ())["retry-after"]
        assert retry == "1"
        time.sleep(float(retry))
        stub.ModelInfer(request, metadata=metadata)


def test_a_restricted_key_sees_only_its_models(server: Server) -> None:
    listed = httpx.get(server.url + "/models", headers=bearer(KEY_IRIS)).json()
    assert [m["name"] for m in listed["models"]] == ["iris"]
    assert "last_reload" not in listed  # the whole server's report: not for a restricted key
    every = httpx.get(server.url + "/models", headers=bearer(KEY_ALL)).json()
    assert sorted(m["name"] for m in every["models"]) == ["iris", "other"]
    assert "last_reload" in every
    iris = bearer(KEY_IRIS)
    for path in ("/models/other", "/models/nope", "/v2/models/other", "/v2/models/other/ready"):
        r = httpx.get(server.url + path, headers=iris)
        assert r.status_code == 403, path  # like predictions: no probing for names
    assert httpx.get(server.url + "/models/iris", headers=iris).json()["name"] == "iris"
    assert httpx.get(server.url + "/v2/models/iris/ready", headers=iris).status_code == 200


KEY_NEW = "rotated-in-key-0123456789"


def test_admin_reload_needs_an_unrestricted_key_and_limits_failures(
    servers: dict[str, Server],
) -> None:
    """Issue 20 item 6: any key could reload, and see every model in the report; wrong
    credentials could be tried without limit. Now 403 for a key limited to some models, 401 for
    a wrong one, and after 10 failures a minute the address gets 429 even with a good key."""
    url = servers["fast"].url + "/admin/reload"
    r = httpx.post(url, json={}, headers=bearer(KEY_IRIS), timeout=30)
    assert r.status_code == 403 and "every model" in r.json()["error"]["message"]
    r = httpx.post(url, json={}, headers=bearer(KEY_ALL), timeout=30)
    assert r.status_code == 200
    for i in range(10):
        r = httpx.post(url, json={}, headers=bearer(f"wrong-key-{i:016d}"), timeout=30)
        assert r.status_code == 401
    r = httpx.post(url, json={}, headers=bearer(KEY_ALL), timeout=30)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def usage_table(srv: Server, key: str, every: bool = False) -> dict[tuple[str, str], list[int]]:
    """``GET /v1/usage`` as ``{(key name, model): [requests, rows, input, output tokens]}``."""
    r = httpx.get(srv.url + "/v1/usage" + ("?all=true" if every else ""), headers=bearer(key))
    assert r.status_code == 200, r.text
    (bucket,) = r.json()["data"]
    assert bucket["start_time"] <= bucket["end_time"]
    fields = ("num_model_requests", "rows", "input_tokens", "output_tokens")
    return {(u["api_key_id"], u["model"]): [u[f] for f in fields] for u in bucket["results"]}


def test_usage_per_key_matches_the_requests_made(server: Server) -> None:
    """A known sequence of requests per key, over /predict, OIP REST and gRPC: answered ones
    count with their rows under the key's name and the model; refused and failed ones do not.
    Each key sees only its own usage; every key's needs an unrestricted key."""
    everyone = "env-1" if server.env.get("SERVERY_API_KEYS") else "all"
    before = settled(lambda: usage_table(server, KEY_ALL, every=True), "usage settled")
    iris = bearer(KEY_IRIS)
    predict = server.url + "/predict"
    assert httpx.post(predict, json={"model": "iris", "inputs": [ROW]}, headers=iris).is_success
    rows3 = {"model": "iris", "inputs": [ROW] * 3}
    assert httpx.post(predict, json=rows3, headers=iris).is_success
    assert httpx.post(server.url + "/v2/models/iris/infer", json=INFER, headers=iris).is_success
    assert httpx.post(predict, json={**rows3, "model": "other"}, headers=iris).status_code == 403
    assert httpx.post(predict, json={**rows3, "inputs": [[1.0]]}, headers=iris).status_code == 422
    both = {"model": "other", "inputs": [ROW, ROW]}
    assert httpx.post(predict, json=both, headers=bearer(KEY_ALL)).is_success
    client = tg.InferenceServerClient(url=server.grpc_url)
    tensor = tg.InferInput("input-0", [2, 4], "FP64")
    tensor.set_data_from_numpy(np.array([ROW, ROW]))
    client.infer("iris", [tensor], headers={"authorization": f"Bearer {KEY_IRIS}"})
    client.close()

    def grown(key: str, model: str) -> list[int]:
        now = usage_table(server, KEY_ALL, every=True).get((key, model), [0, 0, 0, 0])
        was = before.get((key, model), [0, 0, 0, 0])
        return [a - b for a, b in zip(now, was, strict=True)]

    # each worker writes its counts on its own timer: wait for all of them
    eventually(
        lambda: (
            (grown("iris", "iris"), grown(everyone, "other"), grown("iris", "other"))
            == ([4, 7, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0])
        ),
        "the usage counted",
    )
    own = usage_table(server, KEY_IRIS)
    assert {k for k, _ in own} == {"iris"}  # its own key only
    r = httpx.get(server.url + "/v1/usage?all=true", headers=iris)
    assert r.status_code == 403 and r.json()["error"]["type"] == "PermissionDeniedError"
    assert httpx.get(server.url + "/v1/usage").status_code == 401
    samples = metric_samples(server.url + "/metrics")
    assert any(
        name == "servery_usage_rows_total" and labels == {"key": "iris", "model": "iris"}
        for name, labels, _ in samples
    )


def test_keys_file_rotation_without_restart(servers: dict[str, Server]) -> None:
    """The ``fast`` server's keys file is rewritten while it serves (as a Secret update would):
    the new key works and the removed one is refused, without a restart; a broken file keeps the
    keys; the original file is put back at the end for the tests after this one. (The file is
    checked on a request at most every SERVERY_RELOAD_INTERVAL_S, 2 s: the waits below make
    requests until the change shows.)"""
    srv = servers["fast"]
    path = Path(srv.env["SERVERY_API_KEYS_FILE"])
    original = path.read_text()

    def replace(text: str) -> None:  # a whole new file, never a half-written one
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def status(key: str) -> int:
        return httpx.get(srv.url + "/models", headers=bearer(key)).status_code

    try:
        assert status(KEY_IRIS) == 200 and status(KEY_NEW) == 401
        replace(
            f"keys:\n  - name: all\n    key: {KEY_ALL}\n  - name: new\n    key: {KEY_NEW}\n"
            f"    models: [other]\n"
        )
        eventually(lambda: status(KEY_NEW) == 200, "the new key accepted", every=0.1)
        assert status(KEY_IRIS) == 401 and status(KEY_ALL) == 200
        r = httpx.post(
            srv.url + "/predict", json={"model": "iris", "inputs": [ROW]}, headers=bearer(KEY_NEW)
        )
        assert r.status_code == 403  # the new entry's allowed models apply too
        client = tg.InferenceServerClient(url=srv.grpc_url)  # gRPC shares the keyring
        assert client.is_model_ready("other", headers={"authorization": f"Bearer {KEY_NEW}"})
        client.close()

        replace("keys: [\n  - name: broken")  # a bad edit: the keys stay as they were

        def broken_file_read() -> bool:
            status(KEY_ALL)  # a request, on which the keys file is checked when it is due
            metrics = httpx.get(srv.url + "/metrics").text
            log = srv.log.read_text(errors="replace")
            return (
                'servery_api_keys_reloads_total{outcome="error"} 1.0' in metrics
                and "API keys not reloaded, still using the previous 2" in log
            )

        eventually(broken_file_read, "the broken keys file read and reported", every=0.1)
        assert status(KEY_NEW) == 200 and status(KEY_ALL) == 200 and status(KEY_IRIS) == 401
        log = srv.log.read_text(errors="replace")
        assert KEY_NEW not in log and KEY_ALL not in log
    finally:
        replace(original)
        eventually(lambda: status(KEY_IRIS) == 200, "the original keys back", every=0.1)
    assert status(KEY_NEW) == 401


# --- /v1/: the gate in front of the real LLM proxy, with a stand-in for the LLM service ---------

seen_upstream: list[tuple[dict[str, str], bytes]] = []


async def _completions(request: Request) -> StreamingResponse:
    body = await request.body()
    seen_upstream.append((dict(request.headers), body))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def _models(request: Request) -> JSONResponse:
    cards = [{"id": m, "object": "model", "owned_by": "servery"} for m in ("tiny", "big", "chat")]
    cards[2]["parent"] = "big"  # a task name that points at a model, as the LLM service lists
    return JSONResponse({"object": "list", "data": cards})


@pytest.fixture(scope="module")
def llm_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The router's /v1/ as the fast path serves it (FastPath + gate + StreamingProxy) in front
    of a Starlette stand-in for the LLM service on a Unix socket; returns the front's URL."""
    work = tmp_path_factory.mktemp("llm-auth")
    path = work / "keys.yaml"
    path.write_text(
        f"keys:\n  - name: tiny\n    key: {KEY_IRIS}\n    models: [tiny]\n"
        "    tokens_per_minute: 100\n"
        f"  - name: all\n    key: {KEY_ALL}\n"
    )
    settings = Settings(_env_file=None, api_keys_file=path, router_workers=1)  # type: ignore[call-arg]
    gate = http_gate(auth.keyring(settings), settings)
    sock = work / "llm.sock"
    upstream = Background(
        Starlette(
            routes=[
                Route("/v1/chat/completions", _completions, methods=["POST"]),
                Route("/v1/models", _models),
            ]
        ),
        uds=str(sock),
    )
    proxy = StreamingProxy(lambda: f"unix://{sock}", connect_timeout_s=5, read_timeout_s=5)
    port = free_port()
    front = FastPath(
        Starlette(), None, [], timeout_s=5, access_log=False, mounts=[("/v1/", proxy)], gate=gate
    )
    server = Background(front, host="127.0.0.1", port=port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        upstream.stop()


def test_llm_api_key_model_and_token_limit(llm_front: str) -> None:
    url = llm_front + "/v1/chat/completions"
    body = {"model": "tiny", "max_tokens": 60, "stream": True, "messages": []}
    r = httpx.post(url, json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "AuthenticationError" and not seen_upstream
    r = httpx.post(url, json={**body, "model": "big"}, headers=bearer(KEY_IRIS))
    assert r.status_code == 403 and r.json()["error"]["type"] == "PermissionDeniedError"
    r = httpx.post(url, json=body, headers=bearer(KEY_IRIS))
    assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    ((headers, sent),) = seen_upstream  # the body as the client sent it, the key stays here
    assert json.loads(sent) == body and "authorization" not in headers
    charged = 60 + math.ceil(len(sent) / 4)  # max_tokens + the prompt estimate (bytes / 4)
    assert r.headers["x-ratelimit-limit-tokens"] == "100"
    assert r.headers["x-ratelimit-remaining-tokens"] == str(100 - charged)
    r = httpx.post(url, json=body, headers=bearer(KEY_IRIS))  # 100 - charged left
    assert r.status_code == 429
    assert r.headers["retry-after"] == str(math.ceil((2 * charged - 100) * 60 / 100))
    assert r.json()["error"]["type"] == "RateLimitError" and len(seen_upstream) == 1
    assert "x-ratelimit-reset-tokens" in r.headers


def test_llm_model_list_shows_a_restricted_key_only_its_models(llm_front: str) -> None:
    url = llm_front + "/v1/models"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers=bearer(KEY_IRIS))
    assert r.status_code == 200 and r.headers["content-length"] == str(len(r.content))
    assert r.json()["object"] == "list"
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]
    every = httpx.get(url, headers=bearer(KEY_ALL)).json()
    assert [m["id"] for m in every["data"]] == ["tiny", "big", "chat"]
    # no spelling of the path skips the filter: only the canonical one is served at all
    import http.client

    for target in ("/v1/models%3F", "/v1/../v1/models", "/v1//models", "/v1/models/"):
        conn = http.client.HTTPConnection(llm_front.removeprefix("http://"), timeout=10)
        conn.request("GET", target, headers=bearer(KEY_IRIS))
        answer = conn.getresponse()
        assert answer.status == 404 and b"big" not in answer.read(), target
        conn.close()

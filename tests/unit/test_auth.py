"""services/gateway/auth.py and services/gateway/gate.py: key parsing and hashing, lookup, token
buckets, and the
HTTP gate in FastPath (both with the fast path's routes and with none, as when
SERVERY_FAST_PATH=false), including the OpenAI API under /v1/ with a stand-in for the LLM proxy."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from models.config import ConfigError, Settings
from services.gateway import auth
from services.gateway.auth import ApiKey, TokenBucket, digest_of, keyring
from services.gateway.fastpath import FastPath, Route
from services.gateway.gate import http_gate
from services.llm.openai_api import RATE_HEADERS
from services.protocols.errors import error_response, json_response
from services.protocols.oip.grpc import status_of, trailers
from services.protocols.state import SCOPE_KEY
from services.runtime.errors import Forbidden, RateLimited, Unauthenticated
from tests.conftest import Sent

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
KEY_C = "key-c-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _no_servery_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys and limits from the caller's shell must not reach these settings."""
    for name in list(os.environ):
        if name.upper().startswith("SERVERY_"):
            monkeypatch.delenv(name)


def settings(**kw: Any) -> Settings:
    kw.setdefault("router_workers", 1)
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


# --- keys: parsing, hashing, lookup --------------------------------------------------------------


def test_digest_of_plaintext_and_sha256_entries() -> None:
    assert digest_of(KEY_A) == hashlib.sha256(KEY_A.encode()).digest()
    assert digest_of(sha(KEY_A)) == digest_of(KEY_A)
    assert digest_of(sha(KEY_A).upper().replace("SHA256:", "sha256:")) == digest_of(KEY_A)


@pytest.mark.parametrize(
    "entry", ["short", "has space 0123456789", "a,b-0123456789abcd", "sha256:zz"]
)
def test_malformed_keys_are_refused_without_echoing_them(entry: str) -> None:
    with pytest.raises(ValueError) as e:
        digest_of(entry)
    assert entry not in str(e.value)


def test_env_keys_are_named_in_order_and_empty_means_off() -> None:
    specs = auth.parse_env_keys(f" {KEY_A} ,, {sha(KEY_B)},")
    assert [(s.name, s.key) for s in specs] == [("env-1", KEY_A), ("env-2", sha(KEY_B))]
    assert keyring(settings(api_keys="")) is None
    assert keyring(settings(api_keys=" , ")) is None
    assert keyring(settings()) is None
    with pytest.raises(ConfigError, match="SERVERY_API_KEYS") as e:
        keyring(settings(api_keys=f"{KEY_A},tooshort"))
    assert "tooshort" not in str(e.value)


def test_keys_file_yaml_and_json(tmp_path: Path) -> None:
    yml = tmp_path / "keys.yaml"
    yml.write_text(
        f"keys:\n  - name: a\n    key: {KEY_A}\n    models: [iris]\n"
        f"    requests_per_minute: 120\n    tokens_per_minute: 600\n"
        f"  - name: b\n    key: {sha(KEY_B)}\n"
    )
    js = tmp_path / "keys.json"
    js.write_text(json.dumps({"keys": [{"name": "c", "key": KEY_C}]}))
    ring = keyring(settings(api_keys_file=yml, api_keys=KEY_C))
    assert ring is not None and len(ring) == 3
    a = ring.authenticate(f"Bearer {KEY_A}")
    assert a.name == "a" and a.models == frozenset({"iris"})
    assert a.requests is not None and a.requests.capacity == 120
    assert a.tokens is not None and a.tokens.capacity == 600
    b = ring.authenticate(f"Bearer {KEY_B}")  # a sha256 entry matches its plaintext key
    assert b.name == "b" and b.models is None and b.requests is None and b.tokens is None
    assert ring.authenticate(f"Bearer {KEY_C}").name == "env-1"
    assert [s.name for s in auth.parse_keys_file(js)] == ["c"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys: []\n", "keys"),
        (f"keys:\n  - name: a\n    key: {KEY_A}\n    extra: 1\n", "extra"),
        (f"keys:\n  - name: 'bad name'\n    key: {KEY_A}\n", "name"),
        ("keys:\n  - name: a\n    key: secret-short\n", "16+"),
        ("keys: [\n  name: secret-value-in-a-broken-file", "not valid YAML"),
    ],
)
def test_invalid_keys_files_fail_without_echoing_keys(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        auth.parse_keys_file(path)
    assert KEY_A not in str(e.value) and "secret-" not in str(e.value)


def test_missing_keys_file_fails_and_duplicates_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        keyring(settings(api_keys_file=tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="the same"):
        keyring(settings(api_keys=f"{KEY_A},{sha(KEY_A)}"))
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - name: env-1\n    key: {KEY_B}\n")
    with pytest.raises(ConfigError, match="unique"):
        keyring(settings(api_keys_file=path, api_keys=KEY_A))


def test_authenticate_compares_digests_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = keyring(settings(api_keys=f"{KEY_A},{KEY_B}"))
    assert ring is not None
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    assert ring.authenticate(f"Bearer {KEY_B}").name == "env-2"
    assert ring.authenticate(f"bearer  {KEY_A} ").name == "env-1"  # scheme is case-insensitive
    assert calls == [(digest_of(KEY_B), digest_of(KEY_B)), (digest_of(KEY_A), digest_of(KEY_A))]
    # only digests are kept, never the keys
    assert all(KEY_A not in repr(k) for k in ring._by_digest.values())


@pytest.mark.parametrize(
    ("header", "challenge"),
    [
        (None, "Bearer"),
        ("", "Bearer"),
        (f"Bearer {KEY_C}", 'Bearer error="invalid_token"'),
        (f"Basic {KEY_A}", 'Bearer error="invalid_token"'),
        ("Bearer", 'Bearer error="invalid_token"'),
        (KEY_A, 'Bearer error="invalid_token"'),
    ],
)
def test_missing_or_unknown_keys_are_401_with_a_bearer_challenge(
    header: str | None, challenge: str
) -> None:
    ring = keyring(settings(api_keys=KEY_A))
    assert ring is not None
    with pytest.raises(Unauthenticated) as e:
        ring.authenticate(header)
    assert e.value.status_code == 401 and e.value.headers() == {"WWW-Authenticate": challenge}


# --- token buckets and limits --------------------------------------------------------------------


def test_token_bucket_bursts_a_minute_then_refills_continuously() -> None:
    clock = Clock()
    bucket = TokenBucket(60, clock)  # 1 a second, burst 60
    for _ in range(60):
        assert bucket.wait_s(1) == 0
        bucket.take(1)
    assert bucket.wait_s(1) == pytest.approx(1.0)
    clock.now += 0.25
    assert bucket.wait_s(1) == pytest.approx(0.75)
    clock.now += 0.75
    assert bucket.wait_s(1) == 0
    clock.now += 3600  # never more than one minute's worth
    assert bucket.wait_s(1) == 0 and bucket.tokens == 60
    assert bucket.wait_s(61) == math.inf  # more than the bucket can ever hold


def test_small_rates_still_admit_one_request() -> None:
    clock = Clock()
    bucket = TokenBucket(0.5, clock)  # e.g. 1 a minute over 2 workers
    assert bucket.capacity == 1 and bucket.wait_s(1) == 0
    bucket.take(1)
    assert bucket.wait_s(1) == pytest.approx(120)


def test_limits_are_divided_over_router_workers() -> None:
    s = settings(
        api_keys=KEY_A,
        router_workers=4,
        rate_limit_requests_per_minute=120,
        rate_limit_tokens_per_minute=4000,
    )
    ring = keyring(s, clock=Clock())
    assert ring is not None
    key = ring.authenticate(f"Bearer {KEY_A}")
    assert key.requests is not None and key.requests.capacity == 30
    assert key.requests.rate == pytest.approx(0.5)
    assert key.tokens is not None and key.tokens.capacity == 1000


def test_admit_raises_429_with_retry_after_and_refusals_cost_nothing() -> None:
    clock = Clock()
    key = ApiKey("k", b"", requests=TokenBucket(2, clock), tokens=TokenBucket(100, clock))
    key.admit(60)
    with pytest.raises(RateLimited) as e:  # tokens: 40 left, 60 wanted, 100 a minute
        key.admit(60)
    assert e.value.status_code == 429 and e.value.headers() == {"Retry-After": "12"}
    assert key.requests.tokens == 1 and key.tokens.tokens == 40  # the refusal took nothing
    key.admit(40)
    with pytest.raises(RateLimited) as e:  # requests: 2 a minute, both used
        key.admit()
    assert e.value.retry_after_s == 30
    clock.now += 30
    key.admit()
    with pytest.raises(RateLimited) as e:  # alone over the token budget: retrying never helps
        clock.now += 600
        key.admit(101)
    assert e.value.retry_after_s is None and e.value.headers() == {}
    assert "max_tokens" in e.value.message


def test_allowed_models() -> None:
    key = ApiKey("k", b"", models=frozenset({"iris"}))
    key.check_model("iris")
    for model in ("digits", None):
        with pytest.raises(Forbidden):
            key.check_model(model)
    ApiKey("all", b"").check_model("anything")


def test_grpc_status_and_trailers() -> None:
    assert status_of(Unauthenticated("x"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(Forbidden("x"))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(RateLimited("x", 3)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "x")
    assert trailers(RateLimited("x", 3)) == (("retry-after", "3"),)
    assert trailers(RateLimited("x", None)) == () == trailers(Forbidden("x"))


# --- the HTTP gate in FastPath -------------------------------------------------------------------


def scope(method: str, path: str, key: str | None = None) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    return {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""}


class Recorder:
    """An ASGI app (BentoML's app, a route handler or the LLM proxy): records scope and body."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, bytes, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        key = scope.get(SCOPE_KEY)
        self.calls.append((scope["path"], message.get("body", b""), key))
        # what the LLM proxy adds to its answer
        await json_response({"by": self.name}, headers=dict_of(scope.get(RATE_HEADERS, [])))(
            scope, receive, send
        )


def dict_of(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in headers}


def gated(tmp_path: Path, *, fast: bool = True, admin_token: str | None = None):
    """A FastPath over stand-ins, with the gate as the router builds it; ``fast=False`` is the
    wrapper installed when the fast path is off (no routes, no mounts)."""
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - name: all\n    key: {KEY_A}\n"
        f"  - name: iris\n    key: {KEY_B}\n    models: [iris, tiny]\n"
        f"  - name: limited\n    key: {KEY_C}\n    requests_per_minute: 2\n"
        "    tokens_per_minute: 100\n"
    )
    s = settings(api_keys_file=path, admin_token=admin_token, rate_limit_default_max_tokens=64)
    gate = http_gate(keyring(s, clock=Clock()), s)
    inner, handler, llm = Recorder("bentoml"), Recorder("handler"), Recorder("llm")

    async def handle(request: Any, match: Any) -> Any:
        body = await request.body()
        handler.calls.append((request.scope["path"], body, request.scope.get(SCOPE_KEY)))
        return json_response({"by": "handler"})

    routes = [Route("/predict", r"^/predict$", handle, error_response)] if fast else []
    mounts = [("/v1/", llm)] if fast else []
    app = FastPath(inner, object(), routes, timeout_s=5, access_log=False, mounts=mounts, gate=gate)
    return app, inner, handler, llm


def call(app: FastPath, sc: dict[str, Any], body: bytes = b"{}") -> Sent:
    sent = Sent()
    chunks = [body[:3], body[3:]]  # the gate must read a body sent in pieces

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    asyncio.run(app(sc, receive, sent))
    return sent


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    "path", ["/livez", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"]
)
def test_probes_and_metrics_need_no_key(tmp_path: Path, fast: bool, path: str) -> None:
    app, inner, *_ = gated(tmp_path, fast=fast)
    assert call(app, scope("GET", path)).status == 200
    assert inner.calls[0][0] == path


@pytest.mark.parametrize("path", ["/console", "/console/", "/console/static/app.js"])
def test_the_console_page_and_assets_need_no_key(tmp_path: Path, path: str) -> None:
    """A browser cannot put a key on <script src>: the page and its files are open (no data)."""
    app, inner, *_ = gated(tmp_path)
    assert call(app, scope("GET", path)).status == 200 and inner.calls[0][0] == path


@pytest.mark.parametrize("path", ["/consoles", "/console-x/app.js", "/consolex"])
def test_only_the_console_itself_is_open(tmp_path: Path, path: str) -> None:
    app, inner, *_ = gated(tmp_path)
    assert call(app, scope("GET", path)).status == 401 and inner.calls == []


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    ("method", "path", "envelope"),
    [
        ("POST", "/predict", "platform"),
        ("GET", "/models", "platform"),
        ("GET", "/models/iris", "platform"),
        ("GET", "/docs.json", "platform"),
        ("POST", "/admin/reload", "platform"),
        ("GET", "/v2", "oip"),
        ("GET", "/v2/models/iris/ready", "oip"),
        ("POST", "/v2/models/iris/infer", "oip"),
        ("GET", "/v1/models", "openai"),
        ("POST", "/v1/chat/completions", "openai"),
    ],
)
def test_everything_else_needs_a_key_in_its_apis_envelope(
    tmp_path: Path, fast: bool, method: str, path: str, envelope: str
) -> None:
    app, inner, handler, llm = gated(tmp_path, fast=fast)
    for key, challenge in ((None, "Bearer"), (KEY_A[:-1], 'Bearer error="invalid_token"')):
        sent = call(app, scope(method, path, key))
        assert sent.status == 401 and sent.headers["www-authenticate"] == challenge
        error = sent.body["error"]
        if envelope == "oip":
            assert isinstance(error, str) and "key" in error
        elif envelope == "openai":
            assert error["type"] == "AuthenticationError" and error["code"] == 401
            assert set(error) == {"message", "type", "param", "code"}
        else:
            assert error["type"] == "unauthenticated" and "key" in error["message"]
    assert inner.calls == handler.calls == llm.calls == []
    sent = call(app, scope(method, path, KEY_A), b'{"model": "x"}')
    assert sent.status == 200
    (reached,) = inner.calls + handler.calls + llm.calls
    assert reached[0] == path and reached[2].name == "all"  # the key rides in the scope


ADMIN_TOKEN = "admin-token-0123456789"


def test_admin_needs_the_admin_token_or_an_unrestricted_key(tmp_path: Path) -> None:
    app, inner, *_ = gated(tmp_path, admin_token=ADMIN_TOKEN)
    assert call(app, scope("POST", "/admin/reload", ADMIN_TOKEN)).status == 200
    assert call(app, scope("POST", "/admin/reload", KEY_A)).status == 200
    sent = call(app, scope("POST", "/admin/reload", KEY_B))  # limited to some models
    assert sent.status == 403 and "every model" in sent.body["error"]["message"]
    assert call(app, scope("POST", "/admin/reload")).status == 401
    assert [c[0] for c in inner.calls] == ["/admin/reload"] * 2
    assert call(app, scope("POST", "/models")).status == 401  # the token opens /admin/ only


def admin_scope(key: str | None, client: str, content_type: bytes | None = None) -> dict:
    sc = scope("POST", "/admin/reload", key)
    sc["headers"] = [h for h in sc["headers"] if h[0] != b"content-type"]
    if content_type is not None:
        sc["headers"].append((b"content-type", content_type))
    sc["client"] = (client, 5000)
    return sc


def test_wrong_admin_tokens_are_limited_per_address(tmp_path: Path) -> None:
    """10 failures a minute per client address; then 429 without looking at the token, even a
    right one (else guessing goes on); another address is not affected."""
    app, *_ = gated(tmp_path, admin_token=ADMIN_TOKEN)
    for i in range(10):
        assert call(app, admin_scope(f"wrong-token-{i:08d}", "10.0.0.1")).status == 401
    sent = call(app, admin_scope(ADMIN_TOKEN, "10.0.0.1"))
    assert sent.status == 429 and int(sent.headers["retry-after"]) >= 1
    assert call(app, admin_scope(ADMIN_TOKEN, "10.0.0.2")).status == 200


def test_admin_guard_alone(tmp_path: Path) -> None:
    """Keys off, a token set: only the token; the failure budget refills with time."""
    clock = Clock()
    guard = auth.AdminGuard(ADMIN_TOKEN, None, failures_per_minute=2, clock=clock)
    assert guard.check(f"Bearer {ADMIN_TOKEN}", "a", "POST", None) is None
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            guard.check("Bearer nope", "a", "POST", None)
    with pytest.raises(RateLimited):
        guard.check(f"Bearer {ADMIN_TOKEN}", "a", "POST", None)
    clock.now += 30  # one failure's worth back
    assert guard.check(f"Bearer {ADMIN_TOKEN}", "a", "POST", None) is None
    small = auth.AdminGuard(ADMIN_TOKEN, None, failures_per_minute=1, max_addresses=2)
    for client in ("x", "y", "z"):  # the oldest address is forgotten, memory stays bounded
        with pytest.raises(Unauthenticated):
            small.check(None, client, "POST", None)
    assert list(small._failures) == ["y", "z"]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (b"application/json", 200),
        (b"Application/JSON; charset=utf-8", 200),
        (b"application/x-www-form-urlencoded", 415),
        (b"text/plain", 415),
        (None, 415),
    ],
)
def test_open_admin_takes_only_json_posts(content_type: bytes | None, status: int) -> None:
    """Neither keys nor a token: a cross-site form (urlencoded, multipart, text/plain: no CORS
    preflight) cannot reach /admin/."""
    s = settings()
    inner = Recorder("bentoml")
    app = FastPath(inner, object(), [], timeout_s=5, access_log=False, gate=http_gate(None, s))
    sent = call(app, admin_scope(None, "127.0.0.1", content_type))
    assert sent.status == status
    assert len(inner.calls) == (status == 200)
    assert call(app, scope("GET", "/models")).status == 200  # keys off: nothing else checked


@pytest.mark.parametrize("fast", [True, False])
def test_models_in_the_path_are_checked_against_the_key(tmp_path: Path, fast: bool) -> None:
    app, *_ = gated(tmp_path, fast=fast)
    for path in ("/v2/models/iris/infer", "/v2/models/iris/versions/1/ready", "/models/iris"):
        assert call(app, scope("GET", path, KEY_B)).status == 200
    sent = call(app, scope("POST", "/v2/models/digits/infer", KEY_B))
    assert sent.status == 403 and "digits" in sent.body["error"]
    sent = call(app, scope("GET", "/models/digits", KEY_B))
    assert sent.status == 403 and sent.body["error"]["type"] == "forbidden"
    assert call(app, scope("GET", "/models", KEY_B)).status == 200  # the listing is not filtered


def test_predict_body_model_is_left_to_the_handler(tmp_path: Path) -> None:
    app, _, handler, _ = gated(tmp_path)
    sent = call(app, scope("POST", "/predict", KEY_B), b'{"model": "digits"}')
    assert sent.status == 200  # router.predict refuses it after parsing the body
    assert handler.calls[0][2].models == frozenset({"iris", "tiny"})


def test_llm_requests_are_forwarded_with_their_body_intact(tmp_path: Path) -> None:
    app, _, _, llm = gated(tmp_path)
    body = json.dumps({"model": "tiny", "max_tokens": 5, "messages": []}).encode()
    assert call(app, scope("POST", "/v1/chat/completions", KEY_B), body).status == 200
    assert llm.calls[0][:2] == ("/v1/chat/completions", body)
    assert call(app, scope("GET", "/v1/models", KEY_B)).status == 200


def test_llm_model_not_allowed_is_403_in_the_openai_envelope(tmp_path: Path) -> None:
    app, _, _, llm = gated(tmp_path)
    for body in (b'{"model": "big", "max_tokens": 5}', b'{"max_tokens": 5}'):
        sent = call(app, scope("POST", "/v1/chat/completions", KEY_B), body)
        assert sent.status == 403
        assert sent.body["error"]["type"] == "PermissionDeniedError"
        assert sent.body["error"]["code"] == 403
    for body in (b"[1]", b"[" * 100_000 + b"]" * 100_000, b'{"model": "tiny", "n": 1.5}'):
        sent = call(app, scope("POST", "/v1/chat/completions", KEY_B), body)
        assert sent.status == 400 and sent.body["error"]["type"] == "BadRequestError"
    assert llm.calls == []


def test_llm_token_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    app, _, _, llm = gated(tmp_path)  # "limited": 100 tokens a minute, 2 requests a minute
    # charged 40 + the prompt: 32 body bytes / 4 = 8
    ok = call(app, scope("POST", "/v1/completions", KEY_C), b'{"model": "x", "max_tokens": 40}')
    assert ok.status == 200
    assert ok.headers["x-ratelimit-remaining-tokens"] == "52"
    assert ok.headers["x-ratelimit-limit-tokens"] == "100"
    assert ok.headers["x-ratelimit-reset-tokens"] == "28.8s"  # 48 tokens at 100/min
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    chat = b'{"model": "x"}'  # a chat without max_tokens: 64 by default, + 4 for the prompt
    sent = call(app, scope("POST", "/v1/chat/completions", KEY_C), chat)
    assert sent.status == 429 and sent.headers["retry-after"] == "10"  # 16 tokens at 100/min
    assert sent.body["error"]["type"] == "RateLimitError" and sent.body["error"]["code"] == 429
    assert sent.headers["x-ratelimit-remaining-tokens"] == "52"
    sent = call(app, scope("POST", "/v1/completions", KEY_C), b'{"max_tokens": 500}')
    assert sent.status == 429 and "retry-after" not in sent.headers
    assert len(llm.calls) == 1


@pytest.mark.parametrize("fast", [True, False])
def test_request_limit_is_429_with_retry_after(tmp_path: Path, fast: bool) -> None:
    app, *_ = gated(tmp_path, fast=fast)  # "limited": 2 requests a minute
    assert call(app, scope("GET", "/models", KEY_C)).status == 200
    assert call(app, scope("POST", "/v2/models/iris/infer", KEY_C)).status == 200
    sent = call(app, scope("POST", "/v2/models/iris/infer", KEY_C))
    assert sent.status == 429 and sent.headers["retry-after"] == "30"
    assert "rate limit" in sent.body["error"]
    sent = call(app, scope("GET", "/models", KEY_C))
    assert sent.status == 429 and sent.body["error"]["type"] == "rate_limited"
    assert call(app, scope("GET", "/models", KEY_A)).status == 200  # other keys are unaffected


def test_no_gate_no_checks() -> None:
    inner = Recorder("bentoml")
    app = FastPath(inner, object(), [], timeout_s=5, access_log=False)
    assert call(app, scope("GET", "/models")).status == 200
    assert inner.calls[0][2] is None


# --- key rotation: the keys file is re-read when it changes -------------------------------------


def write_keys(path: Path, *entries: str) -> Path:
    """A keys file of ``name|key[|requests_per_minute]`` entries (written whole, like a Secret)."""
    text = "keys:\n"
    for entry in entries:
        name, key, *rpm = entry.split("|")
        text += f"  - name: {name}\n    key: {key}\n"
        if rpm:
            text += f"    requests_per_minute: {rpm[0]}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def rotating(tmp_path: Path, *entries: str, **kw: Any) -> tuple[auth.Keyring, Clock, Path]:
    path = write_keys(tmp_path / "keys.yaml", *entries)
    clock = Clock()
    ring = keyring(settings(api_keys_file=path, reload_interval_s=2, **kw), clock=clock)
    assert ring is not None
    return ring, clock, path


def accepts(ring: auth.Keyring, key: str) -> bool:
    try:
        ring.authenticate(f"Bearer {key}")
    except Unauthenticated:
        return False
    return True


def test_rotated_keys_apply_after_the_interval_and_staying_keys_keep_their_buckets(
    tmp_path: Path,
) -> None:
    ring, clock, path = rotating(tmp_path, f"a|{KEY_A}|60", f"b|{KEY_B}", api_keys=KEY_C)
    a = ring.authenticate(f"Bearer {KEY_A}")
    for _ in range(50):
        a.admit()
    write_keys(path, f"a|{KEY_A}|60", f"c|{sha(KEY_B[::-1])}")  # b rotated to a new key
    clock.now += 1.9  # within the interval the file is not even looked at
    assert accepts(ring, KEY_B) and not accepts(ring, KEY_B[::-1])
    clock.now += 0.2
    assert not accepts(ring, KEY_B) and accepts(ring, KEY_B[::-1])
    assert ring.names() == ["a", "c", "env-1"]  # keys from SERVERY_API_KEYS stay
    a2 = ring.authenticate(f"Bearer {KEY_A}")
    assert a2 is not a and a2.requests is a.requests  # the same bucket: 10 + 2.1 s of refill
    assert a2.requests is not None and a2.requests.wait_s(1) == 0
    assert a2.requests.tokens == pytest.approx(12.1)


def test_a_changed_limit_gets_a_new_bucket_holding_no_more_than_the_old(tmp_path: Path) -> None:
    ring, clock, path = rotating(tmp_path, f"a|{KEY_A}|60")
    a = ring.authenticate(f"Bearer {KEY_A}")
    for _ in range(60):
        a.admit()
    write_keys(path, f"a|{KEY_A}|600")
    clock.now += 2
    a2 = ring.authenticate(f"Bearer {KEY_A}")
    assert a2.requests is not None and a2.requests.capacity == 600
    assert a2.requests.tokens == pytest.approx(2)  # what the old bucket refilled, not 600


@pytest.mark.parametrize(
    "broken",
    [
        "keys: []\n",
        "keys: [\n  name: secret-value-in-a-broken-file",
        "keys:\n  - name: a\n    key: secret-short\n",
        f"keys:\n  - name: a\n    key: {KEY_A}\n  - name: b\n    key: {sha(KEY_A)}\n",
        f"keys:\n  - name: env-1\n    key: {KEY_B}\n",  # clashes with SERVERY_API_KEYS' name
        b"\xff\xfe binary",
        None,  # deleted
    ],
)
def test_a_broken_keys_file_keeps_the_previous_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str | bytes | None
) -> None:
    ring, clock, path = rotating(tmp_path, f"a|{KEY_A}", api_keys=KEY_C)
    errors = auth.RELOADS.labels("error")._value.get()
    if broken is None:
        path.unlink()
    elif isinstance(broken, bytes):
        path.write_bytes(broken)
    else:
        path.write_text(broken)
    clock.now += 2
    with caplog.at_level("ERROR", logger="servery"):
        assert accepts(ring, KEY_A) and accepts(ring, KEY_C)
        assert not accepts(ring, KEY_B)
    assert auth.RELOADS.labels("error")._value.get() == errors + 1
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "still using the previous 2" in record.getMessage()
    assert KEY_A not in record.getMessage() and "secret-" not in record.getMessage()
    clock.now += 2  # reported once, not at every check
    with caplog.at_level("ERROR", logger="servery"):
        assert accepts(ring, KEY_A)
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1
    write_keys(path, f"b|{KEY_B}")  # fixed: applies at the next check
    clock.now += 2
    assert accepts(ring, KEY_B) and not accepts(ring, KEY_A) and accepts(ring, KEY_C)


def test_a_secret_volume_symlink_swap_is_seen(tmp_path: Path) -> None:
    """Kubernetes updates a Secret volume by pointing ``..data`` at a new timestamped folder;
    the file name is a symlink through it. Same size and mtime: the resolved path changes."""
    first, second = tmp_path / "..2026_01", tmp_path / "..2026_02"
    for folder, key in ((first, KEY_A), (second, KEY_B)):
        folder.mkdir()
        write_keys(folder / "keys.yaml", f"k|{key}")
        os.utime(folder / "keys.yaml", ns=(10**18, 10**18))
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "keys.yaml").symlink_to("..data/keys.yaml")
    clock = Clock()
    s = settings(api_keys_file=tmp_path / "keys.yaml", reload_interval_s=2)
    ring = keyring(s, clock=clock)
    assert ring is not None and accepts(ring, KEY_A)
    (tmp_path / "..data_tmp").symlink_to(second.name)
    (tmp_path / "..data_tmp").replace(tmp_path / "..data")  # atomic, as the kubelet does
    clock.now += 2
    assert accepts(ring, KEY_B) and not accepts(ring, KEY_A)


def test_without_a_keys_file_nothing_is_watched() -> None:
    clock = Clock()
    ring = keyring(settings(api_keys=KEY_A), clock=clock)
    assert ring is not None and not ring.refresh()
    clock.now += 3600
    assert accepts(ring, KEY_A)

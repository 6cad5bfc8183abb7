"""API keys restricted to models, and LoRA adapters named ``NAME@ALIAS`` / ``NAME@VERSION``
(docs/llm.md, "LoRA adapters"): a key listing ``NAME`` covers every reference to it; a key
listing ``NAME@REF`` only that reference. Checked on ``ApiKey`` and through the router's HTTP
gate (FastPath) on ``/v1``, and on the ``/v1/models`` listing the proxy filters."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from models.config import Settings
from services.gateway.auth import ApiKey, keyring
from services.gateway.fastpath import FastPath
from services.gateway.gate import http_gate
from services.llm.proxy import _only_models
from services.protocols.errors import json_response
from services.runtime.errors import Forbidden
from tests.conftest import Sent

KEY_STYLE = "key-style-0123456789abcdef"
KEY_PROD = "key-prod-0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_servery_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SERVERY_"):
            monkeypatch.delenv(name)


def test_a_name_covers_its_aliases_and_versions() -> None:
    key = ApiKey("k", b"", models=frozenset({"tiny", "support-style"}))
    for model in ("support-style", "support-style@production", "support-style@3f2a", "tiny"):
        assert key.allows(model), model
        key.check_model(model)
    # another model, a prefix, an adapter of a listed base, no model at all
    for model in ("other@production", "support", "support-style-2@x", "tiny-lora", None, "@x"):
        assert not key.allows(model), model
        with pytest.raises(Forbidden):
            key.check_model(model)


def test_a_reference_covers_only_itself() -> None:
    key = ApiKey("k", b"", models=frozenset({"support-style@production"}))
    assert key.allows("support-style@production")
    for model in ("support-style", "support-style@staging", "support-style@production@x"):
        assert not key.allows(model), model


class Upstream:
    """The LLM proxy's place in FastPath: answers what it was sent."""

    def __init__(self) -> None:
        self.models: list[Any] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        self.models.append(json.loads(message.get("body") or b"{}").get("model"))
        await json_response({"ok": True})(scope, receive, send)


def call(app: Any, key: str, body: dict[str, Any]) -> Sent:
    sent = Sent()
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]
    sc = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
          "headers": headers, "query_string": b""}  # fmt: skip
    data = [json.dumps(body).encode()]

    async def receive() -> dict[str, Any]:
        if data:
            return {"type": "http.request", "body": data.pop(), "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    asyncio.run(app(sc, receive, sent))
    return sent


def test_the_gate_lets_a_key_use_the_aliases_of_its_adapters(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - name: style\n    key: {KEY_STYLE}\n    models: [tiny, support-style]\n"
        f"  - name: prod\n    key: {KEY_PROD}\n    models: ['support-style@production']\n"
    )
    s = Settings(_env_file=None, api_keys_file=path, router_workers=1)  # type: ignore[call-arg]
    upstream = Upstream()
    app = FastPath(
        upstream, object(), [], timeout_s=5, access_log=False,
        mounts=[("/v1/", upstream)], gate=http_gate(keyring(s), s),
    )  # fmt: skip

    def status(key: str, model: str) -> int:
        return call(app, key, {"model": model, "messages": [], "max_tokens": 4}).status

    assert status(KEY_STYLE, "support-style@production") == 200
    assert status(KEY_STYLE, "support-style@latest") == 200
    assert status(KEY_STYLE, "support-style") == 200
    assert status(KEY_STYLE, "other-style@production") == 403
    assert status(KEY_PROD, "support-style@production") == 200
    assert status(KEY_PROD, "support-style") == 403
    assert status(KEY_PROD, "support-style@latest") == 403
    sent = call(app, KEY_PROD, {"model": "tiny", "messages": []})
    assert sent.status == 403 and sent.body["error"]["type"] == "PermissionDeniedError"
    assert upstream.models == [
        "support-style@production", "support-style@latest", "support-style",
        "support-style@production",
    ]  # fmt: skip


def test_v1_models_lists_the_aliases_a_key_covers() -> None:
    listing = {
        "object": "list",
        "data": [{"id": i} for i in ("tiny", "support-style", "support-style@latest", "private")],
    }
    sent = Sent()

    async def run() -> None:
        send = _only_models(sent, ApiKey("k", b"", models=frozenset({"support-style"})).allows)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(listing).encode()})

    asyncio.run(run())
    assert [m["id"] for m in sent.body["data"]] == ["support-style", "support-style@latest"]

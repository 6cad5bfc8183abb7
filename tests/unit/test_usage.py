"""Usage per API key: the tally and its report (services/ops/usage.py), the token reader of
OpenAI answers and the stream request it rewrites (services/llm/usage_tap.py), and predictions
counted by services/runtime/inference.Call."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from services.llm import usage_tap
from services.ops import usage
from services.protocols.state import SCOPE_KEY
from services.runtime.inference import Call


def counts(key: str, model: str) -> dict[str, int]:
    return usage.totals().get((key, model), dict.fromkeys(usage._FIELDS, 0))


def test_tally_outside_a_loop_writes_at_once() -> None:
    before = counts("unit-a", "iris")
    usage.Tally().add("unit-a", "iris", rows=3)
    after = counts("unit-a", "iris")
    assert after["requests"] - before["requests"] == 1
    assert after["rows"] - before["rows"] == 3


def test_tally_in_a_loop_writes_once_per_interval() -> None:
    tally = usage.Tally(interval_s=0.05)
    before = usage.totals().get(("unit-b", "m"))

    async def run() -> tuple[Any, Any]:
        for _ in range(5):
            tally.add("unit-b", "m", rows=2, prompt_tokens=7, completion_tokens=1)
        pending = usage.totals().get(("unit-b", "m"))  # flushes the module's, not this tally
        await asyncio.sleep(0.2)
        return pending, usage.totals()[("unit-b", "m")]

    pending, after = asyncio.run(run())
    assert pending == before  # nothing written before the timer
    assert after == {"requests": 5, "rows": 10, "prompt_tokens": 35, "completion_tokens": 5}


def test_distinct_models_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage, "MAX_MODELS", 2)
    tally = usage.Tally()
    for model in ("a1", "a2", "a3", "a4"):
        tally.add("unit-c", model)
    assert counts("unit-c", usage.UNKNOWN_MODEL)["requests"] == 2
    assert counts("unit-c", "a2")["requests"] == 1


def test_report_shape_and_key_filter() -> None:
    usage.Tally().add("unit-d", "iris", rows=4)
    usage.Tally().add("unit-e", "smollm2", prompt_tokens=9, completion_tokens=3)
    page = usage.report({"unit-d"}, since=100.0, now=lambda: 200.0)
    assert page["object"] == "page" and page["has_more"] is False
    (bucket,) = page["data"]
    assert (bucket["start_time"], bucket["end_time"]) == (100, 200)
    assert [r["api_key_id"] for r in bucket["results"]] == ["unit-d"]
    assert bucket["results"][0] == {
        "object": "usage.result",
        "api_key_id": "unit-d",
        "model": "iris",
        "num_model_requests": 1,
        "rows": 4,
        "input_tokens": 0,
        "output_tokens": 0,
    }
    everyone = usage.report(None, since=0)["data"][0]["results"]
    assert {"unit-d", "unit-e"} <= {r["api_key_id"] for r in everyone}


def test_a_prediction_counts_only_when_answered() -> None:
    served = SimpleNamespace(
        info=SimpleNamespace(name="unit-model"),
        metrics=SimpleNamespace(answered=lambda status, seconds: None),
    )
    for status in (200, 422, 503, 200):
        call = Call()
        call.key, call.served, call.rows = "unit-f", served, 5
        call.answered(status)
    usage.TALLY.flush()
    assert counts("unit-f", "unit-model") == {
        "requests": 2,
        "rows": 10,
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }


# --- the OpenAI answers ---------------------------------------------------------------------------


def scope_of(path: str, key: str | None = None) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": path}
    scope["raw_path"] = path.encode()
    if key is not None:
        scope[SCOPE_KEY] = SimpleNamespace(name=key)
    return scope


def receiver(body: bytes) -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + (
        b"data: [DONE]\n\n"
    )


async def through(
    path: str, request: dict[str, Any], answer: list[bytes], ctype: bytes, key: str
) -> tuple[dict[str, Any], bytes, int]:
    """Tap a request, play ``answer`` (chunks) through its send; what the service got, what the
    client got and the status."""
    client = bytearray()

    async def send(message: dict[str, Any]) -> None:
        client.extend(message.get("body", b""))

    receive, sending, done = await usage_tap.tap(
        scope_of(path, key), receiver(json.dumps(request).encode()), send, None
    )
    got = json.loads((await receive())["body"])
    await sending(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]}
    )
    for i, chunk in enumerate(answer):
        more = i < len(answer) - 1
        await sending({"type": "http.response.body", "body": chunk, "more_body": more})
    assert done is not None
    done()
    usage.TALLY.flush()
    return got, bytes(client), 200


STREAM = [
    {
        "object": "chat.completion.chunk",
        "model": "smollm2",
        "choices": [{"delta": {"content": "Hi"}}],
    },
    {
        "object": "chat.completion.chunk",
        "model": "smollm2",
        "choices": [{"delta": {"content": "!"}}],
    },
]
USAGE_CHUNK = {
    "object": "chat.completion.chunk",
    "model": "smollm2",
    "choices": [],
    "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
}


def test_a_stream_is_asked_for_usage_and_the_client_gets_the_stream_it_asked_for() -> None:
    request = {"model": "smollm2", "stream": True, "messages": []}
    answer = sse(*STREAM, USAGE_CHUNK)
    # cut in odd places: events arrive across chunks
    pieces = [answer[:7], answer[7:60], answer[60:61], answer[61:]]
    got, client, _ = asyncio.run(
        through("/v1/chat/completions", request, pieces, b"text/event-stream", "unit-g")
    )
    assert got["stream_options"] == {"include_usage": True}
    assert client == sse(*STREAM)  # the usage chunk taken out, every other byte as sent
    assert counts("unit-g", "smollm2") == {
        "requests": 1,
        "rows": 0,
        "prompt_tokens": 11,
        "completion_tokens": 2,
    }


def test_a_client_that_asked_for_usage_keeps_its_chunk() -> None:
    request = {
        "model": "smollm2",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [],
    }
    answer = sse(*STREAM, USAGE_CHUNK)
    got, client, _ = asyncio.run(
        through("/v1/chat/completions", request, [answer], b"text/event-stream", "unit-h")
    )
    assert got == request
    assert client == answer
    assert counts("unit-h", "smollm2")["completion_tokens"] == 2


def test_a_whole_answer_and_embeddings_are_read() -> None:
    whole = {
        "model": "smollm2",
        "choices": [{"message": {"content": '"usage": {"prompt_tokens": 999}'}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    }
    body = json.dumps(whole).encode()
    asyncio.run(
        through(
            "/v1/completions",
            {"model": "smollm2", "prompt": "x"},
            [body[:10], body[10:]],
            b"application/json",
            "unit-i",
        )
    )
    embedded = json.dumps({"data": [], "usage": {"prompt_tokens": 6, "total_tokens": 6}})
    asyncio.run(
        through(
            "/v1/embeddings",
            {"model": "all-minilm-l6-v2", "input": "x"},
            [embedded.encode()],
            b"application/json",
            "unit-i",
        )
    )
    assert counts("unit-i", "smollm2")["prompt_tokens"] == 5
    assert counts("unit-i", "smollm2")["completion_tokens"] == 4
    assert counts("unit-i", "all-minilm-l6-v2")["prompt_tokens"] == 6


def test_errors_and_other_routes_are_not_counted() -> None:
    async def run() -> None:
        _, sending, done = await usage_tap.tap(
            scope_of("/v1/chat/completions", "unit-j"),
            receiver(b'{"model": "nope"}'),
            _drop,
            None,
        )
        await sending({"type": "http.response.start", "status": 404, "headers": []})
        await sending({"type": "http.response.body", "body": b"{}", "more_body": False})
        assert done is not None
        done()
        scope = scope_of("/v1/models", "unit-j")
        scope["method"] = "GET"
        receive = receiver(b"")
        assert await usage_tap.tap(scope, receive, _drop, None) == (receive, _drop, None)
        # not JSON: handed on unchanged, for the service to refuse
        receive, _, done = await usage_tap.tap(
            scope_of("/v1/chat/completions", "unit-j"), receiver(b"{nope"), _drop, None
        )
        assert done is None and (await receive())["body"] == b"{nope"

    asyncio.run(run())
    usage.TALLY.flush()
    assert ("unit-j", "nope") not in usage.totals()


async def _drop(message: dict[str, Any]) -> None:
    pass

"""services/llm/openai_api.py: the /v1 allow-list by raw path, request fields parsed as vLLM 0.32
parses them, what a request is charged, the SERVERY_LLM_MAX_TOKENS_LIMIT cap, and the body
helpers (bounded read, replay, depth-bounded JSON)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.gateway.auth import duration
from services.llm.openai_api import (
    ROUTES,
    cap_tokens,
    generation,
    parse_object,
    read_body,
    replaying,
    route_of,
)
from services.runtime.errors import BadRequest, PayloadTooLarge

CHAT = ROUTES["/v1/chat/completions"]
COMPLETIONS = ROUTES["/v1/completions"]


def http(raw_path: bytes, path: str | None = None) -> dict[str, Any]:
    return {"type": "http", "path": path or raw_path.decode(), "raw_path": raw_path}


@pytest.mark.parametrize(
    ("raw", "decoded", "route"),
    [
        (b"/v1/models", None, "/v1/models"),
        (b"/v1/chat/completions", None, "/v1/chat/completions"),
        (b"/v1/completions", None, "/v1/completions"),
        # each of these decodes to (or a server normalises it to) a listed path, or another one
        (b"/v1/chat/completions%3F", "/v1/chat/completions?", None),
        (b"/v1/models%3F", "/v1/models?", None),
        (b"/v1/../v1/models", None, None),
        (b"/v1/../metrics", None, None),
        (b"/v1/%2E%2E/metrics", "/v1/../metrics", None),
        (b"//v1/models", None, None),
        (b"/v1//models", None, None),
        (b"/v1/models/", None, None),
        (b"/v1%2Fmodels", "/v1/models", None),
        (b"/V1/models", None, None),
        (b"/v1/embedding", None, None),
    ],
)
def test_the_route_is_the_raw_path_exactly(raw: bytes, decoded: str | None, route: str | None):
    found = route_of(http(raw, decoded))
    assert (found.path if found else None) == route


def test_without_raw_path_the_decoded_path_is_looked_up() -> None:
    assert route_of({"path": "/v1/models"}) is ROUTES["/v1/models"]
    assert route_of({"path": "/models", "root_path": "/v1"}) is ROUTES["/v1/models"]


def gen(body: Any, route=CHAT):
    return generation(json.dumps(body).encode(), route)


@pytest.mark.parametrize(
    ("body", "max_tokens", "param"),
    [
        ({"max_tokens": 64}, 64, "max_tokens"),
        ({"max_tokens": 64.0}, 64, "max_tokens"),  # pydantic's lax int, as vLLM's models
        ({"max_tokens": "64"}, 64, "max_tokens"),
        ({"max_tokens": 1e6}, 1_000_000, "max_tokens"),
        ({"max_completion_tokens": 20, "max_tokens": 50}, 20, "max_completion_tokens"),
        # vLLM 0.32: max_completion_tokens wins unless null, even at 0 (then vLLM refuses it)
        ({"max_completion_tokens": None, "max_tokens": 5000}, 5000, "max_tokens"),
        ({"max_completion_tokens": 0, "max_tokens": 5000}, 0, "max_completion_tokens"),
        ({"max_completion_tokens": "7"}, 7, "max_completion_tokens"),
        ({}, None, "max_tokens"),  # the engine's default: the rest of the context
        ({"max_tokens": None}, None, "max_tokens"),
    ],
)
def test_chat_max_tokens_as_vllm_reads_it(body: dict, max_tokens: int | None, param: str):
    g = gen(body)
    assert (g.max_tokens, g.max_tokens_param, g.choices) == (max_tokens, param, 1)


@pytest.mark.parametrize(
    ("body", "max_tokens", "choices"),
    [
        ({}, 16, 1),  # CompletionRequest.max_tokens defaults to 16, also for null
        ({"max_tokens": None, "n": 2}, 16, 2),
        ({"max_tokens": 10, "n": "3"}, 10, 3),
        ({"max_tokens": 10, "n": 3.0, "prompt": ["a", "b"]}, 10, 6),  # every prompt x n
        ({"prompt": [[1, 2], [3]]}, 16, 2),
        ({"prompt": [1, 2, 3]}, 16, 1),  # one prompt of token ids
        ({"prompt": "a"}, 16, 1),
        ({"max_completion_tokens": 999}, 16, 1),  # not a completions field: ignored, as vLLM
    ],
)
def test_completions_fields_and_prompt_lists(body: dict, max_tokens: int, choices: int) -> None:
    g = gen(body, COMPLETIONS)
    assert (g.max_tokens, g.choices) == (max_tokens, choices)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 64.5}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"max_tokens": [1]}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": {}}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"n": "x"}, "n"),
        ({"model": 3}, "model"),
    ],
)
def test_what_vllm_would_not_parse_is_400_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(BadRequest) as e:
        gen(body)
    assert e.value.details["param"] == param and param in e.value.message


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'"x"', "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    ],
)
def test_bodies_that_are_no_request_are_400(raw: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_object(raw)


def test_nesting_within_the_bound_parses() -> None:
    assert parse_object(b'{"a":' + b"[" * 190 + b"]" * 190 + b"}")


def test_the_charge_counts_the_prompt_estimate_and_every_choice() -> None:
    body = json.dumps({"model": "m", "max_tokens": 10, "n": 2, "prompt": ["x" * 100, "y"]})
    g = generation(body.encode(), COMPLETIONS)
    assert g.model == "m" and g.prompt_tokens == -(-len(body) // 4)
    assert g.charge(1024) == g.prompt_tokens + 4 * 10
    chat = gen({"messages": []})
    assert chat.charge(300) == chat.prompt_tokens + 300  # no max_tokens: the default


@pytest.mark.parametrize(
    ("body", "route", "context", "changed"),
    [
        ({"max_tokens": 256}, CHAT, 8192, None),
        ({"max_tokens": 128, "n": 2}, CHAT, 8192, None),
        ({}, COMPLETIONS, 8192, None),  # 16
        ({}, CHAT, 200, None),  # the whole context fits
        ({}, CHAT, 8192, 256),  # capped, not refused
        ({"n": 4, "max_tokens": None, "max_completion_tokens": None}, CHAT, 8192, 64),
    ],
)
def test_the_cap_applies_to_what_will_be_generated(body, route, context, changed) -> None:
    doc = dict(body)
    assert cap_tokens(doc, generation(json.dumps(body).encode(), route), 256, context) == bool(
        changed
    )
    assert doc.get("max_completion_tokens") == changed if changed else doc == body


@pytest.mark.parametrize(
    ("body", "route", "param"),
    [
        ({"max_tokens": 257}, CHAT, "max_tokens"),
        ({"max_completion_tokens": 300, "max_tokens": 10}, CHAT, "max_completion_tokens"),
        ({"max_tokens": 100, "n": 3}, CHAT, "max_tokens"),
        ({"max_tokens": "1e3"}, COMPLETIONS, None),  # not an int string: 400 before the cap
        ({"max_tokens": 1e3}, COMPLETIONS, "max_tokens"),
        ({"max_tokens": 100, "prompt": ["a", "b", "c"]}, COMPLETIONS, "max_tokens"),
        ({"n": 300}, CHAT, "n"),  # not even one token each
    ],
)
def test_asking_for_more_than_the_cap_is_400(body, route, param) -> None:
    with pytest.raises(BadRequest) as e:
        g = generation(json.dumps(body).encode(), route)
        cap_tokens(dict(body), g, 256, 8192)
    if param is not None:
        assert e.value.details["param"] == param
        assert "SERVERY_LLM_MAX_TOKENS_LIMIT" in e.value.message and "256" in e.value.message


def test_no_cap_by_default() -> None:
    doc = {"max_tokens": 10**9}
    assert not cap_tokens(doc, gen(doc), None, 8192)


def receiver(chunks: list[bytes], end: dict | None = None):
    sent = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or end is not None}
        for i, c in enumerate(chunks)
    ]
    if end is not None:
        sent.append(end)
    later = {"type": "http.disconnect"}

    async def receive() -> dict:
        return sent.pop(0) if sent else later

    return receive


def test_read_body_in_pieces_and_replay() -> None:
    async def go():
        receive = receiver([b"ab", b"", b"cd"])
        body, left = await read_body(receive, 4)
        replay = replaying(body, receive, left)
        return body, left, await replay(), await replay()

    body, left, first, then = asyncio.run(go())
    assert (body, left) == (b"abcd", None)
    assert first == {"type": "http.request", "body": b"abcd", "more_body": False}
    assert then["type"] == "http.disconnect"  # the client's own channel after the body


def test_read_body_stops_past_the_limit_and_replays_a_disconnect() -> None:
    endless = [b"x" * 1000] * 10_000

    with pytest.raises(PayloadTooLarge, match="larger than 4096 bytes"):
        asyncio.run(read_body(receiver(endless, end={"type": "http.request"}), 4096))

    async def left_early():
        receive = receiver([b"ab"], end={"type": "http.disconnect"})
        body, left = await read_body(receive, None)
        return body, left, await replaying(body, receive, left)()

    body, left, replayed = asyncio.run(left_early())
    assert body == b"ab" and left == replayed == {"type": "http.disconnect"}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.02, "20ms"), (1.5, "1.5s"), (28.8, "28.8s"), (360, "6m0s")],
)
def test_reset_durations_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_the_manifests_cap_tokens_per_request_alike_in_router_and_llm_service() -> None:
    """deploy/components/llm sets SERVERY_LLM_MAX_TOKENS_LIMIT for the LLM service (the cap) and
    the router (what a chat without max_tokens is charged): one value."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2] / "deploy/components/llm"
    values = []
    for name in ("llm-deployment.yaml", "router-llm-patch.yaml"):
        for doc in yaml.safe_load_all((root / name).read_text()):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                if "SERVERY_LLM_MODELS_FILE" in env:
                    values.append(env.get("SERVERY_LLM_MAX_TOKENS_LIMIT"))
    assert len(values) == 2 and values[0] == values[1] and int(values[0]) >= 1

"""services/llm/service.py: the per-request generated-token cap (SERVERY_LLM_MAX_TOKENS_LIMIT)."""

from __future__ import annotations

import json

import pytest

from services.llm import service as llm_service


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> llm_service.LLMState:
    monkeypatch.setattr(llm_service.SETTINGS, "max_tokens_limit", 256)
    return llm_service.LLMState()


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"model": "m", "max_tokens": 257}, "max_tokens"),
        ({"model": "m", "max_completion_tokens": 300, "max_tokens": 10}, "max_completion_tokens"),
        ({"model": "m", "max_tokens": 100, "n": 3}, "max_tokens"),
    ],
)
def test_asking_for_more_than_the_cap_is_400(state, request_body, param: str) -> None:
    response = state.over_limit(json.dumps(request_body).encode())
    assert response is not None and response.status_code == 400
    error = json.loads(response.body)["error"]
    assert error["param"] == param and error["code"] == 400
    assert "SERVERY_LLM_MAX_TOKENS_LIMIT" in error["message"] and "256" in error["message"]


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({"model": "m", "max_tokens": 256}).encode(),
        json.dumps({"model": "m", "max_tokens": 128, "n": 2}).encode(),
        json.dumps({"model": "m"}).encode(),  # the engine's own default and context bound
        b"not json",  # vLLM answers malformed bodies in its own words
        json.dumps({"model": "m", "max_tokens": "many"}).encode(),
    ],
)
def test_within_the_cap_or_not_ours_to_judge_passes(state, raw: bytes) -> None:
    assert state.over_limit(raw) is None


def test_no_cap_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_service.SETTINGS, "max_tokens_limit", None)
    body = json.dumps({"model": "m", "max_tokens": 10**9}).encode()
    assert llm_service.LLMState().over_limit(body) is None

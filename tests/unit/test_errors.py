"""services/runtime/errors.py: the error hierarchy, the platform envelope and pydantic error
mapping."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from services.protocols.errors import error_response, from_validation_error, json_response
from services.runtime.errors import (
    BadRequest,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    ServeryError,
)

SERVED = {"iris", "digits"}


class Body(BaseModel):
    model: str
    inputs: list[list[float]]

    @field_validator("model")
    @classmethod
    def _served(cls, v: str) -> str:
        if v not in SERVED:
            raise PydanticCustomError(
                "model_not_found", "model '{name}' is not served", {"name": v}
            )
        return v


def validation_error(data: Any = None, *, json_text: str | None = None) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        if json_text is not None:
            Body.model_validate_json(json_text)
        else:
            Body.model_validate(data)
    return info.value


def body_of(response: Response) -> Any:
    assert response.media_type == "application/json"
    return json.loads(bytes(response.body))


@pytest.mark.parametrize(
    ("cls", "status", "error_type"),
    [
        (ServeryError, 500, "internal_error"),
        (InvalidInput, 422, "invalid_input"),
        (BadRequest, 400, "bad_request"),
        (PayloadTooLarge, 413, "payload_too_large"),
        (ModelNotFound, 404, "model_not_found"),
        (ModelNotReady, 503, "model_not_ready"),
        (Overloaded, 503, "overloaded"),
    ],
)
def test_status_and_type(cls: type[ServeryError], status: int, error_type: str) -> None:
    assert issubclass(cls, ServeryError)
    err = cls("something is off", param="inputs")
    assert err.status_code == status
    assert err.error_type == error_type
    assert err.message == "something is off"
    assert str(err) == "something is off"
    assert err.to_dict() == {
        "error": {"type": error_type, "message": "something is off", "param": "inputs"}
    }
    response = error_response(err)
    assert response.status_code == status
    assert body_of(response) == err.to_dict()


def test_client_error_envelope() -> None:
    response = error_response(InvalidInput("bad rows", param="inputs"))
    assert response.status_code == 422
    assert body_of(response) == {
        "error": {"type": "invalid_input", "message": "bad rows", "param": "inputs"}
    }
    assert "retry-after" not in response.headers


def test_overloaded_carries_retry_after() -> None:
    response = error_response(Overloaded("too busy", retry_after_s=7))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert body_of(response) == {"error": {"type": "overloaded", "message": "too busy"}}
    assert Overloaded("busy").headers() == {"Retry-After": "1"}


def test_server_side_servery_error_keeps_its_message(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="servery"):
        response = error_response(ModelNotReady("model 'iris' is still loading"))
    assert response.status_code == 503
    assert body_of(response)["error"] == {
        "type": "model_not_ready",
        "message": "model 'iris' is still loading",
    }
    assert "still loading" in caplog.text


@pytest.mark.parametrize(
    "exc",
    [KeyError("secret internals"), RuntimeError("secret internals"), ZeroDivisionError()],
)
def test_unexpected_exception_is_a_generic_500(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="servery"):
        response = error_response(exc)
    assert response.status_code == 500
    body = body_of(response)
    assert set(body) == {"error"}
    assert body["error"]["type"] == "internal_error"
    assert body["error"]["message"] == "internal server error; see server log"
    raw = bytes(response.body).decode()
    assert "secret" not in raw
    assert type(exc).__name__ not in raw
    # ...but the server log has the whole story.
    assert caplog.records[-1].exc_info is not None
    assert caplog.records[-1].exc_info[1] is exc


def test_with_status() -> None:
    err = ServeryError.with_status(405, "method GET not allowed on /predict")
    assert isinstance(err, ServeryError)
    assert err.status_code == 405
    assert err.error_type == "method_not_allowed"
    response = error_response(err)
    assert response.status_code == 405
    assert body_of(response) == {
        "error": {"type": "method_not_allowed", "message": "method GET not allowed on /predict"}
    }
    assert ServeryError.with_status(404, "no route").error_type == "not_found"
    assert ServeryError.with_status(413, "too big").error_type == "payload_too_large"
    assert ServeryError.with_status(418, "teapot").error_type == "http_error"
    # An instance attribute: the class keeps its own status and type.
    assert (ServeryError.status_code, ServeryError.error_type) == (500, "internal_error")


def test_json_response_is_compact() -> None:
    response = json_response({"a": [1, 2]}, 201, {"X-Test": "1"})
    assert response.status_code == 201
    assert bytes(response.body) == b'{"a":[1,2]}'
    assert response.headers["x-test"] == "1"
    assert response.headers["content-type"] == "application/json"


# --- from_validation_error ----------------------------------------------------------------------


def test_invalid_json_is_bad_request() -> None:
    err = from_validation_error(validation_error(json_text='{"model": "iris", '))
    assert type(err) is BadRequest
    assert err.status_code == 400
    assert err.message == "request body is not valid JSON"


def test_missing_field_is_bad_request_naming_it() -> None:
    err = from_validation_error(validation_error({"model": "iris"}))
    assert type(err) is BadRequest
    assert err.status_code == 400
    assert err.message.startswith("invalid request body: ")
    assert "inputs" in err.message
    assert "Field required" in err.message
    assert err.details["detail"] == [{"loc": "inputs", "msg": "Field required"}]


def test_wrong_types_are_bad_request_with_locations() -> None:
    err = from_validation_error(validation_error({"model": "iris", "inputs": [[1, "x"]]}))
    assert type(err) is BadRequest
    assert [p["loc"] for p in err.details["detail"]] == ["inputs.0.1"]
    assert "inputs.0.1:" in err.message


def test_whole_body_error_is_located_at_body() -> None:
    err = from_validation_error(validation_error([1, 2]))
    assert type(err) is BadRequest
    assert err.details["detail"][0]["loc"] == "body"


def test_message_summarises_at_most_five_problems() -> None:
    bad = {"model": "iris", "inputs": [["x"] * 8]}
    err = from_validation_error(validation_error(bad))
    assert len(err.details["detail"]) == 8
    assert err.message.count("Input should be") == 5


def test_model_not_found_is_404() -> None:
    err = from_validation_error(validation_error({"model": "nope", "inputs": [[1.0]]}))
    assert type(err) is ModelNotFound
    assert err.status_code == 404
    assert err.message == "model 'nope' is not served"


def test_model_not_found_wins_over_other_problems() -> None:
    err = from_validation_error(validation_error({"model": "nope"}))  # inputs missing as well
    assert type(err) is ModelNotFound


def test_validation_error_details_never_echo_input() -> None:
    secret = "s3cr3t-token"
    err = from_validation_error(validation_error({"model": "iris", "inputs": secret}))
    assert secret not in json.dumps(err.to_dict())


def test_shed_requests_are_not_logged_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    """Load shedding answers 503 without a log line per refusal; other 5xx are logged."""
    import logging

    from services.protocols.errors import oip_error
    from services.runtime.batcher import QueueFull

    with caplog.at_level(logging.WARNING, logger="servery"):
        for respond in (error_response, oip_error):
            response = respond(QueueFull("queue full"))
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert not caplog.records
        error_response(Overloaded("the sklearn service is overloaded"))
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_long_messages_are_truncated() -> None:
    """Messages quote client input: a 10 MB model name must not make a 10 MB answer."""
    from services.runtime.errors import MAX_MESSAGE, ModelNotFound

    err = ModelNotFound(f"model '{'m' * 10_000_000}' is not served")
    assert len(err.message) <= MAX_MESSAGE
    assert err.message.startswith("model 'mmm") and "truncated" in err.message
    assert ModelNotFound("short").message == "short"

"""One error hierarchy for every protocol.

Every client mistake is a :class:`ServeryError` subclass carrying its HTTP status code and a
stable ``type``; the protocol front ends render it in their own envelope
(:mod:`services.protocols.errors`: the platform's, OIP's, OpenAI's; gRPC status codes in
:mod:`services.protocols.oip.grpc`). Anything else is an internal error: logged with its traceback,
answered 500 with a generic message (no internals).
"""

from __future__ import annotations

from typing import Any

MAX_MESSAGE = 1024
"""Longest error message sent to a client (characters)."""


class ServeryError(Exception):
    """Base class: an error with an HTTP status and a stable ``type`` string."""

    status_code: int = 500
    error_type: str = "internal_error"
    logged: bool = True
    """5xx errors are logged (WARNING) per request unless False (load shedding: counted in
    ``servery_requests_total``, a log line per refused request would add to the overload)."""

    def __init__(self, message: str, **details: Any) -> None:
        if len(message) > MAX_MESSAGE:
            # Messages quote what the client sent (model names, versions): a 10 MB name must not
            # make a 10 MB answer, nor overflow gRPC's 8-16 KiB status metadata.
            message = message[: MAX_MESSAGE - 40] + f"... ({len(message)} characters, truncated)"
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"type": self.error_type, "message": self.message, **self.details}}

    def headers(self) -> dict[str, str]:
        return {}

    @classmethod
    def with_status(cls, status_code: int, message: str) -> ServeryError:
        """A plain HTTP error (unknown route, wrong method) in the platform envelope."""
        err = cls(message)
        err.status_code = status_code
        err.error_type = _HTTP_TYPES.get(status_code, "http_error")
        return err


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class InvalidInput(ServeryError):
    """The request is well-formed JSON but its content is wrong (shape, type, values)."""

    status_code = 422
    error_type = "invalid_input"


class BadRequest(ServeryError):
    """The request body cannot be parsed or misses required fields."""

    status_code = 400
    error_type = "bad_request"


class PayloadTooLarge(ServeryError):
    status_code = 413
    error_type = "payload_too_large"


class ModelNotFound(ServeryError):
    status_code = 404
    error_type = "model_not_found"


class ModelLoadFailed(ServeryError):
    """A stored version exists but cannot be loaded (damaged file, wrong format).

    500, not 503: the router's BentoML client reads 503 as "overloaded, retry shortly", which a
    broken model file is not. The message names the exception type only; details go to the log.
    """

    status_code = 500
    error_type = "model_load_failed"


class ModelNotReady(ServeryError):
    status_code = 503
    error_type = "model_not_ready"


class RequestTimeout(ServeryError):
    """The request was not answered within the traffic timeout; its work is cancelled."""

    status_code = 504
    error_type = "timeout"


class Overloaded(ServeryError):
    status_code = 503
    error_type = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Unauthenticated(ServeryError):
    """No API key, or one the server does not know: 401 with ``WWW-Authenticate: Bearer``
    (RFC 6750; ``error="invalid_token"`` when a key was sent). See services/gateway/auth.py."""

    status_code = 401
    error_type = "unauthenticated"

    def __init__(self, message: str, *, invalid_token: bool = False, **details: Any) -> None:
        super().__init__(message, **details)
        self.invalid_token = invalid_token

    def headers(self) -> dict[str, str]:
        challenge = 'Bearer error="invalid_token"' if self.invalid_token else "Bearer"
        return {"WWW-Authenticate": challenge}


class Forbidden(ServeryError):
    """A valid API key asked for a model it may not use."""

    status_code = 403
    error_type = "forbidden"


class RateLimited(ServeryError):
    """An API key's rate limit is reached: 429 with ``Retry-After`` (seconds until enough of its
    budget is back), or without one when the request alone exceeds what the key may spend."""

    status_code = 429
    error_type = "rate_limited"

    def __init__(self, message: str, retry_after_s: int | None, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}

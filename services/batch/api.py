"""``/v1/files`` and ``/v1/batches`` as OpenAI serves them (the ``openai`` client's
``files.create`` -> ``batches.create`` -> ``batches.retrieve`` -> ``files.content`` works
unchanged), on the router. Keys, rate limits and body limits are the gate's
(services/gateway/gate.py); each key sees only its own files and batches (others' ids are 404).
Errors use OpenAI's envelope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response

from services.batch.jobs import Jobs, too_large
from services.protocols.errors import json_response, openai_error
from services.protocols.state import SCOPE_KEY
from services.runtime.errors import BadRequest, ServeryError

router = APIRouter(include_in_schema=False)

UPLOAD_OVERHEAD = 64 * 1024
"""Bytes of multipart framing and form fields allowed on top of the file itself."""


def _owner(request: Request) -> tuple[str, list[str] | None]:
    """The caller's key name ("" with keys off) and the models it may use (None: all)."""
    key = request.scope.get(SCOPE_KEY)
    if key is None:
        return "", None
    return key.name, None if key.models is None else sorted(key.models)


BATCHES: list[Any] = []
"""This process's :class:`~services.batch.worker.Batches`, once the Router made it."""


def _jobs(request: Request) -> Jobs:
    batches = BATCHES[0] if BATCHES else None
    if batches is None:
        raise ServeryError.with_status(503, "batch jobs are starting; retry shortly")
    return batches.jobs  # type: ignore[no-any-return]


def _answer(work: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Response]]:
    async def run() -> Response:
        try:
            out = await work()
        except ServeryError as e:
            return openai_error(e)
        return out if isinstance(out, Response) else json_response(out, 200)

    return run


@router.post("/v1/files")
async def create_file(request: Request) -> Response:
    async def work() -> Any:
        jobs = _jobs(request)
        limit = jobs.settings.max_file_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + UPLOAD_OVERHEAD:
            raise too_large(limit)
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # starlette's MultiPartException and the like
            raise BadRequest(f"expected a multipart form with 'file' and 'purpose': {e}") from e
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise BadRequest("form field 'file' (the JSONL file) is required", param="file")
        if not isinstance(purpose, str):
            raise BadRequest("form field 'purpose' is required ('batch')", param="purpose")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise too_large(limit)
        owner, _ = _owner(request)
        return jobs.put_file(owner, upload.filename or "input.jsonl", purpose, data)

    return await _answer(work)()


@router.get("/v1/files")
async def list_files(request: Request) -> Response:
    async def work() -> Any:
        purpose = request.query_params.get("purpose")
        data = _jobs(request).files(_owner(request)[0], purpose)
        return {"object": "list", "data": data, "has_more": False}

    return await _answer(work)()


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str) -> Response:
    return await _answer(lambda: _ready(_jobs(request).file(_owner(request)[0], file_id)))()


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    async def work() -> Any:
        path = _jobs(request).file_content(_owner(request)[0], file_id)
        return FileResponse(path, media_type="application/octet-stream")

    return await _answer(work)()


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> Response:
    return await _answer(lambda: _ready(_jobs(request).delete_file(_owner(request)[0], file_id)))()


@router.post("/v1/batches")
async def create_batch(request: Request) -> Response:
    async def work() -> Any:
        from services.llm.openai_api import parse_object

        jobs = _jobs(request)
        doc = parse_object(await request.body())
        for field in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(doc.get(field), str):
                raise BadRequest(f"{field}: a string is required", param=field)
        owner, models = _owner(request)
        return jobs.create(
            owner,
            models,
            doc["input_file_id"],
            doc["endpoint"],
            doc["completion_window"],
            doc.get("metadata"),
        )

    return await _answer(work)()


@router.get("/v1/batches")
async def list_batches(request: Request) -> Response:
    async def work() -> Any:
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            raise BadRequest("limit must be an integer", param="limit") from None
        if not 1 <= limit <= 100:
            raise BadRequest("limit must be between 1 and 100", param="limit")
        data, more = _jobs(request).batches(
            _owner(request)[0], request.query_params.get("after"), limit
        )
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    return await _answer(work)()


@router.get("/v1/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str) -> Response:
    return await _answer(lambda: _ready(_jobs(request).batch(_owner(request)[0], batch_id)))()


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> Response:
    return await _answer(lambda: _ready(_jobs(request).cancel(_owner(request)[0], batch_id)))()


async def _ready(value: Any) -> Any:
    return value


def is_batch_path(scope: dict[str, Any]) -> bool:
    """Whether a ``/v1`` request is for the Files or Batch API (by the raw path, as the
    allow-list in services/llm/openai_api.py decides)."""
    from services.llm.openai_api import route_of

    route = route_of(scope)
    return route is not None and route.batch


class BatchSplit:
    """ASGI app in front of the LLM proxy: the Files and Batch API go to an app of their own
    (:data:`router`, with OpenAI's 404 and 405), the rest of ``/v1`` to ``rest``."""

    def __init__(self, rest: Any) -> None:
        from fastapi import FastAPI
        from starlette.exceptions import HTTPException

        self.rest = rest
        self.api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        self.api.include_router(router)

        @self.api.exception_handler(HTTPException)
        async def _http_error(_: Request, exc: HTTPException) -> Response:
            return openai_error(ServeryError.with_status(exc.status_code, str(exc.detail)))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and is_batch_path(scope):
            return await self.api(scope, receive, send)
        await self.rest(scope, receive, send)

    async def close(self) -> None:
        close = getattr(self.rest, "close", None)
        if close is not None:
            await close()

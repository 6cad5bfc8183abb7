"""The OpenAI API as servery serves it under ``/v1``: the one allow-list of routes, the request
fields that decide what a request costs (parsed as vLLM parses them), and the ASGI body helpers
the router's gate, the LLM proxy and the services behind it share.

**Routes.** :data:`ROUTES` lists every ``/v1`` path a client may reach, with its methods. A
request's route is looked up by its *raw* path (the ASGI scope's ``raw_path``, the bytes the
client sent, without the query): ``/v1/chat/completions%3F``, ``/v1/../metrics``, ``//v1/models``
or ``/v1/models/`` match nothing, so the gate (token charging, a restricted key's model filter)
and the proxy (what it forwards) decide on the same canonical path and never on a decoded one
that the service behind might read differently.

**Costs.** :func:`generation` reads ``model``, ``max_tokens``, ``max_completion_tokens``, ``n``
and (``/v1/completions``) ``prompt`` with pydantic's lax rules, as vLLM's request models do:
``64``, ``64.0``, ``"64"`` and ``1e6`` are integers, ``64.5`` and ``"many"`` are refused (400).
Which field wins follows vLLM 0.32: chat uses ``max_completion_tokens`` unless it is null, then
``max_tokens``; completions use ``max_tokens`` (null or absent: 16). Every prompt of a list
on ``/v1/completions`` is a generation of its own (``n`` each). Prompt tokens are *estimated* as
the body's bytes / 4 (about 4 bytes per token of English text, JSON punctuation included): the
router has no tokenizer.

**Bodies.** :func:`read_body` reads a request body up to a limit (413 beyond, never more than
the limit plus one chunk in memory); :func:`replaying` hands an already-read body to the next
ASGI app. JSON is parsed by :func:`parse_object` (pydantic-core's parser: nesting deeper than 200
levels is a 400, not a ``RecursionError``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError

from services.runtime.errors import BadRequest, PayloadTooLarge

Receive = Any  # an ASGI receive callable


# --- routes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One ``/v1`` route: its canonical path, methods, and whether it generates tokens."""

    path: str
    methods: frozenset[str]
    generates: bool = False
    """``POST`` here runs a generation: its tokens are charged (:func:`generation`)."""
    prompts: bool = False
    """The body's ``prompt`` may be a list of prompts, each generated (``/v1/completions``)."""
    names_model: bool = False
    """The body's ``model`` says which model serves it: an API key limited to some models is
    checked against it (services/gateway/gate.py)."""
    batch: bool = False
    """The Files and Batch API (services/batch/): served by the router itself, not forwarded."""


ROUTES: dict[str, Route] = {
    r.path: r
    for r in (
        Route("/v1/models", frozenset({"GET"})),
        Route("/v1/chat/completions", frozenset({"POST"}), generates=True, names_model=True),
        Route(
            "/v1/completions",
            frozenset({"POST"}),
            generates=True,
            prompts=True,
            names_model=True,
        ),
        # RAG (services/rag/): embeddings, and the collections' list
        Route("/v1/embeddings", frozenset({"POST"}), names_model=True),
        Route("/v1/rag/collections", frozenset({"GET"})),
        # Files and batches (services/batch/); one file or batch: _BATCH_OBJECT
        Route("/v1/files", frozenset({"GET", "POST"}), batch=True),
        Route("/v1/batches", frozenset({"GET", "POST"}), batch=True),
    )
}
"""Every ``/v1`` path the router forwards (with :data:`COLLECTION_ROUTES`); anything else is
answered 404 there."""

COLLECTION_ROUTES: dict[str, Route] = {
    "": Route("/v1/rag/collections/{name}", frozenset({"DELETE"})),
    "/documents": Route(
        "/v1/rag/collections/{name}/documents", frozenset({"GET", "POST", "DELETE"})
    ),
    "/query": Route("/v1/rag/collections/{name}/query", frozenset({"POST"})),
}
"""The routes of one RAG collection, by what follows its name (a store name: ``a-z0-9._-``);
:func:`route_of` answers them with the request's own path."""
_BATCH_OBJECT = re.compile(
    r"/v1/(?:files/[A-Za-z0-9_-]{1,80}(/content)?|batches/[A-Za-z0-9_-]{1,80}(/cancel)?)"
)
"""One file (``GET``/``DELETE``), its ``/content``; one batch (``GET``), its ``/cancel``."""
_COLLECTION = re.compile(r"/v1/rag/collections/([a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?)(/[a-z]+)?")

MODELS = "/v1/models"

RATE_HEADERS = "servery.rate_headers"
"""ASGI scope entry: the ``x-ratelimit-*`` headers (name, value bytes) the gate computed for the
caller's key; the proxy adds them to the answer."""


def canonical_path(scope: dict[str, Any]) -> str:
    """The request's path as the client sent it (``raw_path``; the query is not part of it)."""
    raw = scope.get("raw_path")
    if raw is None:  # an ASGI server without raw_path: the decoded path, as it is
        return scope.get("root_path", "") + scope["path"]
    return raw.decode("latin-1")


def route_of(scope: dict[str, Any]) -> Route | None:
    """The allow-listed route of an HTTP request, or None (unknown path, or one that only
    decodes to a known path)."""
    path = canonical_path(scope)
    found = ROUTES.get(path)
    if found is None and (obj := _BATCH_OBJECT.fullmatch(path)):
        methods = {"GET"} if obj[1] else {"POST"} if obj[2] else {"GET", "DELETE"}
        return Route(path, frozenset(methods), batch=True)
    if found is None and (rag := _COLLECTION.fullmatch(path)):
        template = COLLECTION_ROUTES.get(rag[2] or "")
        # the concrete path (the name matched a store name: nothing decodes differently)
        found = None if template is None else replace(template, path=path)
    return found


# --- request bodies ------------------------------------------------------------------------------


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body larger than {limit} bytes (SERVERY_MAX_BODY_BYTES)")


async def read_body(receive: Receive, limit: int | None) -> tuple[bytes, dict[str, Any] | None]:
    """Read the whole request body: ``(body, None)``, or ``(what arrived, the disconnect
    message)`` when the client left first. Raises :class:`PayloadTooLarge` as soon as more than
    ``limit`` bytes arrived (at most one chunk past it is held)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def replaying(body: bytes, receive: Receive, disconnect: dict[str, Any] | None = None) -> Receive:
    """An ASGI ``receive`` that first hands out ``body`` (read already) in one message, or the
    ``disconnect`` message that ended the read, then defers to ``receive``, so the app after
    still sees the client leave."""
    first = disconnect or {"type": "http.request", "body": body, "more_body": False}
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return first
        return await receive()

    return replay


MAX_JSON_DEPTH = 200
"""Deepest nesting :func:`parse_object` accepts (pydantic-core's parser limit)."""


def parse_object(body: bytes) -> dict[str, Any]:
    """The JSON object of an OpenAI request body; :class:`BadRequest` for anything else
    (not JSON, nested deeper than :data:`MAX_JSON_DEPTH`, not an object)."""
    try:
        doc = pydantic_core.from_json(body)
    except ValueError as e:
        why = "nested too deeply" if "recursion limit" in str(e) else "not valid JSON"
        raise BadRequest(f"request body is {why}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


def model_of(body: bytes) -> str | None:
    """The ``model`` a body names, if it is a JSON object with a string ``model``; else None."""
    try:
        model = parse_object(body).get("model") if body else None
    except BadRequest:
        return None
    return model if isinstance(model, str) else None


# --- what a request generates --------------------------------------------------------------------


class _Fields(BaseModel):
    """The fields vLLM's ``ChatCompletionRequest``/``CompletionRequest`` type as these do
    (pydantic lax mode); vLLM validates everything else itself."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = 1


COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""vLLM's ``CompletionRequest.max_tokens`` default (also for an explicit null)."""

BYTES_PER_TOKEN = 4
"""The prompt-size estimate: this many body bytes per token."""


@dataclass(frozen=True)
class Generation:
    """What one OpenAI request asks the engine to do."""

    model: str | None
    max_tokens: int | None
    """Tokens each choice may generate as asked (None: not given, the engine's default; on
    chat that is the rest of the model's context)."""
    max_tokens_param: str
    """The field that gave ``max_tokens`` (named in errors)."""
    choices: int
    """Sequences generated: ``n`` times the number of prompts."""
    prompt_tokens: int
    """Estimated prompt tokens (body bytes / 4)."""

    def charge(self, default_max_tokens: int) -> int:
        """Tokens to charge up front: the prompt plus every choice's most generated tokens
        (``default_max_tokens`` each when the request sets none)."""
        per_choice = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return self.prompt_tokens + self.choices * per_choice


def generation(body: bytes, route: Route, doc: dict[str, Any] | None = None) -> Generation:
    """Parse ``body`` (or its already parsed ``doc``) as ``route``'s request; :class:`BadRequest`
    naming the field that does not parse as vLLM would parse it."""
    if doc is None:
        doc = parse_object(body)
    try:
        fields = _Fields.model_validate(doc)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False, include_context=False)[0]
        where = ".".join(map(str, first["loc"]))
        raise BadRequest(f"{where}: {first['msg']}", param=where) from None
    if route.prompts:
        asked, param = fields.max_tokens, "max_tokens"
        if asked is None:
            asked = COMPLETIONS_DEFAULT_MAX_TOKENS
    elif fields.max_completion_tokens is not None:
        asked, param = fields.max_completion_tokens, "max_completion_tokens"
    else:
        asked, param = fields.max_tokens, "max_tokens"
    if asked is not None and asked < 0:
        raise BadRequest(f"{param} must be at least 1, got {asked}", param=param)
    n = 1 if fields.n is None else fields.n
    if n < 1:
        raise BadRequest(f"n must be at least 1, got {n}", param="n")
    prompts = _prompt_count(doc.get("prompt")) if route.prompts else 1
    return Generation(
        model=fields.model,
        max_tokens=asked,
        max_tokens_param=param,
        choices=n * prompts,
        prompt_tokens=math.ceil(len(body) / BYTES_PER_TOKEN),
    )


def _prompt_count(prompt: Any) -> int:
    """Prompts in a completions ``prompt``: a string or one list of token ids is one; a list of
    strings or of token-id lists is one each (vLLM refuses other shapes)."""
    if isinstance(prompt, list) and any(isinstance(p, str | list) for p in prompt):
        return max(1, len(prompt))
    return 1


def cap_tokens(doc: dict[str, Any], asked: Generation, limit: int | None, context: int) -> bool:
    """Apply ``SERVERY_LLM_MAX_TOKENS_LIMIT`` (``limit``, over all choices) to what a request
    will generate; True when ``doc`` was changed.

    A request that asks for more is refused (:class:`BadRequest`). A chat that sets no
    ``max_tokens`` may generate up to the rest of the model's ``context``: when that is over the
    limit, ``max_completion_tokens`` is set to the limit's share per choice (the request is
    served, within the limit, as OpenAI caps output at a model's maximum)."""
    if limit is None:
        return False
    if asked.max_tokens is not None:
        total = asked.max_tokens * asked.choices
        if total > limit:
            raise BadRequest(
                f"{asked.max_tokens_param} x n = {total} is more than this server allows per "
                f"request ({limit}, SERVERY_LLM_MAX_TOKENS_LIMIT)",
                param=asked.max_tokens_param,
            )
        return False
    if context and context * asked.choices <= limit:
        return False
    share = limit // asked.choices
    if share < 1:
        raise BadRequest(
            f"n = {asked.choices} sequences is more than this server allows per request "
            f"({limit} tokens, SERVERY_LLM_MAX_TOKENS_LIMIT)",
            param="n",
        )
    doc["max_completion_tokens"] = share
    return True

"""The web console: a small browser UI served by the router under ``/console/``.

It shows the catalog (``GET /models``, ``GET /v1/models``), a live view computed in the browser
from the platform's own ``/metrics`` (rates and latency percentiles from the differences between
successive scrapes, so no Prometheus server is needed), a try-it form per classifier and a chat
playground that streams ``/v1/chat/completions``. Everything is static: plain HTML, CSS and
JavaScript modules in ``static/``, shipped in the package and the Bento; no build step, nothing
fetched from another origin (the page's Content-Security-Policy forbids it).

None of it touches the prediction hot path: the console's routes go through BentoML's ordinary
middleware and only answer the browser; the data the page shows comes from the public API with
the user's own API key (kept in the browser's ``sessionStorage``), exactly as any client's would.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

PREFIX = "/console"
"""Where the console is served: the page at ``/console/``, its assets under ``/console/static/``."""

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"

# The page talks to this origin only; inline scripts and styles are refused too (the JavaScript
# and CSS are files), so an injected string can never run.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def render(*, auth: bool, llm: bool) -> bytes:
    """``index.html`` with what the page must know before its first request: whether API keys
    are on (ask for one before calling the API, so no call is refused) and whether the LLM
    service runs (``/v1`` exists)."""
    page = (HERE / "index.html").read_text(encoding="utf-8")
    for name, value in (("auth", auth), ("llm", llm)):
        page = page.replace("{{" + name + "}}", "true" if value else "false")
    return page.encode()


def mount(app: FastAPI, *, auth: bool, llm: bool) -> None:
    """Serve the console on ``app``: ``GET /console/`` (the page), ``GET /console`` (a redirect
    there) and the static assets. None of these routes is in the OpenAPI spec."""
    page = render(auth=auth, llm=llm)
    headers = {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    async def index(_: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    async def to_index(_: Request) -> Response:
        return RedirectResponse("console/", status_code=308)  # relative: works under a proxy prefix

    app.add_route(f"{PREFIX}/", index, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_route(PREFIX, to_index, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="console-static")

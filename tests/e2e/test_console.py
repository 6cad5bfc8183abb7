"""The web console (``/console/``) in headless Chromium against a real ``bentoml serve``.

One server for the module: the Bento (``services:Router``) with the three demo classifiers, a
second iris version with ``production``/``staging`` aliases and a 90/10 split, the tiny test LLM
(vLLM on CPU) and API keys on. Playwright drives Debian's ``chromium`` (``/usr/bin/chromium``,
no browser download). Every page is checked for console errors (failed requests included: the
browser logs a refused fetch as one) and screenshotted into ``tests/e2e/artifacts/`` (or
``$SERVERY_E2E_ARTIFACTS``).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness.server import ROOT, Server, cpu_llm_env, start_server
from bench.harness.store import bentoml_store, save_iris
from tests.browser import chromium
from tests.conftest import engine_metric as shared_engine_metric
from tests.conftest import eventually, finished_requests

sync_api = pytest.importorskip("playwright.sync_api")

ARTIFACTS = Path(os.environ.get("SERVERY_E2E_ARTIFACTS", ROOT / "tests" / "e2e" / "artifacts"))
CONSOLE = ROOT / "services" / "console"
KEY = "console-e2e-key-0123456789abcdef"
LLM = "tiny"
CONTEXT = 1024  # training/tiny_llm.py
IRIS_ROW = [5.1, 3.5, 1.4, 0.2]  # setosa
IRIS_FEATURES = ["sepal length", "sepal width", "petal length", "petal width"]
MODELS_YAML = """\
models:
  - name: iris
    routing:
      split: {production: 90, staging: 10}
  - name: breast_cancer
  - name: digits
"""

try:
    import vllm  # noqa: F401

    HAS_VLLM = True
except ImportError:
    HAS_VLLM = False


def test_assets_are_self_contained() -> None:
    """Nothing is fetched from another origin at run time: no absolute URLs in the page or its
    assets (XML namespaces are names, not fetches), and no inline script or style (the page's
    Content-Security-Policy would refuse them)."""
    files = [CONSOLE / "index.html", *sorted((CONSOLE / "static").iterdir())]
    assert {f.suffix for f in files} >= {".html", ".js", ".css", ".svg"}
    for f in files:
        text = f.read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (f.name, urls)
    page = (CONSOLE / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", page) == ['<script type="module" src="static/app.js">']
    assert "style=" not in page and "<style" not in page


def test_routes_serve_the_page_and_assets_only() -> None:
    """``services.console.mount`` on a bare app: the page with its flags and security headers,
    the assets, nothing outside ``static/``, and nothing in the OpenAPI spec."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from services import console

    app = FastAPI()
    console.mount(app, auth=True, llm=False)
    client = TestClient(app)
    page = client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<html lang="en" data-auth="true" data-llm="false">' in page.text
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    redirect = client.get("/console", follow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["location"] == "console/"
    js = client.get("/console/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    for outside in ("/console/static/../__init__.py", "/console/static/%2e%2e/__init__.py"):
        assert client.get(outside).status_code == 404, outside
    assert not [p for p in app.openapi()["paths"] if p.startswith("/console")]


@pytest.fixture(scope="module")
def server(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The Bento with keys on: demo classifiers, iris in two versions behind aliases and a
    split, and (where vLLM is installed) the tiny LLM as ``tiny``."""
    from models.aliases import AliasStore

    home = tmp_path_factory.mktemp("console-store") / "bentoml"
    shutil.copytree(demo_store / "models", home / "models")
    with bentoml_store(home):
        aliases = AliasStore(home / "models")
        aliases.promote("iris", aliases.latest("iris"), "production")
        aliases.promote("iris", save_iris(c=0.5), "staging")
        if HAS_VLLM:
            from training.tiny_llm import save

            save("tiny-llm")
    env = {"SERVERY_API_KEYS": KEY, "SERVERY_ROUTER_WORKERS": "1"}
    if HAS_VLLM:
        env |= cpu_llm_env(f"{LLM}=tiny-llm")
    srv = start_server(
        home, MODELS_YAML, tmp_path_factory.mktemp("console-serve"), env=env, ready_timeout=300
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


class Console:
    """One browser tab on the console, recording every console error and page error."""

    def __init__(self, page: Any, url: str) -> None:
        self.page = page
        self.url = url
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def open(self, hash_: str = "#/catalog") -> Any:
        self.page.goto(f"{self.url}/console/{hash_}")
        return self.page

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def console(browser: Any, server: Server, request: pytest.FixtureRequest) -> Iterator[Console]:
    """A tab in a fresh browser context (empty sessionStorage) at laptop size, or the viewport
    an indirect parameter gives; fails the test on any console error."""
    viewport = getattr(request, "param", {"width": 1280, "height": 860})
    context = browser.new_context(viewport=viewport)
    tab = Console(context.new_page(), server.url)
    try:
        yield tab
        assert tab.errors == [], f"browser console errors: {tab.errors}"
    finally:
        context.close()


def enter_key(page: Any) -> None:
    page.wait_for_selector("#view-key:not([hidden])")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")


def test_catalog_lists_models_versions_aliases_and_split(console: Console, server: Server) -> None:
    page = console.open()
    # keys are on: the page asks for one before it calls the API (no refused call)
    enter_key(page)
    page.wait_for_selector("#catalog-models article[data-model='digits']")
    assert page.evaluate("sessionStorage.getItem('servery.apiKey')") == KEY
    assert page.is_visible("#key-state")

    described = {
        m["name"]: m
        for m in httpx.get(
            f"{server.url}/models", headers={"authorization": f"Bearer {KEY}"}
        ).json()["models"]
    }
    cards = {
        c.get_attribute("data-model"): c for c in page.query_selector_all("#catalog-models article")
    }
    assert set(cards) == {"iris", "breast_cancer", "digits"}
    for name, framework in (
        ("iris", "sklearn"),
        ("breast_cancer", "xgboost"),
        ("digits", "pytorch"),
    ):
        text = cards[name].inner_text()
        assert framework in text and "ready" in text, text
        assert "accuracy" in text, text  # training metrics from the model's metadata
    iris = cards["iris"].inner_text()
    prod, staging = (
        described["iris"]["aliases"]["production"],
        described["iris"]["aliases"]["staging"],
    )
    assert prod != staging
    assert f"production → {prod[:12]}" in iris, iris
    assert f"staging → {staging[:12]}" in iris, iris
    assert "production 90 %" in iris and "staging 10 %" in iris, iris
    assert "Versions served (2)" in iris, iris
    if HAS_VLLM:
        llm = page.inner_text("#catalog-llms")
        assert LLM in llm and "tiny-llm:" in llm and f"{CONTEXT} tokens" in llm, llm
    console.screenshot("catalog")

    # the key is kept for the tab: a reload asks for nothing
    page.reload()
    page.wait_for_selector("#catalog-models article[data-model='iris']")
    assert page.is_hidden("#view-key")


def test_try_it_predicts_and_charts_the_probabilities(console: Console) -> None:
    page = console.open("#/try/iris")
    enter_key(page)
    page.wait_for_selector("#try-fields input")
    labels = page.locator("#try-fields label").all_inner_texts()
    assert labels == [
        "sepal length (cm)",
        "sepal width (cm)",
        "petal length (cm)",
        "petal width (cm)",
    ]
    for i, value in enumerate(IRIS_ROW):
        page.get_by_label(labels[i]).fill(str(value))
    page.click("#try-submit")
    page.wait_for_selector("#try-result:not([hidden])")
    assert page.inner_text("#try-class") == "setosa"
    bars = page.locator("#try-bars li")
    assert bars.count() == 3
    assert page.inner_text("#try-bars li.best .bar-label") == "setosa"
    assert "chosen by split:" in page.inner_text("#try-meta")
    console.screenshot("try-iris")

    # a pinned version, and a row pasted in one go
    page.select_option("#try-version", "staging")
    page.click("summary:has-text('Paste a row')")
    page.fill("#try-paste", "6.7, 3.0, 5.2, 2.3")
    page.click("#try-fill")
    page.click("#try-submit")
    sync_api.expect(page.locator("#try-class")).to_have_text("virginica")
    assert "chosen by alias:staging" in page.inner_text("#try-meta")


def test_live_view_charts_the_traffic(console: Console, server: Server) -> None:
    page = console.open("#/live")
    enter_key(page)
    page.select_option("#live-interval", "1000")
    page.wait_for_selector("#live-models article[data-model='iris']")
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {KEY}"}) as client:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            r = client.post("/predict", json={"model": "iris", "inputs": [IRIS_ROW] * 3})
            assert r.status_code == 200, r.text
            time.sleep(0.02)
    card = page.locator("#live-models article[data-model='iris']")

    def value(metric: str) -> str:
        return card.locator(f"[data-metric='{metric}'] .metric-value").inner_text()

    eventually(lambda: value("rps") not in ("0", "\N{EN DASH}"), "iris requests/s")
    assert value("batch").endswith("rows"), value("batch")
    assert value("p50").endswith("ms") and value("p99").endswith("ms"), (value("p50"), value("p99"))
    assert value("errorRate") == "0 %"
    # the batcher's decisions: batches released per second, and why
    eventually(lambda: value("flushes") not in ("0", "\N{EN DASH}"), "iris batches/s")
    reasons = card.locator("[data-metric='flushReasons'] [data-reason]")
    assert reasons.count() == 4
    assert value("shed") == "0"
    assert card.locator("svg.spark polyline").count() >= 1
    console.screenshot("live")


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed: no LLM service")
def test_chat_streams_and_the_stop_button_ends_the_generation(
    console: Console, server: Server
) -> None:
    page = console.open(f"#/chat/{LLM}")
    enter_key(page)
    page.wait_for_selector(f"#chat-model option[value='{LLM}']", state="attached")
    answer = page.locator("#chat-log li.assistant .content")
    lengths = finished_requests(server.url, LLM).get("length", 0)

    # a short answer streams to its end
    page.click("summary:has-text('Settings')")
    page.fill("#chat-max-tokens", "8")
    page.check("#chat-ignore-eos")
    page.fill("#chat-input", "Hello!")
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#chat-log li.assistant[data-state='done']", timeout=60_000)
    assert answer.nth(0).inner_text() != ""
    assert page.inner_text("#chat-stats").startswith("8 tokens"), page.inner_text("#chat-stats")
    eventually(
        lambda: finished_requests(server.url, LLM).get("length", 0) == lengths + 1,
        "the engine counts the short answer as finished at max_tokens",
    )

    # A long one grows token by token until Stop (pressed from the keyboard) ends it. What Stop
    # must do, whatever the machine's speed: the UI is ready again at once, the LLM service's
    # request is aborted upstream (it leaves the engine without finishing), and no chunk is
    # shown after Stop.
    finished = finished_requests(server.url, LLM)
    page.fill("#chat-max-tokens", str(CONTEXT - 64))
    page.fill("#chat-input", "Tell me a long story.")
    page.click("#chat-send")
    second = answer.nth(1)
    sync_api.expect(second).not_to_be_empty(timeout=60_000)
    first = len(second.inner_text())
    eventually(lambda: len(second.inner_text()) > first, "the answer grows while streaming")
    assert page.locator("#chat-log li.assistant").nth(1).get_attribute("data-state") == "streaming"
    page.focus("#chat-stop")
    page.keyboard.press("Enter")
    page.wait_for_selector("#chat-log li.assistant[data-state='stopped']")
    stopped = second.inner_text()
    assert page.is_disabled("#chat-stop") and page.is_enabled("#chat-send")
    assert page.inner_text("#chat-stats").startswith("Stopped after"), page.inner_text(
        "#chat-stats"
    )
    console.screenshot("chat")
    running = "vllm:num_requests_running"
    eventually(lambda: engine_metric(server, running) == 0, "the engine drops the request", 60)
    assert finished_requests(server.url, LLM) == finished, "it ran to its end: not aborted"
    # The engine has ended the request, so every chunk it made has been sent or dropped: the
    # answer shown is still the one at Stop.
    assert second.inner_text() == stopped


def engine_metric(server: Server, name: str) -> float:
    return shared_engine_metric(server.url, name, LLM)


@pytest.mark.parametrize("console", [{"width": 390, "height": 844}], indirect=True)
def test_phone_width(console: Console) -> None:
    """At a phone's width nothing overflows sideways, and every visible control has a label."""
    page = console.open()
    enter_key(page)
    page.wait_for_selector("#catalog-models article[data-model='iris']")
    for view in ("catalog", "try", "live", "chat"):
        page.click(f"nav a[data-view='{view}']")
        page.wait_for_selector(f"#view-{view}:not([hidden])")
        page.wait_for_load_state("networkidle")  # the view's data is in, so is its layout
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (view, overflow)
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button')]
                .filter((e) => e.offsetParent !== null)
                .filter((e) => !(e.labels?.length || e.getAttribute('aria-label')
                                 || (e.tagName === 'BUTTON' && e.textContent.trim())))
                .map((e) => e.id || e.outerHTML)"""
        )
        assert unlabelled == [], (view, unlabelled)
        console.screenshot(f"phone-{view}")


def test_live_numbers_match_prometheus(console: Console) -> None:
    """The live view's arithmetic (metrics.js), checked in the browser against hand-computed
    values: rates from counter differences, histogram_quantile's interpolation."""
    page = console.open()
    enter_key(page)
    result = page.evaluate(
        """async () => {
        const m = await import('./static/metrics.js');
        const h = 'servery_model_request_duration_seconds_bucket';
        const f = 'servery_batch_flushes_total';
        const hs = 'servery_batch_hold_seconds';
        const text = (n, b1, b2, inf, sum) => [
          '# HELP servery_requests_total x',
          `servery_requests_total{model="iris",version="a",status="200"} ${n}`,
          `servery_requests_total{model="iris",version="b",status="503"} ${n / 10}`,
          `${h}{le="0.001",model="iris",version="a"} ${b1}`,
          `${h}{le="0.01",model="iris",version="a"} ${b2}`,
          `${h}{le="+Inf",model="iris",version="a"} ${inf}`,
          `servery_batch_size_sum{model="iris",version="a",placement="inline"} ${sum}`,
          `servery_batch_size_count{model="iris",version="a",placement="inline"} ${n / 2}`,
          `servery_requests_total{model="_unknown",version="",status="404"} 7`,
          `${f}{model="iris",version="a",placement="inline",reason="tick"} ${n / 4}`,
          `${f}{model="iris",version="a",placement="inline",reason="hold_alone"} ${n / 20}`,
          `servery_batch_shed_total{model="iris",version="a",placement="inline"} ${n / 50}`,
          `${hs}_sum{model="iris",version="a",placement="inline"} ${sum / 1e5}`,
          `${hs}_count{model="iris",version="a",placement="inline"} ${n / 20}`,
        ].join('\\n');
        const a = m.snapshot(m.parse(text(100, 50, 100, 100, 200)), 0);
        const b = m.snapshot(m.parse(text(300, 100, 280, 300, 800)), 2000);
        const p = m.points(a, b).get('iris');
        return {
          p, models: [...b.models.keys()],
          q: m.quantile(0.5, [[0.1, 10], [0.2, 30], [Infinity, 40]]),
          top: m.quantile(0.99, [[0.1, 10], [Infinity, 20]]),
          empty: m.quantile(0.5, [[0.1, 0], [Infinity, 0]]),
        };
    }"""
    )
    p = result["p"]
    assert result["models"] == ["iris"]  # _unknown is not a model
    assert p["rps"] == pytest.approx((330 - 110) / 2)
    assert p["errorRate"] == pytest.approx(20 / 220)
    # 200 new observations: 50 <= 1 ms, 130 in (1, 10] ms, 20 above
    assert p["p50"] == pytest.approx(0.001 + 0.009 * (100 - 50) / 130)
    assert p["p99"] == pytest.approx(0.01)
    assert p["batch"] == pytest.approx(600 / 100)
    # flushes by reason per second; the mean hold; requests shed per second
    assert p["flushRates"] == {"tick": 25, "full": 0, "hold_ended": 0, "hold_alone": 5}
    assert p["flushes"] == pytest.approx(30)
    assert p["hold"] == pytest.approx((800 - 200) / 1e5 / 10)
    assert p["shed"] == pytest.approx(2)
    assert result["q"] == pytest.approx(0.15)
    assert result["top"] == pytest.approx(0.1)
    assert result["empty"] is None


def test_usage_view_lists_every_keys_usage(console: Console, server: Server) -> None:
    """The Usage tab, for the server's one (unrestricted) key: every key's requests and rows per
    model from GET /v1/usage?all=true, as the API answers them."""
    headers = {"authorization": f"Bearer {KEY}"}

    def api() -> dict[str, Any]:
        page = httpx.get(f"{server.url}/v1/usage?all=true", headers=headers).json()
        found = [r for r in page["data"][0]["results"] if r["model"] == "breast_cancer"]
        return found[0] if found else {"num_model_requests": 0, "rows": 0}

    before = api()
    for rows in (1, 2):
        body = {"model": "breast_cancer", "inputs": [[0.1] * 30] * rows}
        assert httpx.post(f"{server.url}/predict", json=body, headers=headers).status_code == 200
    want = eventually(
        lambda: (now := api())["rows"] == before["rows"] + 3 and now, "the usage counted"
    )
    assert want["num_model_requests"] == before["num_model_requests"] + 2
    page = console.open("#/usage")
    enter_key(page)
    row = page.locator("#usage-table tr[data-key='env-1'][data-model='breast_cancer']")
    row.wait_for()
    assert row.locator("[data-field='num_model_requests']").inner_text() == str(
        want["num_model_requests"]
    )
    assert row.locator("[data-field='rows']").inner_text() == str(want["rows"])
    assert page.locator("#usage-scope").inner_text().startswith("Every API key")
    console.screenshot("usage")


def test_api_key_is_sent_only_where_it_belongs(console: Console, server: Server) -> None:
    """The page sends the key to the API it was served with and nowhere else; /metrics, which
    needs none, gets none."""
    requests: list[Any] = []
    console.page.on("request", lambda r: requests.append(r))
    page = console.open("#/live")
    enter_key(page)
    page.wait_for_selector("#live-models article[data-model='iris']")

    def scrapes() -> int:
        return sum(r.url == f"{server.url}/metrics" for r in requests)

    # a second scrape; playwright's waits (not time.sleep) let its request events through
    deadline = time.monotonic() + 60
    while scrapes() < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert scrapes() >= 2, "the live view did not scrape /metrics twice within 60 s"
    calls = [
        (r.url.removeprefix(server.url), r.all_headers().get("authorization"))
        for r in requests
        if "/console/" not in r.url
    ]
    assert all(u.startswith("/") for u, _ in calls), calls  # this origin only
    assert ("/models", f"Bearer {KEY}") in calls, calls
    metrics = [a for u, a in calls if u == "/metrics"]
    assert metrics and all(a is None for a in metrics), calls

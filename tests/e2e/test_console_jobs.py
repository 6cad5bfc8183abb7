"""The console's Jobs view (``/console/#/jobs``) in headless Chromium against a real ``bentoml
serve`` with API keys on and the embedded (SQLite) batch queue: a job submitted through the API is
listed with its status and progress, and its files download with the key.

One small server (one router worker, an iris classifier) for the module; Playwright drives
Debian's ``chromium`` as tests/e2e/test_console.py does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness.server import ROOT, Server, start_server
from bench.harness.store import bentoml_store, save_iris
from tests.browser import chromium
from tests.conftest import eventually

sync_api = pytest.importorskip("playwright.sync_api")

ARTIFACTS = Path(os.environ.get("SERVERY_E2E_ARTIFACTS", ROOT / "tests" / "e2e" / "artifacts"))
KEY = "console-jobs-key-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("jobs-store") / "bentoml"
    with bentoml_store(home):
        save_iris()
    srv = start_server(
        home,
        "models:\n  - name: iris\n",
        tmp_path_factory.mktemp("jobs-serve"),
        env={"SERVERY_API_KEYS": KEY, "SERVERY_ROUTER_WORKERS": "1"},
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


def _line(cid: str, row: list[float]) -> bytes:
    body = {"model": "iris", "inputs": [row]}
    return json.dumps(
        {"custom_id": cid, "method": "POST", "url": "/predict", "body": body}
    ).encode()


def test_jobs_view_lists_a_job_with_progress_and_downloads_its_files(
    browser: Any, server: Server
) -> None:
    data = b"\n".join([_line("r0", [5.1, 3.5, 1.4, 0.2]), _line("r1", [6.7, 3.0, 5.2, 2.3]), b"{"])
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as api:
        up = api.post(
            "/v1/files", files={"file": ("rows.jsonl", data + b"\n")}, data={"purpose": "batch"}
        )
        assert up.status_code == 200, up.text
        created = api.post(
            "/v1/batches",
            json={
                "input_file_id": up.json()["id"],
                "endpoint": "/predict",
                "completion_window": "24h",
            },
        ).json()
        done = eventually(
            lambda: (
                (b := api.get(f"/v1/batches/{created['id']}").json())["status"] == "completed" and b
            ),
            "the batch completed",
            timeout=60,
        )
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}

    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
        page.goto(f"{server.url}/console/#/jobs")
        page.wait_for_selector("#view-key:not([hidden])")
        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        row = page.locator(f"#jobs-table tr[data-job='{done['id']}']")
        row.wait_for()
        assert row.get_attribute("data-status") == "completed"
        assert row.locator("[data-field='status']").inner_text() == "completed"
        progress = row.locator("[data-field='progress']").inner_text()
        assert "3/3" in progress and "1 failed" in progress, progress
        assert row.locator("[data-field='endpoint']").inner_text() == "/predict"
        links = row.locator("[data-file]")
        assert links.evaluate_all("ls => ls.map(l => l.dataset.file)") == [
            "input",
            "output",
            "errors",
        ]
        with page.expect_download() as got:
            row.locator("[data-file='output']").click()
        out = [json.loads(line) for line in Path(got.value.path()).read_text().splitlines()]
        assert sorted(e["custom_id"] for e in out) == ["r0", "r1"]
        assert got.value.suggested_filename == f"{done['output_file_id']}.jsonl"
        with page.expect_download() as got:
            row.locator("[data-file='errors']").click()
        err = [json.loads(line) for line in Path(got.value.path()).read_text().splitlines()]
        assert [e["error"]["code"] for e in err] == ["invalid_json"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "jobs.png"), full_page=True)
        assert errors == [], f"browser console errors: {errors}"
    finally:
        context.close()

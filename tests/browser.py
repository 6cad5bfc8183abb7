"""Headless Chromium for the console's browser tests: Debian's ``chromium`` (``make test``
installs it) driven by Playwright. Used by tests/e2e/test_console.py, test_console_jobs.py and
tests/integration/test_llm_features_server.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextmanager
def chromium() -> Iterator[Any]:
    """A launched headless browser (Playwright's ``Browser``), closed on exit; the test is
    skipped where Playwright or the system Chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip("no system Chromium (apt-get install -y chromium; `make test` installs it)")
    args = ["--disable-dev-shm-usage"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()

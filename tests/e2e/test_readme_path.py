"""The README path on a fresh model store: train the demo models, serve the Bento, predict.

This is what ``make serve`` runs after creating the environment (``python -m training.ensure``
then ``bentoml serve services:Router`` with the shipped model config), in a temporary store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.harness.server import ROOT, start_server

EXAMPLES = {
    "iris": [5.1, 3.5, 1.4, 0.2],
    "breast_cancer": [14.0] + [0.1] * 29,
    "digits": [0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0] * 8,
}


def ensure_models(home: Path) -> tuple[str, float]:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "training.ensure", "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout, time.monotonic() - start


def test_fresh_store_trains_serves_and_answers(tmp_path: Path) -> None:
    home = tmp_path / "bentoml"
    first, _ = ensure_models(home)
    assert "3 model(s) trained" in first, first
    again, _ = ensure_models(home)
    assert "all demo models present" in again, again  # second run reuses the store

    server = start_server(home, None, tmp_path / "serve")
    try:
        listed = httpx.get(f"{server.url}/models").json()["models"]
        assert {m["name"] for m in listed} == set(EXAMPLES)
        assert all(m["placement"] == "inline" for m in listed)
        for name, row in EXAMPLES.items():
            resp = httpx.post(f"{server.url}/predict", json={"model": name, "inputs": [row]})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["model"] == name and len(body["predictions"]) == 1
            assert abs(sum(body["probabilities"][0]) - 1.0) < 1e-5
    finally:
        server.stop()
    assert server.proc.poll() is not None

"""The installed ``servery bench`` console script against a real server, one run per protocol.

(OpenAI streaming runs against the LLM service in ``test_llm.py``, which has its server.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SERVERY = str(Path(sys.executable).with_name("servery"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def servery(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SERVERY, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize(
    ("endpoint", "model", "rows"),
    [("rest", "iris", 1), ("oip-rest", "breast_cancer", 3), ("oip-grpc", "digits", 2)],
)
def test_bench_endpoint(server, tmp_path: Path, endpoint: str, model: str, rows: int) -> None:
    url = server.grpc_url if endpoint == "oip-grpc" else server.url
    out = tmp_path / "out"
    proc = servery(
        "bench", "--endpoint", endpoint, "--url", url, "--model", model, "-c", "1,4", "-n", "200",
        "--rows-per-request", str(rows), "--json", str(out / "bench.json"), "--plot-dir", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert (doc["endpoint"], doc["model"], doc["rows_per_request"]) == (endpoint, model, rows)
    assert [r["concurrency"] for r in doc["levels"]] == [1, 4]
    for r in doc["levels"]:
        assert r["requests"] == r["ok"] == 200 and r["errors"] == 0, r["status"]
        assert r["ok_rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["gpu_memory_mib"] is None or r["gpu_memory_mib"]["peak"]
    assert doc["meta"]["nproc"] >= 1 and doc["meta"]["command"].startswith("servery bench")
    for name in ("latency.png", "throughput.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    table = proc.stdout.splitlines()
    assert "req/s" in table[1] and len(table) == 4  # title, header, one line per level


def test_bench_duration_mode(server) -> None:
    proc = servery(
        "bench", "--endpoint", "rest", "--url", server.url, "--model", "iris", "-c", "2", "-d",
        "0.5", "--warmup", "0", "--json", "-",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "c=2" in proc.stderr and "errors 0" in proc.stderr
    (only,) = json.loads(proc.stdout)["levels"]  # --json -: the report on stdout, no table
    assert only["concurrency"] == 2 and only["requests"] > 0


@pytest.mark.parametrize("endpoint", ["rest", "oip-rest", "oip-grpc"])
def test_bench_unknown_model(server, endpoint: str) -> None:
    url = server.grpc_url if endpoint == "oip-grpc" else server.url
    proc = servery("bench", "--endpoint", endpoint, "--url", url, "--model", "no-such-model")
    assert proc.returncode == 2
    assert proc.stderr.startswith("servery bench: error: model 'no-such-model' not found")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

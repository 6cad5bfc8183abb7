"""Timed closed-loop HTTP load for the benchmarks: wrk, or bench.loadgen as a fallback.

wrk is a compiled load generator: on this project's 2-core machines it measured 2,148 req/s on a
server where the Python (aiohttp) generator reached 1,184, because the client itself competes with
the server for the CPU. :func:`measure` runs either one for a fixed time after a short warm-up and
returns a :class:`bench.loadgen.LoadResult`, so reports do not care which client ran.

wrk gets ``-t1 -c<C> -d<s> --latency`` and ``post.lua`` (next to this file), which POSTs the bodies
round-robin and prints p50/p95/p99 and wrk's error counts from its ``done()`` hook. Errors are
socket errors (connect, read, write, timeout) plus responses with status >= 400.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import LoadResult, run_load

LUA_SCRIPT = Path(__file__).with_name("post.lua")
INSTALL_HINT = (
    "wrk is not installed. Install it with `sudo apt-get install -y wrk` (Debian/Ubuntu), "
    "or pass --client aiohttp to use bench.loadgen (a Python client: it takes CPU from the "
    "server on small machines, so its numbers are lower)."
)
_DONE = re.compile(r"^WRK_DONE (.*)$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.MULTILINE)


def wrk_path() -> str | None:
    """Path of the wrk binary, or None if it is not on PATH."""
    return shutil.which("wrk")


def wrk_version() -> str | None:
    """wrk's version line (e.g. ``wrk debian/4.1.0-3+b2 [epoll]``), or None without wrk."""
    path = wrk_path()
    if path is None:
        return None
    out = subprocess.run([path, "-v"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(" Copyright")[0].strip() if out else "wrk"


def parse_wrk(stdout: str, concurrency: int) -> LoadResult:
    """Turn wrk's output (with the ``WRK_DONE`` line of post.lua) into a LoadResult."""
    done = _DONE.search(stdout)
    rps = _RPS.search(stdout)
    if done is None or rps is None:
        raise RuntimeError(f"cannot parse wrk output:\n{stdout}")
    f = {k: float(v) for k, v in (kv.split("=", 1) for kv in done.group(1).split())}
    socket_errors = {k: int(f[k]) for k in ("connect", "read", "write", "timeout") if f[k]}
    status_errors = int(f["status"])
    errors = sum(socket_errors.values()) + status_errors
    requests = int(f["requests"])
    status = {"2xx/3xx": requests - status_errors, **socket_errors}
    if status_errors:
        status[">=400"] = status_errors
    return LoadResult(
        concurrency=concurrency,
        requests=requests,
        seconds=f["duration_us"] / 1e6,
        ok=max(requests - status_errors, 0),
        errors=errors,
        status=status,
        rps=float(rps.group(1)),
        p50_ms=f["p50_us"] / 1000,
        p95_ms=f["p95_us"] / 1000,
        p99_ms=f["p99_us"] / 1000,
        max_ms=f["max_us"] / 1000,
    )


def run_wrk(
    url: str,
    bodies: Sequence[str],
    *,
    concurrency: int,
    seconds: int,
    timeout_s: int = 10,
    key_header: str | None = None,
) -> LoadResult:
    """One wrk run of ``seconds`` (whole seconds: wrk's -d takes no fractions).

    ``key_header``: send body i with that header set to ``key-<i>`` (e.g. a route key)."""
    path = wrk_path()
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    with tempfile.TemporaryDirectory(prefix="servery-wrk-") as tmp:
        body_file = Path(tmp) / "bodies.jsonl"
        body_file.write_text("".join(b.replace("\n", " ") + "\n" for b in bodies))
        cmd = [
            path,
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            f"{timeout_s}s",
            "-s",
            str(LUA_SCRIPT),
            url,
        ]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, "WRK_BODIES": str(body_file), "WRK_KEY_HEADER": key_header or ""},
            timeout=seconds + timeout_s + 30,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return parse_wrk(proc.stdout, concurrency)


def run_aiohttp(url: str, bodies: Sequence[str], *, concurrency: int, seconds: float) -> LoadResult:
    """bench.loadgen counts requests, not time: a short probe sizes a run of about ``seconds``."""
    encoded = [b.encode() for b in bodies]
    probe_n = max(4 * concurrency, 100)
    probe = asyncio.run(run_load(url, encoded, concurrency=concurrency, requests=probe_n))
    n = max(4 * concurrency, math.ceil(probe.rps * seconds))
    return asyncio.run(run_load(url, encoded, concurrency=concurrency, requests=n))


def measure(
    url: str, bodies: Sequence[str], *, concurrency: int, seconds: float, client: str = "wrk"
) -> LoadResult:
    """Load ``url`` for about ``seconds`` with ``concurrency`` clients (``wrk`` or ``aiohttp``).

    The caller warms the server up (a short ``measure`` whose result it drops).
    """
    if client == "aiohttp":
        return run_aiohttp(url, bodies, concurrency=concurrency, seconds=seconds)
    return run_wrk(url, bodies, concurrency=concurrency, seconds=max(1, round(seconds)))

"""Start and stop a real ``bentoml serve`` of servery on a free loopback port, and read it back.

Used by the integration tests and the benchmarks: the server binds 127.0.0.1 only, runs in its
own process group, and :meth:`Server.stop` ends every worker it started. :func:`worktree` checks
out another commit for a server of an older tree; :func:`metric_samples` and
:func:`logged_errors` read what a server recorded.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
"""The project's checkout (this file is bench/harness/server.py)."""
BENTOML = str(Path(sys.executable).with_name("bentoml"))


def free_port() -> int:
    """A loopback port nobody listens on, below the kernel's ephemeral range: a port the kernel
    hands out for ``bind(0)`` can be taken by any outgoing connection (a client's, Prometheus'
    scrape) before the server binds it; a CI run saw gRPC's bind fail that way."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 20000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything tried was taken: any port, as before
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def launch(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group (a stop reaches every worker), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@dataclass
class ServerProcess:
    """A server started in its own process group, logging to ``log``."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30, drain_s: float = 15) -> None:
        """Stop the server and every worker it started (its own process group).

        Processes of the group may outlive the main one (vLLM's engine and worker processes do,
        for a few busy seconds): wait up to ``drain_s`` for the group to empty, then kill what
        is left, so the next test or benchmark run does not share the CPU with them.
        """
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        deadline = time.monotonic() + drain_s
        with contextlib.suppress(ProcessLookupError):  # raised once the group is empty
            while time.monotonic() < deadline:
                os.killpg(self.proc.pid, 0)
                time.sleep(0.2)
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_ready(self, is_ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``is_ready()`` (HTTP errors count as not ready) until it holds.

        Raises RuntimeError with the log's tail if the process exits or ``timeout`` passes; on
        that or any other interruption (Ctrl-C included) the server is stopped, never leaked.
        """
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{what} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if is_ready():
                        return
                time.sleep(0.3)
            raise RuntimeError(f"{what} not ready after {timeout}s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise


@dataclass
class Server(ServerProcess):
    """A running ``bentoml serve`` of the Bento; ``url`` is its base URL."""

    env: dict[str, str] = field(default_factory=dict, repr=False)
    grpc_port: int | None = None
    """Port of the router's OIP gRPC server (``SERVERY_GRPC_PORT``)."""

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the OIP gRPC server, as gRPC clients take it."""
        return f"127.0.0.1:{self.grpc_port}"


def cpu_llm_env(models: str = "", models_file: str = "") -> dict[str, str]:
    """The environment of a server whose LLM service runs vLLM on CPU, as tests and benches
    start it: the LLMs from ``models`` (``SERVERY_LLM_MODELS``, ``NAME=STORE_NAME,...``) or
    ``models_file`` only (set empty, so a developer's own file does not replace the list), no
    CUDA graphs / compile (ready in ~20 s instead of ~40), a 1 GiB KV cache (vLLM's legacy
    ``VLLM_CPU_KVCACHE_SPACE`` set to the same: it would override the setting) and no hub."""
    env = {
        "SERVERY_LLM_ENABLED": "true",
        "SERVERY_LLM_MODELS_FILE": models_file,
        "SERVERY_LLM_ENFORCE_EAGER": "true",
        "SERVERY_LLM_CPU_KVCACHE_GIB": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    if models:
        env["SERVERY_LLM_MODELS"] = models
    return env


def start_server(
    home: Path,
    models_yaml: str | None,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    target: str = "services:Router",
    ready_timeout: float = 120,
    root: Path = ROOT,
    ready_path: str = "/readyz",
) -> Server:
    """Start ``bentoml serve TARGET`` on a free loopback port and wait for ``/readyz``.

    ``models_yaml`` is written to a model config for this server; None serves the shipped
    default (models/models.yaml), as ``make serve`` does. The OIP gRPC server gets a free port
    too unless ``env`` names ``SERVERY_GRPC_PORT`` (every worker binds it with SO_REUSEPORT, so
    two servers on one fixed port would silently share it). ``root`` is the source tree served
    (another checkout of the project, e.g. an older commit for a before/after benchmark).
    ``ready_path``: what answers 200 once the server is up (``/livez`` for a server that is
    meant to start not ready).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # `bentoml serve` wipes $BENTOML_HOME/prometheus_multiproc_dir when it starts, which would
    # blank the metrics of any other server on the same home. Each server gets a home of its own
    # that shares the model store through a symlink.
    run_home = workdir / f"bentoml-home-{port}"
    run_home.mkdir()
    (run_home / "models").symlink_to((home / "models").resolve(), target_is_directory=True)
    full_env = {**os.environ, "BENTOML_HOME": str(run_home), "BENTOML_DO_NOT_TRACK": "True"}
    full_env.pop("SERVERY_MODELS_FILE", None)
    if models_yaml is not None:
        config = workdir / "models.yaml"
        config.write_text(models_yaml)
        full_env["SERVERY_MODELS_FILE"] = str(config)
    full_env["SERVERY_GRPC_PORT"] = str(free_port())
    # classifier servers by default; a test or bench that wants the LLM service passes it in env
    full_env["SERVERY_LLM_ENABLED"] = "false"
    # stop() is SIGTERM to the whole group: no drain window for requests that cannot come
    # (services/ops/shutdown.py); the shutdown tests set it
    full_env["SERVERY_SHUTDOWN_DRAIN_S"] = "0"
    full_env.update(env or {})
    log = workdir / f"serve-{port}.log"
    cmd = [BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    server = Server(
        url=f"http://127.0.0.1:{port}",
        proc=launch(cmd, cwd=root, env=full_env, log=log),
        log=log,
        env=full_env,
        grpc_port=int(full_env["SERVERY_GRPC_PORT"]),
    )
    server.wait_ready(
        lambda: httpx.get(f"{server.url}{ready_path}", timeout=2).status_code == 200,
        ready_timeout,
        "server",
    )
    return server


def metric_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    """``(sample name, labels, value)`` of every sample a Prometheus endpoint exposes.

    Parsed by prometheus_client's own text parser (exposition format, escapes and all).
    """
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def logged_errors(server: ServerProcess, offset: int, path: str = "/predict") -> dict[str, int]:
    """Status >= 400 of public calls to ``path`` in the server's access log after ``offset``.

    wrk only counts bad statuses; BentoML's access log says which ones (e.g. 503 "overloaded").
    """
    with open(server.log, "rb") as f:
        f.seek(offset)
        new = f.read().decode(errors="replace")
    access = re.compile(rf"path={re.escape(path)},[^)]*\) \(status=(\d{{3}})")
    codes = Counter(c for c in access.findall(new) if int(c) >= 400)
    return dict(sorted(codes.items()))


@contextlib.contextmanager
def worktree(rev: str, tmp: Path) -> Iterator[Path]:
    """A checkout of ``rev`` (``git worktree``), removed afterwards: ``start_server``'s ``root``
    for a before/after comparison."""
    path = tmp / f"tree-{rev}"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True
        )

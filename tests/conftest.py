"""Shared test set-up: folder-based markers, a temporary model store, and a real server.

Nothing here reads the developer's own model store: every model is trained (tiny, seconds) into a
temporary ``BENTOML_HOME``, and every server binds 127.0.0.1 on a free port and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).with_name("bentoml"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder (tests/unit, tests/integration, tests/e2e)."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, parts[0]))


@contextlib.contextmanager
def bentoml_store(home: Path) -> Iterator[Path]:
    """Point this process's BentoML model store at ``home`` (and its children via the env).

    BentoML reads ``BENTOML_HOME`` once and caches the home, the store directory and the
    ``ModelStore`` in singleton providers of its DI container, so setting the variable alone is
    not enough after the first store access. Patching the three providers sends every
    ``bentoml.models`` call here and restores the previous store afterwards.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore
    from bentoml._internal.utils.analytics.usage_stats import do_not_track

    models_dir = home / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    old = {k: os.environ.get(k) for k in ("BENTOML_HOME", "BENTOML_DO_NOT_TRACK")}
    os.environ["BENTOML_HOME"] = str(home)
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"  # no usage events from tests
    do_not_track.cache_clear()
    try:
        with (
            BentoMLContainer.bentoml_home.patch(str(home)),
            BentoMLContainer.model_store_dir.patch(str(models_dir)),
            BentoMLContainer.model_store.patch(ModelStore(str(models_dir))),
        ):
            yield home
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        do_not_track.cache_clear()


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary store holding the three small demo models (trained once per session)."""
    from training.ensure import ensure

    home = tmp_path_factory.mktemp("store") / "bentoml"
    with bentoml_store(home):
        ensure("small", progress=False)
        yield home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running ``bentoml serve`` of the Bento; ``url`` is its base URL."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(repr=False)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30) -> None:
        """Stop the server and every worker it started (its own process group)."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_server(
    home: Path,
    models_yaml: str | None,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    target: str = "services:Router",
    ready_timeout: float = 120,
) -> Server:
    """Start ``bentoml serve TARGET`` on a free loopback port and wait for ``/readyz``.

    ``models_yaml`` is written to a model config for this server; None serves the shipped
    default (models/models.yaml), as ``make serve`` does.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    full_env.pop("SERVERY_MODELS_FILE", None)
    if models_yaml is not None:
        config = workdir / "models.yaml"
        config.write_text(models_yaml)
        full_env["SERVERY_MODELS_FILE"] = str(config)
    full_env.update(env or {})
    log = workdir / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches every worker
        )
    server = Server(url=f"http://127.0.0.1:{port}", proc=proc, log=log, env=full_env)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.log_tail()}")

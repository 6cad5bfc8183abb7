"""Debian's ``redis-server`` for the batch tests and the batch study: 127.0.0.1 on a free port,
AOF on (``appendfsync everysec``, as deploy/components/batch runs it), RDB snapshots off. A
killed server restarted on the same port and folder reloads its AOF."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench.harness.server import free_port

INSTALL_HINT = "redis-server is not installed (make test installs it: apt-get install redis-server)"


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """One redis-server process writing its AOF into ``workdir``; :meth:`start` waits until it
    answers. Raises :class:`FileNotFoundError` (:data:`INSTALL_HINT`) where it is not installed."""

    def __init__(self, workdir: Path) -> None:
        exe = redis_server_path()
        if exe is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.cmd = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start it (again, after :meth:`kill`) and wait until it answers a ping."""
        import redis

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as a crash: what was written to the AOF survives a restart."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

"""The processes of a running server, by role, and the CPU time they used.

CPU time per answered request moves far less than req/s on a shared VM, so the studies that
compare two servers or two settings report it next to req/s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from bench.harness.server import Server


def processes(server: Server) -> dict[str, psutil.Process]:
    """Every live process of the server, named by role (``router-1``, ``sklearn-1``, ...)."""
    root = psutil.Process(server.proc.pid)
    named = {"arbiter": root}
    for child in root.children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "--service-name" in cmd:
            name = cmd[cmd.index("--service-name") + 1]
            worker = cmd[cmd.index("--worker-id") + 1] if "--worker-id" in cmd else "?"
            named[f"{name}-{worker}"] = child
    return named


def router_workers(server: Server) -> list[psutil.Process]:
    """The server's router worker processes (named ``router-<n>`` by :func:`processes`)."""
    found = [p for name, p in processes(server).items() if name.startswith("router-")]
    if not found:
        raise RuntimeError(f"no router worker processes under pid {server.proc.pid}")
    return found


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time of ``procs`` so far."""
    return sum(t.user + t.system for t in (p.cpu_times() for p in procs))

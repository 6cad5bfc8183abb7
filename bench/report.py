"""How ``servery bench`` and the studies print numbers: formatting, tables, where a run happened.

The studies (:mod:`bench.studies`) use the same pieces, so their Markdown and JSON describe the
machine and the numbers the way ``servery bench`` does; where studies write is
:mod:`bench.harness.results`.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any


def fmt(value: float | None, digits: int = 1) -> str:
    """A number with thousands separators, or ``-`` when it was not measured."""
    return "-" if value is None else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    """Aligned plain text, or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = []
    for r in [header, *rows]:
        cells = [f"{x:>{w}}" for x, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join([r[0].ljust(widths[0]), *cells]))
    return "\n".join(lines)


def machine(command: str, client: str | None) -> dict[str, Any]:
    """Where and how a run happened (for the Markdown results and the JSON).

    ``client`` describes the load generator(s), e.g. wrk's version line.
    """
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpus = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),  # what `nproc` prints
        "cpu": cpus[0] if cpus else "unknown",
        "python": platform.python_version(),
        "bentoml": version("bentoml"),
        "client": client,
        "bentoml_home": os.environ.get("BENTOML_HOME"),
    }

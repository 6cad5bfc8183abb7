"""Shared pieces of the benchmark reports: number formatting, tables, and where a run happened.

Used by :mod:`bench.foundation` and :mod:`bench.protocols`, so their RESULTS-style Markdown and
JSON describe the machine and the numbers the same way.
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


def run_line(meta: dict[str, Any]) -> str:
    """The Markdown line naming the command, date, CPU, versions and client of a run."""
    return (
        f"`{meta['command']}` — {meta['date']}; {meta['nproc']} CPUs ({meta['cpu']}); "
        f"Python {meta['python']}, BentoML {meta['bentoml']}; client {meta['client']}."
    )


def run_arguments(parser: Any, default_models: str, quick_help: str) -> None:
    """The options every benchmark takes: models, concurrency levels, run length."""
    parser.add_argument("--models", default=default_models, help="comma-separated store names")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated, default 1,16,64")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--quick", action="store_true", help=quick_help)


def finish_run_arguments(args: Any) -> Any:
    """Split the comma-separated options; ``--quick`` means 2 s runs."""
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.duration = 2.0
    return args


def use_project_store(root: Path) -> Path:
    """Like ``make``: the project's model store unless BENTOML_HOME names one (set before
    BentoML loads); returns the store's home."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    return Path(os.environ.setdefault("BENTOML_HOME", str(root / ".bentoml")))


def write_section(path: Path, key: str, markdown: str) -> None:
    """Replace the section ``key`` of the Markdown file ``path`` (or append it), keeping the rest.

    Each benchmark owns one section of bench/RESULTS.md, delimited by HTML comments, so running
    one benchmark never erases another's tables.
    """
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)

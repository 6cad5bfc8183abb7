"""Where the studies write: their common options, bench/out/<study>.json and bench/RESULTS.md.

Each study owns one section of bench/RESULTS.md, delimited by HTML comments, so running one study
never erases another's tables; its raw numbers go to ``bench/out/<study>.json`` (not in git).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.harness.server import ROOT

RESULTS_MD = ROOT / "bench" / "RESULTS.md"
OUT_DIR = ROOT / "bench" / "out"


def run_line(meta: dict[str, Any]) -> str:
    """The Markdown line naming the command, date, CPU, versions and client of a run
    (``meta`` from :func:`bench.report.machine`)."""
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


def use_model_store() -> Path:
    """Like ``make`` and ``bentoml serve``: BentoML's standard model store, $BENTOML_HOME, else
    ~/bentoml; returns its home, also set in BENTOML_HOME (before BentoML loads) so every server
    this process starts uses the same."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    return Path(os.environ.setdefault("BENTOML_HOME", str(Path.home() / "bentoml")))


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

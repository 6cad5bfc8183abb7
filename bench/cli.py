"""``servery bench``: load one servery endpoint at several concurrency levels and report.

Endpoints: native REST (``POST /predict``), OIP REST (``POST /v2/models/{name}/infer``), OIP gRPC
(``ModelInfer`` on ``host:port``) and OpenAI streaming (``POST /v1/chat/completions``). Each level
is a closed loop: ``C`` clients, each sending its next request when its answer is back, for ``-n``
requests or ``-d`` seconds after ``--warmup`` unrecorded requests. Every answer is checked (status,
and one result per row sent, or a complete SSE stream); failures are counted by status.

Request bodies are random rows (fixed seed) of the width and dtype the model's metadata names, or
the bodies of ``--body FILE``. The table shows successful req/s and latency per level; ``--json``
adds where the run happened (``--json -``: on stdout instead of the table), and ``--plot-dir``
writes ``latency.png`` and ``throughput.png``. Each level shows a progress bar (answers so far) on
a terminal's stderr; ``--no-progress`` turns them off.

OpenAI mode measures, per request, TTFT (first content chunk), the gaps between content chunks
(inter-token latency; chunks that arrive in one network read share a timestamp) and the output
tokens (the final usage chunk's ``completion_tokens``, else one per content chunk); GPU memory is
sampled with ``nvidia-smi`` where it exists. There is no servery LLM service yet, so the SSE
parsing and these metrics are unit-tested on realistic OpenAI byte streams; the end-to-end test
arrives with the LLM service.

This module is the command line and the report (table, JSON, plots); what is sent and checked is
in :mod:`bench.endpoints`, the OpenAI stream parsing in :mod:`bench.llm_stream`. Heavy imports
(numpy, aiohttp, grpc, matplotlib) stay inside functions: ``servery --help`` builds this parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.endpoints import Target

ENDPOINTS = ("rest", "oip-rest", "oip-grpc", "openai")
DEFAULT_REQUESTS = {"openai": 200}  # per level; 2000 for the others
DEFAULT_WARMUP = {"openai": 2}  # per level; 10 for the others
DESCRIPTION = """\
Load one endpoint at several concurrency levels (a closed loop of C clients per level) and
report successful req/s, latency percentiles and errors by status; for OpenAI streaming also
output tok/s, TTFT and inter-token latency, and GPU memory where nvidia-smi exists.
Exit code 2: the server is unreachable, the model unknown, or --body unreadable."""
EXAMPLES = """examples:
  servery bench --endpoint rest --url http://127.0.0.1:3000 --model iris
  servery bench --endpoint oip-grpc --url 127.0.0.1:3001 --model digits -c 1,8,32 -d 10 \\
      --json out/digits.json --plot-dir out/
  servery bench --endpoint openai --url http://127.0.0.1:3000 --model MODEL -c 1,8 -n 64"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``servery`` command's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="load an endpoint at several concurrency levels; table, JSON, plots",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--endpoint", choices=ENDPOINTS, required=True, help="protocol to load")
    p.add_argument("--url", required=True, help="base URL (http://host:port); host:port for gRPC")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument(
        "-c",
        "--concurrency",
        type=_levels,
        default=[1, 16, 64],
        metavar="C1,C2,...",
        help="concurrency levels (default 1,16,64)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "-n",
        "--requests",
        type=_positive(int),
        metavar="N",
        help="requests per level (default 2000; openai 200)",
    )
    length.add_argument(
        "-d", "--duration", type=_positive(float), metavar="S", help="seconds per level"
    )
    p.add_argument(
        "--rows-per-request", type=_positive(int), default=1, metavar="R", help="(default 1)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        metavar="N",
        help="unrecorded requests per level (default 10; openai 2)",
    )
    p.add_argument(
        "--body", type=Path, metavar="FILE", help="JSON: one request body or a list of bodies"
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the results here ('-': print them on stdout instead of the table)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--plot-dir", type=Path, metavar="DIR", help="write latency/throughput PNGs")
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--max-tokens", type=_positive(int), default=128, metavar="N")
    p.add_argument(
        "--timeout", type=_positive(float), default=60.0, metavar="S", help="per request"
    )
    p.set_defaults(func=run)
    return p


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,16,64, got {text!r}")
    return levels


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    """Run ``servery bench``; 0 when the run completed (errors are reported, not fatal)."""
    if args.requests is None and args.duration is None:
        args.requests = DEFAULT_REQUESTS.get(args.endpoint, 2000)
    if args.warmup is None:
        args.warmup = DEFAULT_WARMUP.get(args.endpoint, 10)
    import asyncio

    from bench.endpoints import BenchError, prepare, run_levels

    try:
        target = prepare(args)
        levels = asyncio.run(run_levels(target, args))
    except BenchError as e:
        print(f"servery bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    report = build_report(args, target, levels)
    if args.json is not None and str(args.json) == "-":
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    if args.json is not None and str(args.json) != "-":
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot_dir:
        write_plots(report, args.plot_dir)
    return 0


# --- report -----------------------------------------------------------------------------------


def build_report(
    args: argparse.Namespace, target: Target, levels: list[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON document: where and how the run happened, then one record per level."""
    import shlex
    from importlib.metadata import version

    from bench.report import machine

    client = "grpcio" if target.endpoint == "oip-grpc" else "aiohttp"
    command = getattr(args, "command_line", None) or shlex.join(["servery", *sys.argv[1:]])
    meta = machine(command, f"{client} {version(client)}")  # bentoml_home None on a client
    meta["servery"] = version("servery")
    report = {
        "meta": meta,
        "endpoint": args.endpoint,
        "url": args.url,
        "request_url": target.url,
        "model": args.model,
        "rows_per_request": None if args.body else args.rows_per_request,
        "requests_per_level": args.requests,
        "duration_s": args.duration,
        "warmup": args.warmup,
        "levels": levels,
    }
    if args.endpoint == "openai":
        prompt = None if args.body else args.prompt
        report["openai"] = {"prompt": prompt, "max_tokens": args.max_tokens}
    return report


def format_table(report: dict[str, Any]) -> str:
    """One line per level: ok req/s, latency percentiles, errors (and LLM numbers for openai)."""
    from bench.report import fmt, table

    llm = report["endpoint"] == "openai"
    header = ["concurrency", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors"]
    if llm:
        header += ["out tok/s", "TTFT p50 ms", "ITL p50 ms"]
    rows = []
    for r in report["levels"]:
        row = [str(r["concurrency"]), str(r["requests"]), fmt(r["ok_rps"])]
        row += [fmt(r[k], 2) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]
        row.append(str(r["errors"]) + (f" {r['status']}" if r["errors"] else ""))
        if llm:
            s = r["llm"]
            row += [fmt(s["output_tok_s"]), fmt(s["ttft_ms"]["p50"], 2), fmt(s["itl_ms"]["p50"], 2)]
        rows.append(row)
    title = f"{report['endpoint']} {report['request_url']} model={report['model']}"
    return title + "\n" + table(header, rows, markdown=False)


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """``latency.png`` (p50/p95/p99 vs concurrency) and ``throughput.png`` (req/s, tok/s)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    levels = report["levels"]
    xs = [r["concurrency"] for r in levels]
    title = f"{report['model']} — {report['endpoint']}"

    def axes(ylabel: str) -> tuple[Any, Any]:
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        FigureCanvasAgg(fig)  # no display: render with Agg
        ax = fig.add_subplot()
        if len(set(xs)) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set(xlabel="concurrency", ylabel=ylabel, title=title)
        ax.grid(True, alpha=0.3)
        return fig, ax

    fig, ax = axes("latency (ms)")
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        ax.plot(xs, [r[key] for r in levels], marker="o", label=key.split("_")[0])
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.savefig(latency := out_dir / "latency.png", dpi=100)

    fig, ax = axes("successful requests/s")
    ax.plot(xs, [r["ok_rps"] for r in levels], marker="o", label="req/s")
    ax.set_ylim(bottom=0)
    if report["endpoint"] == "openai":
        tok = ax.twinx()
        tok.plot(xs, [r["llm"]["output_tok_s"] for r in levels], "s--", color="C1", label="tok/s")
        tok.set(ylabel="output tokens/s", ylim=(0, None))
        tok.legend(loc="lower right")
    ax.legend(loc="upper left")
    fig.savefig(throughput := out_dir / "throughput.png", dpi=100)
    return [latency, throughput]

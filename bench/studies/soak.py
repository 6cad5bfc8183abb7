"""Soak: does a router's memory or GC pause time grow with the number of requests it serves?

    python -m bench.studies.soak [--model iris] [--protocol rest|grpc] [-c 64]
                                 [--phases 4] [--phase-seconds 15]

One ``bentoml serve`` (the model inline, default settings) is warmed up, then loaded for
``--phases`` equal phases back to back (wrk for OIP REST, h2load for OIP gRPC). After each phase
the benchmark records, for every process of the server (router workers, framework services, the
arbiter), its resident memory (RSS, psutil), and from the router's ``/metrics`` the requests
answered per status and ``servery_gc_pause_seconds`` (every collection's pause, by generation).

Phase 1 absorbs one-time growth (allocator pools, caches filling up). From phase 2 on nothing may
grow with the requests served: each process's RSS may drift by at most ``RSS_TOLERANCE_MB``
between phase 2 and the last; collections per 1,000 requests and the mean pause of a full (gen2)
collection in the last phase may be at most ``GC_GROWTH`` times phase 2's. Errors must be 0.

Issue 7's bounded soak is ``--phases 5 --phase-seconds 60`` (5 minutes at c=64). Writes
bench/out/soak.json and the "soak" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.grpc_load import H2LOAD_INSTALL_HINT, h2load_path, h2load_version, run_h2load
from bench.harness.processes import processes
from bench.harness.results import OUT_DIR, RESULTS_MD, run_line, use_model_store, write_section
from bench.harness.server import ROOT, Server, metric_samples, start_server
from bench.harness.subjects import N_BODIES, grpc_messages, load_subject, oip_body
from bench.harness.wrk import INSTALL_HINT, run_wrk, wrk_path, wrk_version
from bench.report import fmt, machine, table

OUT_JSON = OUT_DIR / "soak.json"
RSS_TOLERANCE_MB = 8.0
GC_GROWTH = 1.5
GC_NOISE_MS = 0.05


def rss_mb(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in procs.items():
        try:
            out[name] = proc.memory_info().rss / 2**20
        except psutil.Error:
            out[name] = float("nan")  # gone: a restarted worker shows up as a missing value
    return out


def scrape(server: Server, model: str) -> dict[str, Any]:
    """Requests by status for ``model`` and GC collections/pause seconds by generation."""
    requests: dict[str, float] = {}
    gc: dict[str, dict[str, float]] = {}
    for metric, fields, value in metric_samples(f"{server.url}/metrics"):
        if metric == "servery_requests_total" and fields.get("model") == model:
            status = fields.get("status", "?")
            requests[status] = requests.get(status, 0.0) + value
        elif metric in ("servery_gc_pause_seconds_count", "servery_gc_pause_seconds_sum"):
            entry = gc.setdefault(fields["generation"], {"count": 0.0, "seconds": 0.0})
            entry["count" if metric.endswith("_count") else "seconds"] += value
    return {"requests": requests, "gc": gc}


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    requests = {
        s: after["requests"].get(s, 0.0) - before["requests"].get(s, 0.0) for s in after["requests"]
    }
    gc = {
        g: {k: v - before["gc"].get(g, {}).get(k, 0.0) for k, v in stats.items()}
        for g, stats in after["gc"].items()
    }
    return {"requests": requests, "gc": gc}


def phase_summary(d: dict[str, Any], load: Any, rss: dict[str, float]) -> dict[str, Any]:
    answered = sum(d["requests"].values())
    ok = d["requests"].get("200", 0.0)
    pause_ms = 1000.0 * sum(g["seconds"] for g in d["gc"].values())
    collections = sum(g["count"] for g in d["gc"].values())
    gen2 = d["gc"].get("2", {"count": 0.0, "seconds": 0.0})
    return {
        "load": load.as_dict(),
        "answered": answered,
        "errors": answered - ok + load.errors,
        "gc_collections": collections,
        "gc_per_1k": 1000.0 * collections / answered if answered else 0.0,
        "gc_gen2": gen2["count"],
        "gc_gen2_mean_ms": 1000.0 * gen2["seconds"] / gen2["count"] if gen2["count"] else 0.0,
        "gc_pause_ms": pause_ms,
        "gc_pause_ms_per_1k": 1000.0 * pause_ms / answered if answered else 0.0,
        "rss_mb": rss,
    }


def verdicts(phases: list[dict[str, Any]]) -> list[str]:
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {text}")

    errors = sum(p["errors"] for p in phases)
    check(errors == 0, f"{errors:.0f} errors over {len(phases)} phases")
    if len(phases) < 3:
        lines.append("- (memory and GC growth need at least 3 phases)")
        return lines
    first, last = phases[1], phases[-1]
    for name, mb in last["rss_mb"].items():
        start = first["rss_mb"].get(name, float("nan"))
        growth = mb - start
        check(
            growth <= RSS_TOLERANCE_MB,
            f"{name}: RSS {start:.1f} -> {mb:.1f} MB from phase 2 to {len(phases)} "
            f"({growth:+.1f} MB, tolerance {RSS_TOLERANCE_MB:g} MB)",
        )
    # Collections per request follow allocations (a leak of tracked objects makes full ones
    # pricier, not more frequent); a full (gen2) collection's pause follows the heap it walks.
    # Both are compared, not the raw pause per request, which follows the VM's speed of the moment.
    a, b = first["gc_per_1k"], last["gc_per_1k"]
    check(
        b <= GC_GROWTH * a,
        f"collections per 1,000 requests {a:.1f} (phase 2) -> {b:.1f} (phase {len(phases)})"
        f" (at most {GC_GROWTH:g}x)",
    )
    a, b = first["gc_gen2_mean_ms"], last["gc_gen2_mean_ms"]
    check(
        b <= GC_GROWTH * a + GC_NOISE_MS,
        f"mean full (gen2) collection pause {a:.2f} ms (phase 2) -> {b:.2f} ms "
        f"(phase {len(phases)}) (at most {GC_GROWTH:g}x + {GC_NOISE_MS} ms)",
    )
    return lines


def report(phases: list[dict[str, Any]], markdown: bool) -> str:
    names = list(phases[0]["rss_mb"])
    header = ["phase", "req/s", "p99 ms", "answered", "errors", "GC/1k req", "gen2"]
    header += ["gen2 mean ms", "GC ms/1k req"]
    header += [f"{n} MB" for n in names]
    rows = []
    for i, p in enumerate(phases, 1):
        rows.append(
            [
                str(i),
                fmt(p["load"]["ok_rps"]),
                fmt(p["load"]["p99_ms"], 2),
                fmt(p["answered"], 0),
                fmt(p["errors"], 0),
                fmt(p["gc_per_1k"], 1),
                fmt(p["gc_gen2"], 0),
                fmt(p["gc_gen2_mean_ms"], 2),
                fmt(p["gc_pause_ms_per_1k"], 3),
                *(fmt(p["rss_mb"].get(n), 1) for n in names),
            ]
        )
    return table(header, rows, markdown)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.studies.soak", description=__doc__)
    p.add_argument("--model", default="iris", help="store name, served inline (default iris)")
    p.add_argument("--protocol", choices=("rest", "grpc"), default="rest")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--phases", type=int, default=4)
    p.add_argument("--phase-seconds", type=int, default=15)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    home = use_model_store()
    if args.protocol == "rest" and wrk_path() is None:
        raise SystemExit(INSTALL_HINT)
    if args.protocol == "grpc" and h2load_path() is None:
        raise SystemExit(H2LOAD_INSTALL_HINT)
    client = wrk_version() if args.protocol == "rest" else h2load_version()
    meta = machine(" ".join(["python -m bench.studies.soak", *map(shlex.quote, raw)]), client)
    subject = load_subject(args.model)
    rows = subject.rows[:N_BODIES]
    config = f"models:\n  - {{name: {args.model}, tag: {args.model}, placement: inline}}\n"
    phases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="servery-soak-") as tmp:
        server = start_server(home, config, Path(tmp))
        try:
            if args.protocol == "rest":
                url = f"{server.url}/v2/models/{args.model}/infer"
                bodies = [json.dumps(oip_body(r, ("predict",))) for r in rows]

                def load(seconds: int) -> Any:
                    return run_wrk(url, bodies, concurrency=args.concurrency, seconds=seconds)
            else:
                message = grpc_messages(args.model, rows)[0]

                def load(seconds: int) -> Any:
                    return run_h2load(
                        server.grpc_url, message, concurrency=args.concurrency, seconds=seconds
                    )

            load(5)  # warm-up, not recorded
            procs = processes(server)
            before = scrape(server, args.model)
            for i in range(args.phases):
                result = load(args.phase_seconds)
                after = scrape(server, args.model)
                phase = phase_summary(delta(after, before), result, rss_mb(procs))
                phases.append(phase)
                before = after
                print(
                    f"phase {i + 1}/{args.phases}: {result.line()}  GC "
                    f"{phase['gc_pause_ms_per_1k']:.3f} ms/1k req  RSS "
                    + ", ".join(f"{n} {mb:.1f}" for n, mb in phase["rss_mb"].items()),
                    flush=True,
                )
        finally:
            server.stop()
    checks = verdicts(phases)
    print("\n" + report(phases, markdown=False) + "\n\n" + "\n".join(checks))
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps({**meta, "phases": phases, "checks": checks}, indent=2))
    write_section(
        RESULTS_MD,
        "soak",
        "## Soak: memory and GC pauses against requests served\n\n"
        f"{run_line(meta)}\n\n"
        f"`{args.model}` inline, OIP V2 {args.protocol.upper()} at c={args.concurrency}, "
        f"{args.phases} phases of {args.phase_seconds} s back to back after a 5 s warm-up. RSS "
        "per server process after each phase (psutil); GC from the router's "
        "`servery_gc_pause_seconds` (all workers, every collection). Raw numbers: "
        "`bench/out/soak.json`.\n\n" + report(phases, markdown=True) + "\n\n" + "\n".join(checks),
    )
    print(f"wrote {OUT_JSON.relative_to(ROOT)} and the soak section of bench/RESULTS.md")
    return 0 if all(c.startswith("- PASS") or c.startswith("- (") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

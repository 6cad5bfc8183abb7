"""servery side by side with MLServer and a bare uvicorn + Starlette server, in one run.

    python -m bench.studies.peers [--models iris,breast_cancer_large] [--concurrency 1,16,64]
                                  [--duration 5] [--repeats 3] [--quick]

Three servers run at once on loopback, each serving the same stored models inline:

* **servery**: ``bentoml serve services:Router`` with its defaults (2 router workers, metrics and
  the access log on);
* **MLServer** 1.7 (``.venv-mlserver``, see :mod:`bench.harness.mlserver`), adaptive batching
  ``max_batch_size 64`` / ``max_batch_time 0.01`` (10 ms), ``parallel_workers 0``;
* **bare**: :mod:`bench.harness.bare_server`, uvicorn + Starlette running servery's own OIP handler,
  micro-batcher and runtime in 2 workers, without BentoML: the practical limit of a Python HTTP
  front end here.

Each server's answers are first checked against the model in this process (REST, and gRPC where
the server has it). Then, ``--repeats`` times, every (model, protocol, concurrency) is loaded on
each server in turn (the order rotates between repeats, so drift hits all servers alike): OIP V2
REST JSON with wrk, and OIP V2 gRPC with :mod:`bench.grpc_load` (grpc.aio; servery and MLServer;
the bare server has no gRPC). Every request is one row and asks for the ``predict`` output only,
so each server does the same work and answers the same bytes of data. The median run (by req/s)
and the median p99 of the repeats are reported, with the spread.

Afterwards servery's ``/metrics`` and log are read back, to show that its per-model request
counters and access log were on during the runs. Writes bench/out/peers.json and the "peers"
section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.grpc_load import H2LOAD_INSTALL_HINT, h2load_path, h2load_version
from bench.harness import mlserver
from bench.harness.bare_server import start_bare
from bench.harness.results import (
    OUT_DIR,
    RESULTS_MD,
    finish_run_arguments,
    run_arguments,
    run_line,
    use_model_store,
    write_section,
)
from bench.harness.server import ROOT, ServerProcess, metric_samples, start_server
from bench.harness.subjects import N_BODIES, OIP_DATATYPES, grpc_messages, load_subject, oip_body
from bench.harness.wrk import INSTALL_HINT, wrk_path, wrk_version
from bench.loadgen import LoadResult
from bench.report import fmt, machine, table

OUT_JSON = OUT_DIR / "peers.json"
DEFAULT_MODELS = ("iris", "breast_cancer_large")
SERVERS = ("servery", "mlserver", "bare")
PROTOCOLS = {"rest": "OIP V2 REST (JSON, wrk)", "grpc": "OIP V2 gRPC"}
OUTPUTS = ("predict",)


@dataclass
class Peer:
    """One server under test: where its REST and (optional) gRPC endpoints are."""

    name: str
    process: ServerProcess
    grpc_url: str | None
    metrics_url: str | None = None

    def infer_url(self, model: str) -> str:
        return f"{self.process.url}/v2/models/{model}/infer"

    def failures(self, model: str) -> float:
        """The server's own count of failed inferences of ``model`` so far (from /metrics).

        h2load cannot read gRPC status trailers, so gRPC runs compare this before and after.
        """
        if self.metrics_url is None:
            raise RuntimeError(f"{self.name} exports no failure counters")
        total = 0.0
        for metric, fields, value in metric_samples(self.metrics_url):
            if metric == "servery_requests_total":  # servery: HTTP-equivalent status per model
                # 499: the client reset the stream (h2load does so for the calls in flight when
                # its time is up); a client's choice, not a failure of the server
                bad = fields.get("model") == model and fields.get("status") not in ("200", "499")
            elif metric == "model_infer_request_failure_total":  # MLServer, per model
                bad = fields.get("model") == model
            elif metric == "grpc_server_handled_total":  # MLServer's gRPC interceptor
                code = fields.get("grpc_code")
                bad = fields.get("grpc_method") == "ModelInfer" and code not in ("OK", "CANCELLED")
            else:
                bad = False
            total += value if bad else 0.0
        return total


@contextlib.contextmanager
def peers(models: Sequence[str], names: Sequence[str], home: Path, tmp: Path) -> Iterator[dict]:
    """Start the servers in ``names``; all are stopped when the block ends."""
    config = "models:\n" + "".join(
        f"  - {{name: {m}, tag: {m}, placement: inline}}\n" for m in models
    )
    config_file = tmp / "models.yaml"
    config_file.write_text(config)
    started: dict[str, Peer] = {}
    try:
        if "servery" in names:
            print("starting servery (bentoml serve services:Router) ...", flush=True)
            s = start_server(home, config, tmp / "servery")
            started["servery"] = Peer("servery", s, s.grpc_url, s.url + "/metrics")
        if "mlserver" in names:
            print("starting MLServer ...", flush=True)
            mlserver.setup()
            repo = tmp / "mlserver"
            served = mlserver.prepare_repository(models, repo)
            missing = set(models) - set(served)
            if missing:
                raise SystemExit(f"MLServer cannot serve {sorted(missing)} (no runtime here)")
            m = mlserver.start_mlserver(repo)
            started["mlserver"] = Peer("mlserver", m, m.grpc_url, m.metrics_url)
        if "bare" in names:
            print("starting bare uvicorn + Starlette ...", flush=True)
            from models.config import Settings

            workers = Settings().router_workers
            started["bare"] = Peer("bare", start_bare(config_file, tmp, workers), None)
        yield started
    finally:
        for peer in started.values():
            peer.process.stop()


def verify(peer: Peer, name: str, rows: np.ndarray, labels: list[int]) -> None:
    """One REST (and gRPC) infer per row batch; raises unless ``predict`` equals ours."""
    for i in range(4):
        body = oip_body(rows[i], OUTPUTS)
        r = httpx.post(peer.infer_url(name), json=body, timeout=10)
        r.raise_for_status()
        got = np.asarray(r.json()["outputs"][0]["data"]).ravel().tolist()
        if got != [labels[i]]:
            raise RuntimeError(f"{peer.name} REST {name} row {i}: {got} != {[labels[i]]}")
    if peer.grpc_url is None:
        return
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=peer.grpc_url)
    try:
        for i in range(4):
            row = rows[i]
            x = grpcclient.InferInput("input-0", [1, len(row)], OIP_DATATYPES[row.dtype.name])
            x.set_data_from_numpy(np.ascontiguousarray(row[None, :]))
            out = [grpcclient.InferRequestedOutput("predict")]
            got = client.infer(name, [x], outputs=out).as_numpy("predict").ravel().tolist()
            if got != [labels[i]]:
                raise RuntimeError(f"{peer.name} gRPC {name} row {i}: {got} != {[labels[i]]}")
    finally:
        client.close()


def runner(
    peer: Peer, protocol: str, name: str, rows: np.ndarray, grpc_client: str = "h2load"
) -> Callable | None:
    """A ``(concurrency, seconds) -> LoadResult`` for ``peer``; None if it lacks ``protocol``."""
    if protocol == "rest":
        from bench.harness.wrk import run_wrk

        url = peer.infer_url(name)
        bodies = [json.dumps(oip_body(r, OUTPUTS)) for r in rows]

        def rest(concurrency: int, seconds: float) -> LoadResult:
            return run_wrk(url, bodies, concurrency=concurrency, seconds=max(1, round(seconds)))

        return rest
    if peer.grpc_url is None:
        return None
    from bench.grpc_load import measure_grpc, run_h2load

    messages = grpc_messages(name, rows)
    target = peer.grpc_url

    def grpc(concurrency: int, seconds: float) -> LoadResult:
        if grpc_client == "python":
            return measure_grpc(target, messages, concurrency=concurrency, seconds=seconds)
        before = peer.failures(name)
        result = run_h2load(target, messages[0], concurrency=concurrency, seconds=seconds)
        failed = int(peer.failures(name) - before)  # warm-up calls included: stricter
        if failed:
            result.status["grpc-failed (server count)"] = failed
            result.ok = max(0, result.ok - failed)
            result.errors += failed
        return result

    return grpc


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeats of one cell folded: the median-req/s run, the median p99 and the spreads."""
    by_rps = sorted(runs, key=lambda r: r["ok_rps"])
    mid = by_rps[len(by_rps) // 2]
    p99s = sorted(r["p99_ms"] for r in runs)
    return {
        **mid,
        "p99_ms": p99s[len(p99s) // 2],
        "ok_rps_range": [by_rps[0]["ok_rps"], by_rps[-1]["ok_rps"]],
        "p99_ms_range": [p99s[0], p99s[-1]],
        "errors_total": sum(r["errors"] for r in runs),
        "repeats": len(runs),
    }


def measure_all(
    started: dict[str, Peer],
    subjects: dict[str, Any],
    protocols: Sequence[str],
    concurrency: Sequence[int],
    seconds: float,
    repeats: int,
    grpc_client: str = "h2load",
) -> dict[str, Any]:
    """results[model][protocol][c][server] = folded runs (see :func:`median_run`)."""
    raw: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    order = list(started)
    for rep in range(repeats):
        rotated = order[rep % len(order) :] + order[: rep % len(order)]
        for name, subject in subjects.items():
            rows = subject.rows[:N_BODIES]
            for protocol in protocols:
                runners = {
                    s: runner(started[s], protocol, name, rows, grpc_client) for s in rotated
                }
                for c in concurrency:
                    for server, run in runners.items():
                        if run is None:
                            continue
                        run(c, 1)  # warm-up, dropped
                        result = run(c, seconds)
                        raw.setdefault((name, protocol, c, server), []).append(result.as_dict())
                        print(
                            f"  [{rep + 1}/{repeats}] {server:<8} {name:<20} {protocol:<4} "
                            + result.line(),
                            flush=True,
                        )
    results: dict[str, Any] = {}
    for (name, protocol, c, server), runs in raw.items():
        cell = results.setdefault(name, {}).setdefault(protocol, {}).setdefault(str(c), {})
        cell[server] = median_run(runs)
    return results


def servery_observability(peer: Peer, models: Sequence[str]) -> dict[str, Any]:
    """What servery's metrics and access log recorded during the run (proof they were on)."""
    counts: dict[str, float] = {}
    for metric, fields, value in metric_samples(peer.process.url + "/metrics"):
        if metric == "servery_requests_total" and fields.get("model") in models:
            key = f"{fields['model']} status={fields.get('status', '?')}"
            counts[key] = counts.get(key, 0.0) + value
    log = peer.process.log.read_text(errors="replace")
    lines = log.splitlines()
    access_lines = sum(1 for line in lines if "/v2/models/" in line and "status=" in line)
    return {"servery_requests_total": counts, "access_log_lines": access_lines}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def cell_value(cell: dict[str, Any], server: str, key: str) -> float | None:
    run = cell.get(server)
    return None if run is None else run[key]


GRPC_CLIENTS = {"h2load": "h2load", "python": "grpc.aio client"}


def report(
    results: dict[str, Any],
    servers: Sequence[str],
    concurrency: Sequence[int],
    markdown: bool,
    grpc_client: str = "h2load",
) -> str:
    parts = []
    for name, by_protocol in results.items():
        for protocol, by_c in by_protocol.items():
            present = [s for s in servers if any(s in by_c[str(c)] for c in concurrency)]
            header = ["c"]
            for s in present:
                header += [f"{s} req/s", "p50 ms", "p99 ms", "err"]
            others = [s for s in present if s != "servery"]
            header += [f"servery/{s} req/s" for s in others]
            header += [f"servery/{s} p99" for s in others]
            rows = []
            for c in concurrency:
                cell = by_c[str(c)]
                row = [str(c)]
                for s in present:
                    run = cell.get(s)
                    if run is None:
                        row += ["-"] * 4
                        continue
                    lo, hi = run["ok_rps_range"]
                    spread = f" ({fmt(lo, 0)}-{fmt(hi, 0)})" if run["repeats"] > 1 else ""
                    row += [
                        fmt(run["ok_rps"]) + spread,
                        fmt(run["p50_ms"], 2),
                        fmt(run["p99_ms"], 2),
                        str(run["errors_total"]),
                    ]
                for s in others:
                    r = ratio(cell_value(cell, "servery", "ok_rps"), cell_value(cell, s, "ok_rps"))
                    row.append("-" if r is None else f"{r:.2f}x")
                for s in others:
                    r = ratio(cell_value(cell, "servery", "p99_ms"), cell_value(cell, s, "p99_ms"))
                    row.append("-" if r is None else f"{r:.2f}x")
                rows.append(row)
            title = f"{name}, {PROTOCOLS[protocol]}"
            if protocol == "grpc":
                title += f" ({GRPC_CLIENTS[grpc_client]})"
            head = f"### {title}\n\n" if markdown else f"{title}\n"
            parts.append(head + table(header, rows, markdown))
    return "\n\n".join(parts)


def targets(results: dict[str, Any], concurrency: Sequence[int]) -> list[str]:
    """The issue's peer targets, PASS/FAIL per model (only for what was measured)."""
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {text}")

    for name, by_protocol in results.items():
        rest = by_protocol.get("rest", {})
        grpc = by_protocol.get("grpc", {})
        if "64" in rest:
            cell = rest["64"]
            r = ratio(cell_value(cell, "servery", "ok_rps"), cell_value(cell, "mlserver", "ok_rps"))
            p = ratio(cell_value(cell, "servery", "p99_ms"), cell_value(cell, "mlserver", "p99_ms"))
            if r is not None and p is not None:
                check(
                    r >= 4 and p <= 0.25,
                    f"{name} REST c=64: {r:.2f}x MLServer req/s (>= 4x), "
                    f"p99 {p:.2f}x its p99 (<= 0.25x)",
                )
            b = ratio(cell_value(cell, "servery", "ok_rps"), cell_value(cell, "bare", "ok_rps"))
            if b is not None:
                check(b >= 0.5, f"{name} REST c=64: {b:.2f}x bare uvicorn + Starlette (>= 0.5x)")
        if "64" in grpc:
            cell = grpc["64"]
            r = ratio(cell_value(cell, "servery", "ok_rps"), cell_value(cell, "mlserver", "ok_rps"))
            if r is not None:
                check(r >= 2, f"{name} gRPC c=64: {r:.2f}x MLServer gRPC req/s (>= 2x)")
        if "1" in rest and "servery" in rest["1"]:
            p50 = rest["1"]["servery"]["p50_ms"]
            check(p50 <= 3, f"{name} REST c=1: servery p50 {p50:.2f} ms (<= 3 ms)")
        errors = sum(
            run["errors_total"]
            for by_c in by_protocol.values()
            for cell in by_c.values()
            for run in cell.values()
        )
        check(errors == 0, f"{name}: {errors} errors over every run of every server")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.studies.peers", description=__doc__)
    run_arguments(p, ",".join(DEFAULT_MODELS), "2 s runs, 1 repeat")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell (median reported)")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma list: " + ",".join(SERVERS))
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma list: rest,grpc")
    p.add_argument(
        "--grpc-client",
        choices=sorted(GRPC_CLIENTS),
        default="h2load",
        help="gRPC load generator: h2load (C, default) or python (grpc.aio, bench.grpc_load)",
    )
    args = p.parse_args(argv)
    finish_run_arguments(args)
    if args.quick:
        args.repeats = 1
    args.servers = [s for s in args.servers.split(",") if s]
    args.protocols = [s for s in args.protocols.split(",") if s]
    unknown = (set(args.servers) - set(SERVERS)) | (set(args.protocols) - set(PROTOCOLS))
    if unknown:
        p.error(f"unknown server or protocol: {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    home = use_model_store()
    if wrk_path() is None:
        raise SystemExit(INSTALL_HINT)
    if "grpc" in args.protocols and args.grpc_client == "h2load" and h2load_path() is None:
        raise SystemExit(H2LOAD_INSTALL_HINT + " (or --grpc-client python)")
    clients = [wrk_version() or "wrk"]
    if args.grpc_client == "h2load":
        clients.append(h2load_version() or "h2load")
    else:
        clients.append(f"grpcio {version('grpcio')} grpc.aio (bench.grpc_load)")
    command = " ".join(["python -m bench.studies.peers", *map(shlex.quote, raw)])
    meta = machine(command, "; ".join(clients))
    meta["mlserver"] = mlserver.requirements()[0][0]
    subjects = {m: load_subject(m) for m in args.models}
    with tempfile.TemporaryDirectory(prefix="servery-peers-") as tmp:
        with peers(args.models, args.servers, home, Path(tmp)) as started:
            for peer in started.values():
                for name, s in subjects.items():
                    verify(peer, name, s.rows, s.expected)
            print("answers checked: every server predicts what the model does in-process")
            results = measure_all(
                started,
                subjects,
                args.protocols,
                args.concurrency,
                args.duration,
                args.repeats,
                args.grpc_client,
            )
            observed = (
                servery_observability(started["servery"], args.models)
                if "servery" in started
                else {}
            )
    text = report(results, args.servers, args.concurrency, False, args.grpc_client)
    checks = targets(results, args.concurrency)
    print("\n" + text + "\n\n" + "\n".join(checks))
    print("servery observability during the run:", json.dumps(observed))
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    record = {**meta, "results": results, "targets": checks, "servery_observed": observed}
    OUT_JSON.write_text(json.dumps(record, indent=2))
    write_section(
        RESULTS_MD,
        "peers",
        "## Side by side: servery, MLServer, bare uvicorn + Starlette\n\n"
        f"{run_line(meta)} MLServer: {meta['mlserver']}.\n\n"
        "Three servers up at once, same stored models inline; single-row OIP V2 requests asking "
        "for `predict`; each cell is the median of "
        f"{args.repeats} run(s) of {args.duration:g} s (req/s range in brackets), servers "
        "loaded in turn, order rotated per repeat. `err` sums non-OK answers over the repeats. "
        "servery runs with its defaults: metrics and access log on "
        f"(read back after the run: {json.dumps(observed)}). Raw numbers: "
        "`bench/out/peers.json`.\n\n"
        + report(results, args.servers, args.concurrency, True, args.grpc_client)
        + "\n\n### Targets\n\n"
        + "\n".join(checks)
        + "\n",
    )
    print(f"wrote {OUT_JSON.relative_to(ROOT)} and the peers section of bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

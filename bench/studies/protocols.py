"""The protocols benchmark: one router, one model, native REST vs OIP V2 REST vs OIP V2 gRPC.

    python -m bench.studies.protocols [--models iris,breast_cancer_large] [--concurrency 1,16,64]
                                      [--duration 5] [--quick]

One router serves every chosen model ``inline`` (from BentoML's model store, $BENTOML_HOME, else
~/bentoml, as for ``make``). For each model and concurrency, single-row requests (rows from the
model's own dataset, :mod:`bench.harness.subjects`) go through:

* native REST ``POST /predict``, loaded with wrk;
* OIP V2 REST JSON ``POST /v2/models/<m>/infer`` (``input-0``, ``[1, n]``, the model's own
  datatype from ``GET /v2/models/<m>``), loaded with wrk;
* the same OIP REST requests loaded with the Python aiohttp client (bench.loadgen);
* OIP V2 gRPC ``ModelInfer`` with ``raw_input_contents`` (as tritonclient.grpc sends), loaded with
  the Python grpc.aio client (bench.grpc_load).

wrk is compiled; the two Python clients take CPU from the server on a 2-core machine, so gRPC is
compared with OIP REST *through the Python client* (ratio gRPC/REST), and OIP REST with native REST
through wrk (ratio OIP-REST/native). Every protocol is checked with one request (the in-process
prediction for that row) before it is loaded. Writes bench/out/protocols.json (raw numbers) and
the "protocols" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from bench.grpc_load import infer_request, measure_grpc
from bench.harness.results import (
    OUT_DIR,
    RESULTS_MD,
    finish_run_arguments,
    run_arguments,
    run_line,
    use_model_store,
    write_section,
)
from bench.harness.server import ROOT, Server, logged_errors, start_server
from bench.harness.subjects import (
    N_BODIES,
    Subject,
    load_subject,
    predict_bodies,
    verify_predict,
)
from bench.harness.wrk import INSTALL_HINT, measure, wrk_path, wrk_version
from bench.loadgen import LoadResult
from bench.report import fmt, machine, table

OUT_JSON = OUT_DIR / "protocols.json"
DEFAULT_MODELS = ("iris", "breast_cancer_large")
PROTOCOLS = {
    "native": "native REST wrk",
    "oip_rest": "OIP REST wrk",
    "oip_rest_aiohttp": "OIP REST aiohttp",
    "oip_grpc": "OIP gRPC grpc.aio",
}
RATIOS = {
    "gRPC/REST (aiohttp)": ("oip_grpc", "oip_rest_aiohttp"),
    "OIP-REST/native (wrk)": ("oip_rest", "native"),
}
PY_CLIENT_NOTE = (
    "wrk is compiled; the aiohttp and grpc.aio clients are Python and take CPU from the server "
    "on this machine (see 'client CPU'), so compare gRPC with OIP REST through aiohttp, client "
    "for client, and the wrk rows with each other."
)
JSON = {"content-type": "application/json"}


@dataclass
class Prepared:
    """One model's requests for every protocol, the same rows in the same order."""

    subject: Subject
    datatype: str
    native: list[str]
    oip_json: list[str]
    grpc: list[pb.ModelInferRequest]


def model_datatype(server: Server, name: str) -> str:
    """The model's input datatype (``FP32``/``FP64``) from OIP ``GET /v2/models/<m>``."""
    import httpx

    meta = httpx.get(f"{server.url}/v2/models/{name}", timeout=10).raise_for_status().json()
    return str(meta["inputs"][0]["datatype"])


def prepare(server: Server, subject: Subject) -> Prepared:
    """Native bodies, OIP JSON bodies and gRPC messages, one row each."""
    datatype = model_datatype(server, subject.name)
    rows = subject.rows[:N_BODIES]
    n = rows.shape[1]
    oip_json = [
        json.dumps(
            {"inputs": [{"name": "input-0", "shape": [1, n], "datatype": datatype, "data": r}]}
        )
        for r in rows.tolist()
    ]
    grpc = [infer_request(subject.name, rows[i : i + 1], datatype) for i in range(len(rows))]
    return Prepared(subject, datatype, predict_bodies(subject), oip_json, grpc)


def oip_url(server: Server, name: str) -> str:
    return f"{server.url}/v2/models/{name}/infer"


def verify_oip_rest(server: Server, p: Prepared) -> None:
    """One OIP REST request must answer 200 with the in-process prediction of its row."""
    import httpx

    resp = httpx.post(oip_url(server, p.subject.name), content=p.oip_json[0], headers=JSON)
    want = p.subject.expected[0]
    try:
        out = {o["name"]: o for o in resp.json()["outputs"]}
        ok = out["predict"]["data"] == [want] and out["predict_proba"]["shape"][0] == 1
    except (ValueError, KeyError, IndexError, TypeError):
        ok = False
    if resp.status_code != 200 or not ok:
        raise RuntimeError(
            f"OIP REST for {p.subject.name}: expected 200 with predict [{want}], got "
            f"{resp.status_code}: {resp.text[:500]}\nserver log:\n{server.log_tail()}"
        )


def verify_grpc(server: Server, p: Prepared) -> None:
    """One gRPC ModelInfer must answer with the in-process prediction of its row."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    want = p.subject.expected[0]
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(p.grpc[0], timeout=10)
        except grpc.RpcError as e:
            raise RuntimeError(
                f"OIP gRPC for {p.subject.name}: {e.code().name}: {e.details()}\n"
                f"server log:\n{server.log_tail()}"
            ) from e
    names = [o.name for o in response.outputs]
    raw = response.raw_output_contents[names.index("predict")] if "predict" in names else b""
    got = np.frombuffer(raw, dtype="<i8").tolist()
    if got != [want]:
        raise RuntimeError(f"OIP gRPC for {p.subject.name}: expected predict [{want}], got {got}")


def client_cpu(run: Callable[[], LoadResult]) -> tuple[LoadResult, float]:
    """Run one load and return it with the cores its client used on average (self + wrk)."""
    t0, c0 = time.perf_counter(), time.process_time()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    cpu = time.process_time() - c0 + children
    return result, cpu / (time.perf_counter() - t0)


def load_one(
    server: Server, p: Prepared, protocol: str, c: int, seconds: float
) -> tuple[LoadResult, dict[str, Any]]:
    """Warm up, then load one protocol at concurrency ``c``; the result and its JSON record."""
    if protocol == "oip_grpc":  # run_grpc_load warms up for 1 s itself
        target, messages = server.grpc_url, p.grpc
        result, cpu = client_cpu(
            lambda: measure_grpc(target, messages, concurrency=c, seconds=seconds)
        )
        return result, {**result.as_dict(), "client_cpu": cpu}
    native = protocol == "native"
    url = f"{server.url}/predict" if native else oip_url(server, p.subject.name)
    body = p.native if native else p.oip_json
    client = "aiohttp" if protocol == "oip_rest_aiohttp" or wrk_path() is None else "wrk"
    measure(url, body, concurrency=c, seconds=1, client=client)  # warm-up, not recorded
    offset = server.log.stat().st_size
    result, cpu = client_cpu(
        lambda: measure(url, body, concurrency=c, seconds=seconds, client=client)
    )
    logged = logged_errors(server, offset, path=url.removeprefix(server.url))
    return result, {**result.as_dict(), "client_cpu": cpu, "server_log_errors": logged}


def load_model(
    server: Server, p: Prepared, labels: dict[str, str], args: argparse.Namespace
) -> dict[str, dict[int, dict[str, Any]]]:
    """Verify every protocol, then load each in turn at every concurrency.

    Protocols alternate within a concurrency, so a drift of the machine during the run (another
    process, thermal limits) touches every protocol alike.
    """
    verify_predict(server, p.native[0], p.subject, "native REST")
    verify_oip_rest(server, p)
    verify_grpc(server, p)
    runs: dict[str, dict[int, dict[str, Any]]] = {key: {} for key in labels}
    for c in args.concurrency:
        for key, label in labels.items():
            result, runs[key][c] = load_one(server, p, key, c, args.duration)
            errs = f"  {error_detail(runs[key][c])}" if result.errors else ""
            cpu = runs[key][c]["client_cpu"]
            print(f"  {p.subject.name:<20} {label:<18} {result.line()}  cpu {cpu:.2f}{errs}")
    return runs


def error_detail(run: dict[str, Any]) -> str:
    """Errors by status: gRPC codes, or the client's counts and the server's access log."""
    bad = {k: v for k, v in run["status"].items() if k not in ("OK", "200", "2xx/3xx")}
    logged = run.get("server_log_errors")
    return f"{bad}" + (f", server log {logged}" if logged else "")


def plan(has_wrk: bool) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """The protocols to run (key -> label) and the ratios to report (name -> (x, y)).

    Without wrk, native REST runs through aiohttp and the OIP REST wrk row is dropped.
    """
    if has_wrk:
        return dict(PROTOCOLS), dict(RATIOS)
    labels = {k: v for k, v in PROTOCOLS.items() if k != "oip_rest"}
    labels["native"] = "native REST aiohttp"
    ratio = {k: v for k, v in RATIOS.items() if "native" not in v}
    ratio["OIP-REST/native (aiohttp)"] = ("oip_rest_aiohttp", "native")
    return labels, ratio


def ratios(
    runs: dict[str, dict[int, dict[str, Any]]],
    defs: dict[str, tuple[str, str]],
    conc: Sequence[int],
) -> dict[str, dict[int, float | None]]:
    """ok req/s ratios ``x/y`` at each concurrency (None where a side is missing or zero)."""
    out: dict[str, dict[int, float | None]] = {}
    for key, (x, y) in defs.items():
        out[key] = {}
        for c in conc:
            num, den = runs.get(x, {}).get(c), runs.get(y, {}).get(c)
            out[key][c] = num["ok_rps"] / den["ok_rps"] if num and den and den["ok_rps"] else None
    return out


def _cells(run: dict[str, Any] | None) -> list[str]:
    if run is None:
        return ["-"] * 4
    return [fmt(run["ok_rps"]), fmt(run["p50_ms"], 2), fmt(run["p99_ms"], 2), str(run["errors"])]


def report(
    results: dict[str, dict[str, Any]],
    labels: dict[str, str],
    conc: Sequence[int],
    markdown: bool,
) -> str:
    """Per model: a protocol x concurrency table, then ratios and client CPU, then errors."""
    parts: list[str] = []
    bullet = "- " if markdown else "  "
    for name, r in results.items():
        title = f"{name} ({r['framework']}, {r['n_features']} features, {r['datatype']})"
        header = ["protocol"]
        for c in conc:
            header += [f"c={c} ok req/s", "p50 ms", "p99 ms", "err"]
        rows = [
            [labels[key]] + [cell for c in conc for cell in _cells(runs.get(c))]
            for key, runs in r["runs"].items()
        ]
        heading = f"### {title}\n\n" if markdown else f"== {title} ==\n"
        parts.append(heading + table(header, rows, markdown))
        ratio_rows = [
            [key] + [fmt(v, 2) + ("x" if v is not None else "") for v in by_c.values()]
            for key, by_c in r["ratios"].items()
        ]
        parts.append(table(["ok req/s ratio"] + [f"c={c}" for c in conc], ratio_rows, markdown))
        cpu_rows = [
            [labels[key]] + [fmt(runs[c]["client_cpu"], 2) if c in runs else "-" for c in conc]
            for key, runs in r["runs"].items()
        ]
        header = ["client CPU (cores)"] + [f"c={c}" for c in conc]
        parts.append(table(header, cpu_rows, markdown))
        errors = [
            f"{bullet}{labels[key]} c={c}: {error_detail(run)}"
            for key, runs in r["runs"].items()
            for c, run in runs.items()
            if run["errors"]
        ]
        parts.append("Errors by status:" + (" none" if not errors else "\n" + "\n".join(errors)))
    parts.append(f"Note: {PY_CLIENT_NOTE}")
    return "\n\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(p, ",".join(DEFAULT_MODELS), "2 s runs")
    args = p.parse_args(argv)
    finish_run_arguments(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write bench/out/protocols.json and bench/RESULTS.md ("protocols")."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    home = use_model_store()
    has_wrk = wrk_path() is not None
    if not has_wrk:
        print(f"WARNING: {INSTALL_HINT}\nnative REST runs through aiohttp.", file=sys.stderr)
    labels, ratio_defs = plan(has_wrk)
    clients = [
        wrk_version() or "no wrk",
        f"aiohttp {version('aiohttp')} (bench.loadgen)",
        f"grpcio {version('grpcio')} grpc.aio (bench.grpc_load)",
    ]
    command = " ".join(["python -m bench.studies.protocols", *map(shlex.quote, raw)])
    meta = machine(command, "; ".join(clients))
    print(f"model store: {home / 'models'}; clients: {meta['client']}", flush=True)
    print(f"Note: {PY_CLIENT_NOTE}", flush=True)

    subjects = [load_subject(m) for m in args.models]
    config = "models:\n" + "".join(
        f"  - {{name: {m}, tag: {m}, placement: inline}}\n" for m in args.models
    )
    results: dict[str, dict[str, Any]] = {}
    print("starting services:Router ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="servery-bench-") as tmp:
        server = start_server(home, config, Path(tmp))
        try:
            for s in subjects:
                p = prepare(server, s)
                runs = load_model(server, p, labels, args)
                results[s.name] = {
                    "framework": s.framework,
                    "version": s.runtime.info.version,
                    "n_features": s.runtime.info.n_features,
                    "datatype": p.datatype,
                    "runs": runs,
                    "ratios": ratios(runs, ratio_defs, args.concurrency),
                }
        finally:
            server.stop()

    text = report(results, labels, args.concurrency, markdown=False)
    print("\n" + text)
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    record = {**meta, "note": PY_CLIENT_NOTE, "protocols": labels, "models": results}
    OUT_JSON.write_text(json.dumps(record, indent=2))
    write_section(
        RESULTS_MD,
        "protocols",
        "## Protocols benchmark\n\n"
        f"{run_line(meta)}\n\n"
        "One router, every model inline; single-row requests per protocol and concurrency: "
        "successful answers per second, latency, and `err` (every non-OK answer or socket "
        "error); ratios of ok req/s measured in this run; client CPU is the cores the load "
        "generator itself used (wrk, or this Python process). Raw numbers: "
        "`bench/out/protocols.json`.\n\n"
        + report(results, labels, args.concurrency, markdown=True),
    )
    print(f"wrote {OUT_JSON.relative_to(ROOT)} and {RESULTS_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

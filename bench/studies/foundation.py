"""The foundation benchmark: what the router adds, and what batching buys, per model.

    python -m bench.studies.foundation [--models iris,digits_large] [--concurrency 1,16,64]
                                       [--duration 5] [--quick] [--client wrk|aiohttp]
                                       [--gain-repeats 5]

Single-row ``POST /predict`` requests (rows from the model's own dataset) for each model and
concurrency, through:

(a) the router, model ``inline`` (config entry ``<m>``);
(b) the router, model in its framework service (``<m>-svc``, placement ``service``);
(c) the framework service called directly (``bentoml serve services.<fw>_service:<Class>``) —
    the baseline every ratio divides by, with (d) for the batching gain;
(d) the router, inline, micro-batching off (``<m>-nobatch``, ``max_batch_size: 1``);
(e) the model's runtime in this process: one row per call, and one 4,096-row call (the ceiling).

The batching gain of the large models is then measured again on its own, interleaved: one router and
one bare uvicorn + Starlette server (:mod:`bench.harness.bare_server`: the router's own OIP handler,
batcher and runtime with no BentoML) each serve ``<m>`` and ``<m>-nobatch`` inline, and OIP V2 REST
loads at c=64 alternate batched / batching off ``--gain-repeats`` times (the a/d cells above are
single runs minutes apart on a noisy VM); the median of the per-pair ratios is the gain, and the CPU
the server's workers used per answered request says where the ceiling is: batching can save the
model's per-call cost, never the front end's per-request cost, so the gain is at most (CPU per
request, batching off) / (CPU per request, batched), and the bare server's gain is what a Python
HTTP front end allows for that model on this machine.

One router serves (a), (b) and (d); then one standalone service per framework serves (c); never
two servers at once. Each configuration is checked with one request (200, the in-process
prediction) before it is loaded. Writes bench/out/foundation.json (raw numbers) and the
"foundation" section of bench/RESULTS.md. The store is BentoML's standard one, $BENTOML_HOME, else
~/bentoml (as for ``make``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.bare_server import start_bare
from bench.harness.processes import cpu_seconds, router_workers
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
    oip_bodies,
    predict_bodies,
    verify_predict,
)
from bench.harness.wrk import INSTALL_HINT, measure, wrk_path, wrk_version
from bench.report import fmt, table
from bench.report import machine as report_machine

OUT_JSON = OUT_DIR / "foundation.json"
SMALL_MODELS = ("iris", "breast_cancer", "digits")
ALL_MODELS = (*SMALL_MODELS, *(f"{m}_large" for m in SMALL_MODELS))
CONFIGS = {
    "a": "(a) router inline",
    "b": "(b) router->service",
    "c": "(c) service direct",
    "d": "(d) batching off",
}
RATIOS = {"a/c": ("a", "c"), "b/c": ("b", "c"), "a/d": ("a", "d"), "b/d": ("b", "d")}
SERVICE_TARGETS = {
    "sklearn": "services:SklearnService",
    "xgboost": "services:XGBoostService",
    "pytorch": "services:TorchService",
}
TARGETS = (
    "through the router at c=64 at least 2x what the framework service serves when called "
    "directly; batching >= 3x unbatched on the large models at c=64; 0 errors"
)
GAIN_CONCURRENCY = 64
GAIN_SERVERS = ("servery", "bare")


def measure_inproc(
    subject: Subject, one_rows: int, batch_rows: int, max_s: float
) -> dict[str, float]:
    """(e): ``runtime.predict`` rows/s one row per call (stops after ``max_s``) and batched."""
    predict, rows = subject.runtime.predict, subject.rows
    x = rows[np.arange(max(one_rows, batch_rows)) % len(rows)]  # cycle the dataset
    start = time.perf_counter()
    done = 0
    for i in range(one_rows):
        predict(x[i : i + 1])
        done += 1
        if time.perf_counter() - start > max_s:
            break
    one = done / (time.perf_counter() - start)
    xb = np.ascontiguousarray(x[:batch_rows])
    predict(xb)  # first big call allocates (torch, xgboost); time the ones after
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        predict(xb)
        best = min(best, time.perf_counter() - t0)
    return {
        "one_by_one_rows": done,
        "one_by_one_rows_per_s": one,
        "batch_rows": batch_rows,
        "batched_rows_per_s": batch_rows / best,
    }


def models_yaml(names: Sequence[str], service: bool = True) -> str:
    """The config for every server: ``<m>`` inline, ``<m>-svc`` service (unless not
    ``service``: the interleaved gain servers, the bare one serves inline models only),
    ``<m>-nobatch``."""
    lines = ["models:"]
    for m in names:
        lines += [f"  - {{name: {m}, tag: {m}, placement: inline}}"]
        if service:
            lines += [f"  - {{name: {m}-svc, tag: {m}, placement: service}}"]
        lines += [f"  - {{name: {m}-nobatch, tag: {m}, placement: inline, max_batch_size: 1}}"]
    return "\n".join(lines) + "\n"


def bodies(subject: Subject, config: str) -> list[str]:
    """JSON bodies, one row each: router bodies for (a), (b), (d); service bodies for (c)."""
    if config == "c":
        rows = subject.rows[:N_BODIES].tolist()
        return [json.dumps({"rows": [{"model": f"{subject.name}-svc", "inputs": r}]}) for r in rows]
    served = {"a": subject.name, "b": f"{subject.name}-svc", "d": f"{subject.name}-nobatch"}
    return predict_bodies(subject, served[config])


def load_runs(
    server: Server, subject: Subject, config: str, args: argparse.Namespace
) -> dict[int, dict[str, Any]]:
    """Verify one configuration, then warm up and load it at every concurrency."""
    url, body = f"{server.url}/predict", bodies(subject, config)
    verify_predict(server, body[0], subject, CONFIGS[config], service=config == "c")
    out: dict[int, dict[str, Any]] = {}
    for c in args.concurrency:
        kw: dict[str, Any] = {"concurrency": c, "client": args.client}
        measure(url, body, seconds=1, **kw)  # warm-up, not recorded
        offset = server.log.stat().st_size
        result = measure(url, body, seconds=args.duration, **kw)
        out[c] = {**result.as_dict(), "server_log_errors": logged_errors(server, offset)}
        extra = f"  {out[c]['server_log_errors']}" if result.errors else ""
        print(f"  {subject.name:<20} {CONFIGS[config]:<20} {result.line()}{extra}", flush=True)
    return out


def serve_and_load(
    home: Path,
    config_yaml: str,
    target: str,
    jobs: Sequence[tuple[Subject, str]],
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
) -> None:
    """Start one server for ``target``, run every (subject, config) job on it, always stop it."""
    print(f"starting {target} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="servery-bench-") as tmp:
        server = start_server(home, config_yaml, Path(tmp), target=target)
        try:
            for subject, config in jobs:
                results[subject.name]["http"][config] = load_runs(server, subject, config, args)
        finally:
            server.stop()


def ratios(http: dict[str, dict[int, dict[str, Any]]], conc: Sequence[int]) -> dict[str, Any]:
    """req/s ratios ``x/y`` at each concurrency (None where a side is missing or zero)."""
    out: dict[str, dict[int, float | None]] = {}
    for key, (x, y) in RATIOS.items():
        out[key] = {}
        for c in conc:
            num, den = http.get(x, {}).get(c), http.get(y, {}).get(c)
            out[key][c] = num["ok_rps"] / den["ok_rps"] if num and den and den["ok_rps"] else None
    return out


def summarize_gain(windows: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians of alternating runs: ``windows`` maps ``batched``/``off`` to one dict per run
    (``ok_rps``, ``cpu_us``: worker CPU per answered request, ``errors``), in pairs."""
    pairs = zip(windows["batched"], windows["off"], strict=True)
    ratios_ = [b["ok_rps"] / o["ok_rps"] if o["ok_rps"] else 0.0 for b, o in pairs]
    med = {
        k: {f: statistics.median(w[f] for w in runs) for f in ("ok_rps", "cpu_us")}
        for k, runs in windows.items()
    }
    return {
        "gain": statistics.median(ratios_),
        "gains": ratios_,
        "ok_rps_batched": med["batched"]["ok_rps"],
        "ok_rps_off": med["off"]["ok_rps"],
        "cpu_us_batched": med["batched"]["cpu_us"],
        "cpu_us_off": med["off"]["cpu_us"],
        "errors": int(sum(w["errors"] for runs in windows.values() for w in runs)),
        "runs": windows,
    }


def alternate(
    url_of: Callable[[str], str],
    workers: list[Any],
    subject: Subject,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """``subject`` batched vs batching off on one server, alternating, with worker CPU."""
    body = oip_bodies(subject)
    urls = {"batched": url_of(subject.name), "off": url_of(f"{subject.name}-nobatch")}
    kw: dict[str, Any] = {"concurrency": GAIN_CONCURRENCY, "client": args.client}
    for url in urls.values():
        measure(url, body, seconds=1, **kw)  # warm-up, not recorded
    windows: dict[str, list[dict[str, float]]] = {"batched": [], "off": []}
    for rep in range(args.gain_repeats):
        for key in ("batched", "off") if rep % 2 == 0 else ("off", "batched"):
            used = cpu_seconds(workers)
            result = measure(urls[key], body, seconds=args.duration, **kw)
            used = cpu_seconds(workers) - used
            windows[key].append(
                {
                    "ok_rps": result.ok_rps,
                    "cpu_us": used / max(result.ok, 1) * 1e6,
                    "errors": result.errors,
                    "p99_ms": result.p99_ms,
                }
            )
    return summarize_gain(windows)


def interleaved_gains(
    home: Path, subjects: Sequence[Subject], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Per subject and server (servery, bare): the interleaved batching gain at c=64."""
    import psutil

    from models.config import Settings

    out: dict[str, dict[str, Any]] = {s.name: {} for s in subjects}
    config = models_yaml([s.name for s in subjects], service=False)
    with tempfile.TemporaryDirectory(prefix="servery-bench-gain-") as tmp_name:
        tmp = Path(tmp_name)
        for server_name in GAIN_SERVERS:
            print(f"starting {server_name} for the interleaved batching gain ...", flush=True)
            if server_name == "servery":
                server = start_server(home, config, tmp / server_name)
                process, workers = server, router_workers(server)
            else:
                config_file = tmp / "gain-models.yaml"
                config_file.write_text(config)
                process = start_bare(config_file, tmp, Settings().router_workers)
                workers = psutil.Process(process.proc.pid).children(recursive=True)
            try:
                for s in subjects:
                    url_of = f"{process.url}/v2/models/{{}}/infer".format
                    g = alternate(url_of, workers, s, args)
                    out[s.name][server_name] = g
                    print(
                        f"  {s.name:<20} {server_name:<8} gain {g['gain']:.2f}x "
                        f"({', '.join(f'{x:.2f}' for x in g['gains'])}); req/s "
                        f"{fmt(g['ok_rps_batched'])} batched, {fmt(g['ok_rps_off'])} off; CPU/req "
                        f"{fmt(g['cpu_us_batched'], 0)} / {fmt(g['cpu_us_off'], 0)} us; "
                        f"errors {g['errors']}",
                        flush=True,
                    )
            finally:
                process.stop()
    return out


def gain_report(results: dict[str, dict[str, Any]], markdown: bool) -> str:
    """The interleaved gain table (empty when it was not measured)."""
    rows = []
    for name, r in results.items():
        for server_name, g in r.get("gain", {}).items():
            one_row_us = 1e6 / r["inproc"]["one_by_one_rows_per_s"]
            rows.append(
                [
                    name,
                    server_name,
                    fmt(g["ok_rps_batched"]),
                    fmt(g["ok_rps_off"]),
                    f"{g['gain']:.2f}x",
                    ", ".join(f"{x:.2f}" for x in g["gains"]),
                    fmt(g["cpu_us_batched"], 0),
                    fmt(g["cpu_us_off"], 0),
                    fmt(one_row_us, 0),
                    str(g["errors"]),
                ]
            )
    if not rows:
        return ""
    header = [
        "model",
        "server",
        "batched req/s",
        "off req/s",
        "gain (median)",
        "gain per pair",
        "CPU us/req batched",
        "CPU us/req off",
        "1-row call us (e)",
        "err",
    ]
    title = f"Batching gain at c={GAIN_CONCURRENCY}, interleaved (OIP V2 REST)"
    heading = f"### {title}\n\n" if markdown else f"== {title} ==\n"
    note = (
        "Medians of alternating runs on one server; CPU is what the server's workers used per "
        "answered request (the load generator's own CPU is not in it). Batching saves the "
        "model's per-call cost, not the front end's per-request cost: with the CPU saturated the "
        "gain is about CPU per request off / batched, and the bare server's gain is what a Python "
        "HTTP front end allows for the model on this machine."
    )
    return heading + note + "\n\n" + table(header, rows, markdown)


def target_checks(results: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The issue's targets as (PASS | FAIL | not measured | info, what) pairs.

    The batching gain is judged on the interleaved runs where they were made (``gain``), else on
    the single-run a/d cells."""
    checks: list[tuple[str, str]] = []
    for name, r in results.items():
        goals = [("a/c", 2.0, "router (a) >= 2x service direct (c)")]
        gain = r.get("gain", {})
        if name.endswith("_large") and "servery" not in gain:
            goals.append(("a/d", 3.0, "batching gain a/d >= 3x"))
        for key, floor, what in goals:
            value = r["ratios"][key].get(64)
            mark = "not measured" if value is None else "PASS" if value >= floor else "FAIL"
            got = "" if value is None else f" ({value:.2f}x)"
            checks.append((mark, f"{name}: {what} at c=64{got}"))
        if "servery" in gain:
            ours = gain["servery"]["gain"]
            mark = "PASS" if ours >= 3.0 else "FAIL"
            what = f"batching gain >= 3x at c={GAIN_CONCURRENCY}, interleaved median ({ours:.2f}x)"
            checks.append((mark, f"{name}: {what}"))
        if "bare" in gain:
            bare = gain["bare"]
            checks.append(
                (
                    "info",
                    f"{name}: bare uvicorn + Starlette with the same batcher gains "
                    f"{bare['gain']:.2f}x (CPU per request {fmt(bare['cpu_us_off'], 0)} us "
                    f"off, {fmt(bare['cpu_us_batched'], 0)} us batched)",
                )
            )
    # The baseline (c) is BentoML's own adaptive batching: its errors are reported, not judged.
    routed = "0 errors through the router (a, b, d, interleaved gain) and the bare server"
    for keys, what in (("abd", routed), ("c", "errors in (c)")):
        errors, where = 0, []
        for name, r in results.items():
            for key, by_c in r["http"].items():
                for c, run in by_c.items():
                    if key in keys and run["errors"]:
                        errors += run["errors"]
                        logged = run["server_log_errors"] or "none logged"
                        where.append(f"{name} ({key}) c={c}: {run['errors']}, statuses {logged}")
            for server_name, g in r.get("gain", {}).items():
                if keys == "abd" and g["errors"]:
                    errors += g["errors"]
                    where.append(f"{name} gain runs on {server_name}: {g['errors']}")
        mark = "info" if keys == "c" else "PASS" if errors == 0 else "FAIL"
        checks.append((mark, f"{what}: {errors}" + (f" ({'; '.join(where)})" if where else "")))
    return checks


def inproc_line(e: dict[str, float]) -> str:
    """One line for (e)."""
    return (
        f"{fmt(e['one_by_one_rows_per_s'], 0)} rows/s one row per call "
        f"({e['one_by_one_rows']} calls), {fmt(e['batched_rows_per_s'], 0)} rows/s in "
        f"{e['batch_rows']}-row batches"
    )


def report(results: dict[str, dict[str, Any]], conc: Sequence[int], markdown: bool) -> str:
    """Every model's tables (HTTP runs, in-process, ratios) and the target checks."""
    parts: list[str] = []
    for name, r in results.items():
        title = f"{name} ({r['framework']}, {r['n_features']} features)"
        heading = f"### {title}\n\n" if markdown else f"== {title} ==\n"
        header = ["config"] + [h for c in conc for h in (f"c={c} req/s", "p50 ms", "p99 ms", "err")]
        rows = []
        for key, label in CONFIGS.items():
            runs = r["http"].get(key, {})
            row = [label]
            for c in conc:
                run = runs.get(c)
                if run is None:
                    row += ["-"] * 4
                else:
                    row += [fmt(run["ok_rps"]), fmt(run["p50_ms"], 2), fmt(run["p99_ms"], 2)]
                    row.append(str(run["errors"]))
            rows.append(row)
        parts.append(heading + table(header, rows, markdown))
        parts.append(f"(e) in-process runtime.predict: {inproc_line(r['inproc'])}")
        ratio_rows = [
            [k + (" (batching gain)" if k == "a/d" else "")]
            + [fmt(v, 2) + ("x" if v is not None else "") for v in r["ratios"][k].values()]
            for k in RATIOS
        ]
        parts.append(table(["req/s ratio"] + [f"c={c}" for c in conc], ratio_rows, markdown))
    gains = gain_report(results, markdown)
    if gains:
        parts.append(gains)
    parts.append(("### Targets" if markdown else "== Targets ==") + f"\nFrom the issue: {TARGETS}.")
    bullet = "- " if markdown else "  "
    parts.append("\n".join(f"{bullet}{mark}: {what}" for mark, what in target_checks(results)))
    return "\n\n".join(parts) + "\n"


def machine(command: str, client: str) -> dict[str, Any]:
    """Where and how this run happened (for RESULTS.md and the JSON)."""
    name = wrk_version() if client == "wrk" else f"aiohttp {version('aiohttp')} loadgen"
    return report_machine(command, name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(p, ",".join(ALL_MODELS), "2 s runs, fewer in-process rows")
    p.add_argument("--client", choices=("wrk", "aiohttp"), default="wrk")
    p.add_argument(
        "--gain-repeats",
        type=int,
        default=5,
        help="alternating batched/off pairs per large model and server (0: skip; --quick: 1)",
    )
    args = p.parse_args(argv)
    finish_run_arguments(args)
    if args.quick:
        args.gain_repeats = min(args.gain_repeats, 1)
    if args.client == "wrk" and wrk_path() is None:
        print(f"WARNING: {INSTALL_HINT}\nFalling back to --client aiohttp.", file=sys.stderr)
        args.client = "aiohttp"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write bench/out/foundation.json and bench/RESULTS.md."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    home = use_model_store()
    command = " ".join(["python -m bench.studies.foundation", *map(shlex.quote, raw)])
    meta = machine(command, args.client)
    print(f"model store: {home / 'models'}; client: {meta['client']}", flush=True)

    subjects = [load_subject(m) for m in args.models]
    results: dict[str, dict[str, Any]] = {}
    for s in subjects:
        one_rows = 500 if args.quick else 2000
        inproc = measure_inproc(s, one_rows, 4096, max_s=args.duration)
        print(f"  {s.name:<20} (e) in-process       {inproc_line(inproc)}", flush=True)
        info = s.runtime.info
        results[s.name] = {
            "framework": s.framework,
            "version": info.version,
            "n_features": info.n_features,
            "inproc": inproc,
            "http": {},
        }

    config_yaml = models_yaml(args.models)
    router_jobs = [(s, k) for s in subjects for k in ("a", "b", "d")]
    serve_and_load(home, config_yaml, "services:Router", router_jobs, args, results)
    for fw, target in SERVICE_TARGETS.items():
        jobs = [(s, "c") for s in subjects if s.framework == fw]
        if jobs:
            serve_and_load(home, config_yaml, target, jobs, args, results)

    large = [s for s in subjects if s.name.endswith("_large")]
    if large and args.gain_repeats > 0:
        for name, by_server in interleaved_gains(home, large, args).items():
            results[name]["gain"] = by_server
    for r in results.values():
        r["ratios"] = ratios(r["http"], args.concurrency)
    text = report(results, args.concurrency, markdown=False)
    print("\n" + text)

    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    checks = [{"result": mark, "target": what} for mark, what in target_checks(results)]
    OUT_JSON.write_text(json.dumps({**meta, "models": results, "targets": checks}, indent=2))
    write_section(
        RESULTS_MD,
        "foundation",
        "## Foundation benchmark\n\n"
        f"{run_line(meta)}\n\n"
        "Single-row requests; req/s (successful 2xx answers per second: fast 503s are not "
        "throughput) and latency per configuration and concurrency; ratios of req/s measured in "
        "this run against (c), the framework service called directly, and (d), the router with "
        "batching off; `err` counts every non-2xx answer and socket error. Raw numbers: "
        "`bench/out/foundation.json`.\n\n" + report(results, args.concurrency, markdown=True),
    )
    print(f"wrote {OUT_JSON.relative_to(ROOT)} and {RESULTS_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch jobs against online traffic on one router (issue 23): throughput, online p99 while a job
runs, the queue's added latency per line and what persistence costs.

    python -m bench.studies.batch [--quick] [--rows 100000] [--rows-per-line 32] [--seconds S]
                                  [--repeats R] [--server-env NAME=VALUE] [--llm]
    make bench-batch

One ``bentoml serve`` of servery (default settings: SQLite queue and job state in
``SERVERY_BATCH_DIR``, a consumer in every router worker, online requests first) serves an
iris classifier from a temporary store (``bench.harness.store.save_iris``, the
LogisticRegression the tests use). In that one run:

* **Throughput.** wrk sends ``/predict`` bodies of ``--rows-per-line`` rows (32) at c=64: online
  rows/s. A job of ``--rows`` rows (100,000) as OpenAI Batch API lines targeting ``/predict``,
  each line the same 32-row body (3,125 lines), is uploaded and timed from ``POST /v1/batches`` to
  ``completed`` (the client polls every 50 ms): job rows/s. Online runs come before and after each
  job; the ratio is job rows/s over the mean of its two neighbours, median over ``--repeats``.
  Target >= 0.8x.
* **Online p99 under a job.** wrk sends single-row ``/predict`` bodies at c=16, alternately with no
  job and while a large job (``LARGE_LINES`` lines of 32 rows) runs; that job is cancelled after
  each run and the next run waits for it to end. The ratio is the median of paired p99 ratios.
  Target <= 1.2x.
* **The queue's added latency per line.** A one-line job (one row) is timed from create to
  ``completed`` (polled every 10 ms), ``LATENCY_JOBS`` times; minus the median latency of the same
  request sent online, one at a time. Reported, no target.
* **Chat job** (``--llm``, a second server with the tiny LLM of training/tiny_llm.py on vLLM's
  CPU build): online tok/s of 8 clients sending chats of ``CHAT_TOKENS`` tokens
  (``ignore_eos``) back to back, before and after a job of ``--chat-lines`` (1,000) such
  chats; job tok/s is its output's completion tokens over create-to-completed. Target >= 0.8x.
* **Persistence.** In this process, what the job state and queue cost per line on the SQLite
  store the server uses (and on Redis when ``redis-server`` is installed, AOF on, as in deploy/)
  next to an in-memory store: a line's answer (``Jobs.answer``: set-if-absent and a counter) and
  its share of its chunk's queue task (huey enqueue + dequeue, SqliteHuey / RedisHuey vs
  MemoryHuey). The overhead is that time over the job's wall time per line. Reported, no target.

Writes bench/out/batch.json and the "batch" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.harness.processes import cpu_seconds, router_workers
from bench.harness.redis_server import RedisServer, redis_server_path
from bench.harness.results import OUT_DIR, RESULTS_MD, run_line, write_section
from bench.harness.server import Server, cpu_llm_env, start_server
from bench.harness.wrk import INSTALL_HINT, measure, run_wrk, wrk_path, wrk_version
from bench.report import fmt, machine, table
from services.batch.worker import Priority

HOLD_S = Priority.HOLD_S

OUT_JSON = OUT_DIR / "batch.json"
LARGE_LINES = 20_000
"""Lines of the job that runs during the p99 runs (cancelled after each): longer than a run."""
LATENCY_JOBS = 5
THROUGHPUT_MIN = 0.8
P99_MAX = 1.2
MODELS_YAML = "models:\n  - name: iris\n"
JSON = {"Content-Type": "application/json"}


# --- pure logic (tests/unit/test_bench_batch.py) -------------------------------------------------


def iris_rows() -> list[list[float]]:
    from sklearn.datasets import load_iris

    return [[float(v) for v in row] for row in load_iris().data]


def predict_body(rows: Sequence[Sequence[float]]) -> dict[str, Any]:
    return {"model": "iris", "inputs": [list(r) for r in rows]}


def chunked(rows: Sequence[Sequence[float]], total: int, per: int) -> list[list[list[float]]]:
    """``total`` rows (cycling through ``rows``) cut into groups of ``per`` (the last smaller)."""
    out: list[list[list[float]]] = []
    for start in range(0, total, per):
        out.append([list(rows[i % len(rows)]) for i in range(start, min(start + per, total))])
    return out


def job_file(groups: Sequence[Sequence[Sequence[float]]], prefix: str = "r") -> bytes:
    """One OpenAI Batch API line per group of rows, targeting ``/predict``."""
    return b"".join(
        json.dumps(
            {
                "custom_id": f"{prefix}{i}",
                "method": "POST",
                "url": "/predict",
                "body": predict_body(g),
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
        for i, g in enumerate(groups)
    )


def neighbour_ratio(jobs: Sequence[float], online: Sequence[float]) -> float:
    """Median over jobs of job i / mean(online i, online i+1) (online runs bracket each job)."""
    if len(online) != len(jobs) + 1 or not jobs:
        raise ValueError("need one more online run than jobs, and at least one job")
    return float(
        statistics.median(j / ((online[i] + online[i + 1]) / 2) for i, j in enumerate(jobs))
    )


def paired_ratio(with_job: Sequence[float], without: Sequence[float]) -> float:
    """Median of per-pair ratios with / without."""
    if len(with_job) != len(without) or not with_job:
        raise ValueError("need as many runs with a job as without, at least one")
    return float(statistics.median(a / b for a, b in zip(with_job, without, strict=True)))


def evaluate(throughput: float, p99: float, failed_lines: int, errors: int) -> list[dict[str, Any]]:
    """The targets: ``check``, ``measured``, ``target``, ``ok``."""
    return [
        {
            "check": "job rows/s / online /predict rows/s at c=64 (32-row requests)",
            "measured": f"{throughput:.3f}x",
            "target": f">= {THROUGHPUT_MIN:g}x",
            "ok": throughput >= THROUGHPUT_MIN,
        },
        {
            "check": "online p99 at c=16 with a job running / without",
            "measured": f"{p99:.3f}x",
            "target": f"<= {P99_MAX:g}x",
            "ok": p99 <= P99_MAX,
        },
        {
            "check": "job lines in the error file",
            "measured": str(failed_lines),
            "target": "0",
            "ok": failed_lines == 0,
        },
        {
            "check": "failed online requests",
            "measured": str(errors),
            "target": "0",
            "ok": errors == 0,
        },
    ]


def target_table(verdicts: Sequence[Mapping[str, Any]], markdown: bool) -> str:
    rows = [
        [v["check"], v["measured"], v["target"], "PASS" if v["ok"] else "FAIL"] for v in verdicts
    ]
    return table(["check", "measured", "target", "result"], rows, markdown)


# --- the server's side --------------------------------------------------------------------------


class Client:
    """The Files and Batch API over HTTP (no key: the server runs without keys)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=120)

    def upload(self, data: bytes) -> str:
        r = self.http.post(
            "/v1/files", files={"file": ("job.jsonl", data)}, data={"purpose": "batch"}
        )
        r.raise_for_status()
        return str(r.json()["id"])

    def create(self, file_id: str, endpoint: str = "/predict") -> dict[str, Any]:
        r = self.http.post(
            "/v1/batches",
            json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"},
        )
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def get(self, batch_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/batches/{batch_id}")
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def cancel(self, batch_id: str) -> None:
        self.http.post(f"/v1/batches/{batch_id}/cancel").raise_for_status()

    def wait(
        self,
        batch_id: str,
        every: float,
        timeout: float = 1800,
        until: Callable[..., bool] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        done = until or (lambda b: b["status"] in ("completed", "failed", "cancelled", "expired"))
        while time.monotonic() < deadline:
            b = self.get(batch_id)
            if done(b):
                return b
            time.sleep(every)
        raise RuntimeError(f"batch {batch_id} did not get there within {timeout} s")

    def run_job(self, file_id: str, every: float) -> tuple[float, dict[str, Any]]:
        """Seconds from create to completed, and the ended batch."""
        start = time.perf_counter()
        b = self.create(file_id)
        created = time.perf_counter() - start
        b = self.wait(b["id"], every)
        return time.perf_counter() - start, {**b, "_create_s": created}


def online_rows(srv: Server, bodies: list[str], rows_per: int, seconds: int) -> dict[str, Any]:
    workers = router_workers(srv)
    cpu = cpu_seconds(workers)
    r = run_wrk(srv.url + "/predict", bodies, concurrency=64, seconds=seconds)
    cpu = cpu_seconds(workers) - cpu
    rows = r.ok * rows_per
    return {**r.as_dict(), "rows_s": r.rps * rows_per, "cpu_us_row": cpu / max(rows, 1) * 1e6}


def throughput(
    srv: Server, c: Client, rows: list[list[float]], args: argparse.Namespace
) -> dict[str, Any]:
    groups = chunked(rows, args.rows, args.rows_per_line)
    bodies = [json.dumps(predict_body(g)) for g in groups[:256]]
    file_id = c.upload(job_file(groups))
    measure(srv.url + "/predict", bodies, concurrency=64, seconds=args.warm_s)
    online = [online_rows(srv, bodies, args.rows_per_line, args.seconds)]
    jobs = []
    for rep in range(args.repeats):
        # the consumers pace batch lines until Priority.HOLD_S after the last online request:
        # the job starts on a server with no online traffic, as the target compares capacities
        time.sleep(HOLD_S + 0.5)
        workers = router_workers(srv)
        cpu = cpu_seconds(workers)
        wall, b = c.run_job(file_id, every=0.05)
        cpu = cpu_seconds(workers) - cpu
        jobs.append(
            {
                "seconds": wall,
                "create_s": b["_create_s"],
                "finalize_s": (b["completed_at"] or 0) - (b["finalizing_at"] or 0),
                "rows_s": args.rows / wall,
                "lines": len(groups),
                "completed": b["request_counts"]["completed"],
                "failed": b["request_counts"]["failed"],
                "status": b["status"],
                "cpu_us_row": cpu / args.rows * 1e6,
            }
        )
        online.append(online_rows(srv, bodies, args.rows_per_line, args.seconds))
        print(
            f"throughput {rep + 1}: online {online[-2]['rows_s']:,.0f} rows/s, job "
            f"{jobs[-1]['rows_s']:,.0f} rows/s ({wall:.1f} s, {b['status']}, "
            f"{b['request_counts']}), online {online[-1]['rows_s']:,.0f} rows/s",
            flush=True,
        )
    ratio = neighbour_ratio([j["rows_s"] for j in jobs], [o["rows_s"] for o in online])
    return {"online": online, "jobs": jobs, "ratio": ratio}


def p99_under_job(
    srv: Server, c: Client, rows: list[list[float]], args: argparse.Namespace
) -> dict[str, Any]:
    singles = [json.dumps(predict_body([r])) for r in rows]
    large = c.upload(job_file(chunked(rows, args.large_lines * 32, 32), prefix="big"))
    without: list[dict[str, Any]] = []
    with_job: list[dict[str, Any]] = []
    measure(srv.url + "/predict", singles, concurrency=16, seconds=args.warm_s)
    for rep in range(args.repeats):
        without.append(
            run_wrk(srv.url + "/predict", singles, concurrency=16, seconds=args.seconds).as_dict()
        )
        b = c.create(large)
        # running: some lines answered
        c.wait(
            b["id"],
            0.05,
            until=lambda x: x["request_counts"]["completed"] > 0 or x["status"] != "in_progress",
        )
        got = run_wrk(srv.url + "/predict", singles, concurrency=16, seconds=args.seconds).as_dict()
        mid = c.get(b["id"])
        got["job_status_after"] = mid["status"]
        got["job_lines_done"] = mid["request_counts"]["completed"]
        with_job.append(got)
        c.cancel(b["id"])
        c.wait(b["id"], 0.2)
        print(
            f"p99 {rep + 1}: without a job {without[-1]['p99_ms']:.2f} ms "
            f"({without[-1]['rps']:,.0f} req/s), with {got['p99_ms']:.2f} ms "
            f"({got['rps']:,.0f} req/s; job {mid['status']}, {got['job_lines_done']} lines done)",
            flush=True,
        )
    ratio = paired_ratio([w["p99_ms"] for w in with_job], [w["p99_ms"] for w in without])
    return {"without": without, "with": with_job, "ratio": ratio}


def queue_latency(srv: Server, c: Client, rows: list[list[float]], n: int) -> dict[str, Any]:
    body = predict_body([rows[0]])
    file_id = c.upload(job_file([[rows[0]]]))
    online = []
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        for _ in range(max(20, n)):
            t = time.perf_counter()
            h.post("/predict", json=body).raise_for_status()
            online.append(time.perf_counter() - t)
    jobs = []
    for _ in range(n):
        wall, b = c.run_job(file_id, every=0.01)
        if b["status"] != "completed":
            raise RuntimeError(f"a one-line job ended {b['status']}")
        jobs.append(wall)
    job_ms, online_ms = statistics.median(jobs) * 1e3, statistics.median(online) * 1e3
    return {
        "job_ms": job_ms,
        "online_ms": online_ms,
        "added_ms": job_ms - online_ms,
        "jobs_ms": [j * 1e3 for j in jobs],
    }


# --- persistence, in this process ---------------------------------------------------------------


def memory_state() -> Any:
    """The job-state operations a line's answer uses, in a dict: the no-persistence baseline."""
    from services.batch.state import State

    class MemoryState(State):
        def __init__(self) -> None:
            self.h: dict[str, dict[str, bytes]] = {}

        def hsetnx(self, name: str, field: str, value: bytes) -> bool:
            got = self.h.setdefault(name, {})
            if field in got:
                return False
            got[field] = value
            return True

        def hincrby(self, name: str, field: str, amount: int = 1) -> int:
            got = self.h.setdefault(name, {})
            value = int(got.get(field, b"0")) + amount
            got[field] = str(value).encode()
            return value

    return MemoryState()


def _per_call_us(fn: Callable[[int], Any], n: int) -> float:
    fn(0)
    start = time.perf_counter()
    for i in range(1, n + 1):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def persistence(tmp: Path, n: int, chunk_lines: int) -> dict[str, dict[str, float]]:
    """Per backend: µs per line's answer (recorded ``FLUSH_LINES`` at a time, as the worker
    does), µs per queue task (enqueue + dequeue), µs per line in
    all (answer + task / chunk_lines)."""
    from huey import MemoryHuey

    from services.batch.jobs import Jobs
    from services.batch.settings import BatchSettings
    from services.batch.state import SqliteState
    from services.batch.worker import FLUSH_LINES, make_queue

    entry = {
        "id": "batch_req_0123456789abcdef01234567",
        "custom_id": "r0",
        "response": {"status_code": 200, "request_id": "req_x", "body": {"predictions": [0] * 32}},
        "error": None,
    }
    settings = BatchSettings(dir=tmp / "persist")
    backends: dict[str, tuple[Any, Any]] = {
        "memory": (memory_state(), MemoryHuey("bench")),
        "sqlite": (
            SqliteState(tmp / "persist" / "state.db"),
            make_queue(settings),  # the server's: SQLite in settings.dir
        ),
    }
    redis_server: RedisServer | None = None
    if redis_server_path() is not None:
        from services.batch.state import RedisState

        (tmp / "redis").mkdir()
        redis_server = RedisServer(tmp / "redis")
        try:
            redis_server.start(timeout=10)
        except RuntimeError:
            redis_server = None  # measured without Redis, as where it is not installed
    if redis_server is not None:
        url = redis_server.url
        on_redis = BatchSettings(dir=tmp / "persist", redis_url=url)
        backends["redis (AOF everysec)"] = (RedisState(url), make_queue(on_redis))
    out: dict[str, dict[str, float]] = {}
    try:
        for name, (state, huey) in backends.items():
            jobs = Jobs(state, settings, lambda *_: None)

            def answers(i: int, jobs: Any = jobs, name: str = name) -> None:
                jobs.answer_many(
                    f"b{name}", [(i * FLUSH_LINES + k, True, entry) for k in range(FLUSH_LINES)]
                )

            answer = _per_call_us(answers, n // FLUSH_LINES) / FLUSH_LINES
            task = huey.task()(lambda a, b: None)

            def queue_one(i: int, huey: Any = huey, task: Any = task) -> None:
                task("batch_x", i)
                huey.dequeue()

            queue = _per_call_us(queue_one, max(n // 10, 50))
            out[name] = {
                "answer_us": answer,
                "task_us": queue,
                "line_us": answer + queue / chunk_lines,
            }
    finally:
        if redis_server is not None:
            redis_server.stop()
    return out


# --- the chat job (--llm) ------------------------------------------------------------------------

LLM = "tiny"
LLM_ENV = cpu_llm_env(f"{LLM}=tiny-llm")
CHAT_TOKENS = 32


def chat_body(i: int) -> dict[str, Any]:
    """A chat that generates exactly ``CHAT_TOKENS`` tokens (vLLM's ``ignore_eos``)."""
    return {
        "model": LLM,
        "messages": [{"role": "user", "content": f"Tell me about batch number {i}."}],
        "max_tokens": CHAT_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    }


def chat_file(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": chat_body(i),
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


def online_chat_tokens(url: str, seconds: float, concurrency: int = 8) -> dict[str, Any]:
    """Completion tokens per second of ``concurrency`` clients sending chats back to back."""
    import threading

    tokens, errors, stop = [0], [0], time.monotonic() + seconds
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as h:
            i = k
            while time.monotonic() < stop:
                r = h.post("/v1/chat/completions", json=chat_body(i))
                i += concurrency
                with lock:
                    if r.status_code == 200:
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        errors[0] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tok_s": tokens[0] / wall, "tokens": tokens[0], "seconds": wall, "errors": errors[0]}


def chat_job(srv: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Online tok/s at c=8, the chat job, online again; the job's tok/s from its output."""
    c = Client(srv.url)
    online_chat_tokens(srv.url, 2)  # warm-up
    before = online_chat_tokens(srv.url, args.seconds * 2)
    file_id = c.upload(chat_file(args.chat_lines))
    time.sleep(HOLD_S + 0.5)
    start = time.perf_counter()
    b = c.create(file_id, "/v1/chat/completions")
    b = c.wait(b["id"], 0.1)
    wall = time.perf_counter() - start
    out = []
    if b["output_file_id"]:
        out = c.http.get(f"/v1/files/{b['output_file_id']}/content").text.splitlines()
    tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"] for x in out)
    after = online_chat_tokens(srv.url, args.seconds * 2)
    job = {"tok_s": tokens / wall, "tokens": tokens, "seconds": wall, "counts": b["request_counts"]}
    ratio = job["tok_s"] / ((before["tok_s"] + after["tok_s"]) / 2)
    print(
        f"chat: online {before['tok_s']:,.0f} tok/s, job {job['tok_s']:,.0f} tok/s "
        f"({wall:.1f} s, {b['request_counts']}), online {after['tok_s']:,.0f} tok/s",
        flush=True,
    )
    return {"online": [before, after], "job": job, "ratio": ratio}


# --- report -------------------------------------------------------------------------------------


def detail_lines(res: Mapping[str, Any], args: argparse.Namespace) -> list[str]:
    t, p, q = res["throughput"], res["p99"], res["latency"]
    online = [o["rows_s"] for o in t["online"]]
    lines = [
        f"throughput: online /predict at c=64, {args.rows_per_line}-row bodies: "
        f"{fmt(statistics.median(online), 0)} rows/s median of {len(online)} runs "
        f"({fmt(min(online), 0)}-{fmt(max(online), 0)}), router CPU "
        f"{fmt(statistics.median(o['cpu_us_row'] for o in t['online']), 1)} us/row; job of "
        f"{args.rows:,} rows in {t['jobs'][0]['lines']:,} lines: "
        + ", ".join(f"{fmt(j['rows_s'], 0)} rows/s ({j['seconds']:.1f} s)" for j in t["jobs"])
        + f", router CPU {fmt(statistics.median(j['cpu_us_row'] for j in t['jobs']), 1)} us/row"
        + "; of which POST /v1/batches (read, validate, queue the chunks): "
        + ", ".join(f"{j['create_s'] * 1e3:.0f} ms" for j in t["jobs"]),
        "p99 at c=16 (1-row bodies), ms without / with a job: "
        + ", ".join(
            f"{a['p99_ms']:.2f} / {b['p99_ms']:.2f}"
            for a, b in zip(p["without"], p["with"], strict=True)
        )
        + "; req/s without / with: "
        + ", ".join(
            f"{a['rps']:,.0f} / {b['rps']:,.0f}"
            for a, b in zip(p["without"], p["with"], strict=True)
        ),
        f"queue's added latency: a one-line job took {q['job_ms']:.0f} ms from create to completed "
        f"(median of {len(q['jobs_ms'])}, polled every 10 ms) vs {q['online_ms']:.1f} ms online: "
        f"{q['added_ms']:.0f} ms added per job/line at idle",
    ]
    if "chat" in res:
        ch = res["chat"]
        lines.append(
            f"chat: online c=8 {ch['online'][0]['tok_s']:,.0f} / {ch['online'][1]['tok_s']:,.0f} "
            f"tok/s (before / after); job {ch['job']['tok_s']:,.0f} tok/s "
            f"({ch['job']['tokens']:,} tokens in {ch['job']['seconds']:.1f} s)"
        )
    per_line_us = statistics.median(j["seconds"] / j["lines"] for j in t["jobs"]) * 1e6
    for name, v in res["persistence"].items():
        lines.append(
            f"persistence {name}: {v['answer_us']:.1f} us per line's answer, {v['task_us']:.1f} us "
            f"per chunk task, {v['line_us']:.1f} us per line = {v['line_us'] / per_line_us:.1%} of "
            f"the job's {per_line_us:.0f} us per line"
        )
    return lines


def markdown(meta: Mapping[str, Any], args: argparse.Namespace, res: Mapping[str, Any]) -> str:
    return "\n".join(
        [
            "## batch (issue 23)",
            "",
            run_line(meta),
            "",
            "One router (default settings: SQLite queue and state, a consumer in every "
            f"router worker, {res['settings']}) serves an iris LogisticRegression. Job lines are "
            f"OpenAI Batch API lines targeting `/predict`, {args.rows_per_line} rows per line; "
            "online load is wrk. Methods: `python -m bench.studies.batch --help`. Load average "
            f"at the start: {meta['loadavg']}.",
            "",
            target_table(res["verdicts"], True),
            "",
            *[f"- {line}" for line in detail_lines(res, args)],
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.studies.batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, help="rows of the job (100000; --quick: 10000)")
    p.add_argument("--rows-per-line", type=int, default=32, help="rows per line and request (32)")
    p.add_argument("--seconds", type=int, help="seconds per wrk run (8; --quick: 2)")
    p.add_argument("--repeats", type=int, help="jobs and p99 pairs (3; --quick: 1)")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the server, e.g. SERVERY_BATCH_CONCURRENCY=8",
    )
    p.add_argument(
        "--llm",
        action="store_true",
        help="also a chat job on the tiny LLM (vLLM on CPU, training/tiny_llm.py) vs online "
        "tok/s at c=8, on a second server",
    )
    p.add_argument("--chat-lines", type=int, help="requests of the chat job (1000; --quick: 100)")
    p.add_argument("--quick", action="store_true", help="smoke run: 10k rows, 1 repeat, 2 s runs")
    args = p.parse_args(argv)
    for name, full, quick in (
        ("rows", 100_000, 10_000),
        ("seconds", 8, 2),
        ("repeats", 3, 1),
        ("chat_lines", 1000, 100),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if any("=" not in e for e in args.server_env):
        p.error("--server-env takes NAME=VALUE")
    args.env = dict(e.split("=", 1) for e in args.server_env)
    if min(args.rows, args.rows_per_line, args.seconds, args.repeats) < 1:
        p.error("--rows, --rows-per-line, --seconds and --repeats must be at least 1")
    args.warm_s = 1 if args.quick else 2
    args.large_lines = 2_000 if args.quick else LARGE_LINES
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if wrk_path() is None:
        raise SystemExit(INSTALL_HINT)
    meta: dict[str, Any] = machine(
        " ".join(["python -m bench.studies.batch", *map(shlex.quote, raw)]), wrk_version() or "wrk"
    )
    meta["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows = iris_rows()
    from bench.harness.store import bentoml_store, save_iris
    from services.batch.settings import BatchSettings

    defaults = BatchSettings(
        **{k[14:].lower(): v for k, v in args.env.items() if k.startswith("SERVERY_BATCH_")}
    )
    settings = (
        f"SERVERY_BATCH_CONCURRENCY={defaults.concurrency}, CHUNK_LINES={defaults.chunk_lines}, "
        f"BUSY_SHARE={defaults.busy_share}"
        + "".join(f", {k}={v}" for k, v in args.env.items() if not k.startswith("SERVERY_BATCH_"))
    )
    res: dict[str, Any] = {"settings": settings}
    with tempfile.TemporaryDirectory(prefix="servery-batch-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "bentoml"
        with bentoml_store(home):
            save_iris()
        srv = start_server(
            home,
            MODELS_YAML,
            tmp / "serve",
            env={
                "SERVERY_BATCH_DIR": str(tmp / "batch"),
                "SERVERY_MAX_BODY_BYTES": str(64 * 2**20),
                "SERVERY_BATCH_MAX_FILE_BYTES": str(64 * 2**20),
                **args.env,
            },
        )
        try:
            meta["router_workers"] = len(router_workers(srv))
            c = Client(srv.url)
            res["latency"] = queue_latency(srv, c, rows, LATENCY_JOBS)
            print(f"queue latency: {res['latency']}", flush=True)
            res["throughput"] = throughput(srv, c, rows, args)
            res["p99"] = p99_under_job(srv, c, rows, args)
        finally:
            srv.stop()
        if args.llm:
            with bentoml_store(home):
                from training.tiny_llm import save

                save("tiny-llm")
            srv = start_server(
                home,
                MODELS_YAML,
                tmp / "serve-llm",
                env={**LLM_ENV, **args.env},
                ready_timeout=300,
            )
            try:
                res["chat"] = chat_job(srv, args)
            finally:
                srv.stop()
        res["persistence"] = persistence(tmp, 2000 if args.quick else 10000, defaults.chunk_lines)
    meta["bentoml_home"] = None
    failed = sum(j["failed"] for j in res["throughput"]["jobs"])
    if "chat" in res:
        failed += res["chat"]["job"]["counts"]["failed"]
    errors = sum(o["errors"] for o in res["throughput"]["online"])
    errors += sum(r["errors"] for k in ("with", "without") for r in res["p99"][k])
    res["verdicts"] = evaluate(res["throughput"]["ratio"], res["p99"]["ratio"], failed, errors)
    if "chat" in res:
        r = res["chat"]["ratio"]
        res["verdicts"].insert(
            1,
            {
                "check": f"chat job tok/s / online tok/s at c=8 ({args.chat_lines} requests, "
                f"{CHAT_TOKENS} tokens each, tiny LLM)",
                "measured": f"{r:.3f}x",
                "target": f">= {THROUGHPUT_MIN:g}x",
                "ok": r >= THROUGHPUT_MIN,
            },
        )
    print("\n" + target_table(res["verdicts"], False))
    print("\n".join(["", *detail_lines(res, args)]))
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps({**meta, **res}, indent=2))
    write_section(RESULTS_MD, "batch", markdown(meta, args, res))
    return 0 if all(v["ok"] for v in res["verdicts"]) else 1


if __name__ == "__main__":
    sys.exit(main())

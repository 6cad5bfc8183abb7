"""servery's LLM path side by side with a bare vLLM OpenAI server, in one run (issue 6).

    python -m bench.studies.llm_peer [--model tiny|smollm2] [--concurrency 1,8] [--requests 16]
                                     [--prompt-tokens 128] [--output-tokens 128] [--repeats 2]
                                     [--servers servery,bare,bare-pinned] [--quick]

The model is built into a temporary store (tiny: training/tiny_llm.py; smollm2:
training/smollm2.py, ~25 s) and served **one server at a time** (two engines on 2 cores would
measure each other) by

* **servery**: ``bentoml serve services:Router`` with the LLM service (router ``/v1`` proxy ->
  LLM service -> vLLM ``AsyncLLM``), which pins its engine and HTTP process to separate cores;
* **bare**: ``python -m vllm.entrypoints.openai.api_server`` on the same Hugging Face directory
  with the flags servery's engine gets (:func:`services.llm.settings.engine_argv`), as it comes;
* **bare-pinned**: the same, pinned after start-up the way servery pins itself, so servery vs
  bare-pinned isolates the cost of servery's own layers.

Every request is the same streamed chat completion: a user message making exactly
``--prompt-tokens`` prompt tokens with the chat template, ``--output-tokens`` tokens with
``ignore_eos``, greedy (counts checked; texts compared across servers). Per concurrency level a
closed loop of C clients sends ``--requests`` streams after C unrecorded ones, with the load
generator of ``servery bench`` (:mod:`bench.endpoints`, :mod:`bench.llm_stream`). Chunks read
from the socket together share a timestamp: a gap of exactly 0 is a burst, and a stream with
most gaps 0 counts as bursty. Repeats run in serpentine order (servery, bare, bare-pinned,
bare-pinned, bare, servery, ...), neighbours of one server sharing a start; cells give the
median tok/s of the repeats and percentiles over all their streams. Each start first waits (up
to ``--idle-wait`` s) until no other pytest/bentoml/vLLM process runs and the CPUs are idle.
Targets: servery/bare output tok/s >= 0.95, TTFT p50 at most +10 ms. Writes
bench/out/llm_peer.json and the "llm" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cli import _levels
from bench.harness.results import OUT_DIR, RESULTS_MD, run_line, write_section
from bench.harness.server import ROOT, ServerProcess, free_port, launch
from bench.llm_stream import distribution_ms
from bench.report import fmt, machine, table

OUT_JSON = OUT_DIR / "llm_peer.json"
MODELS = {"tiny": "tiny-llm", "smollm2": "smollm2"}
"""Served name -> store name."""
SERVERS = ("servery", "bare", "bare-pinned")
BASELINE = "bare"
TOK_S_TARGET = 0.95
"""servery / bare output tok/s must be at least this."""
TTFT_TARGET_MS = 10.0
"""servery's TTFT p50 may be at most this much above bare's."""
BURSTY = 0.5
"""A stream whose share of zero gaps is above this arrived in bursts."""
BUSY = re.compile(r"pytest|bentoml serve|circusd|_bentoml_impl|VLLM::|vllm\.entrypoints")
"""Processes of others that would share the CPUs (tests, servers and their workers, engines)."""


# --- pure helpers (unit-tested) ---------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.studies.llm_peer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--concurrency", type=_levels, default=[1, 8], metavar="C1,C2")
    p.add_argument("--requests", type=int, default=16, help="recorded requests per cell and repeat")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length, chat template in")
    p.add_argument("--output-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--servers", default=",".join(SERVERS), help="comma list of " + ",".join(SERVERS)
    )
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV cache of each engine")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's own")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--idle-wait", type=float, default=600.0, help="most seconds to wait for idle")
    p.add_argument("--quick", action="store_true", help="8 requests, 32 output tokens, 1 repeat")
    args = p.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or set(args.servers) - set(SERVERS):
        p.error(f"--servers: choose from {', '.join(SERVERS)}")
    if args.quick:
        args.requests, args.output_tokens, args.repeats = 8, 32, 1
    for name in ("requests", "prompt_tokens", "output_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def block_plan(servers: Sequence[str], repeats: int) -> list[tuple[str, list[int]]]:
    """``(server, repeats)`` per server start: serpentine order, so that drift hits all servers
    alike, with adjacent runs of one server merged into one start (engines take 20-100 s)."""
    blocks: list[tuple[str, list[int]]] = []
    for rep in range(repeats):
        for server in servers if rep % 2 == 0 else list(reversed(servers)):
            if blocks and blocks[-1][0] == server:
                blocks[-1][1].append(rep)
            else:
                blocks.append((server, [rep]))
    return blocks


def engine_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`services.llm.settings.LLMSettings` fields both servers' engines get."""
    knobs: dict[str, Any] = {"enforce_eager": True, "cpu_kvcache_gib": args.kv_cache_gib}
    if args.max_model_len is not None:
        knobs["max_model_len"] = args.max_model_len
    return knobs


def servery_env(knobs: dict[str, Any], served: str, tag: str) -> dict[str, str]:
    """The environment that makes ``bentoml serve services:Router`` serve ``tag`` as ``served``
    with ``knobs`` (and nothing from the developer's own LLM settings)."""
    env = {
        "SERVERY_LLM_ENABLED": "true",
        "SERVERY_LLM_MODELS": f"{served}={tag}",
        "SERVERY_LLM_MODELS_FILE": "",
        "SERVERY_LLM_TASKS": "",
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in knobs.items():
        env[f"SERVERY_LLM_{key.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


def bare_argv(knobs: dict[str, Any], served: str, hf_path: Path | str, port: int) -> list[str]:
    """The bare vLLM OpenAI server's command: servery's own engine flags for the same knobs."""
    from services.llm.settings import LLMEntry, LLMSettings, engine_argv

    settings = LLMSettings(models=[LLMEntry(name=served)], models_file=None, tasks={}, **knobs)
    flags = engine_argv(settings.models[0], settings, hf_path, on_cpu=True)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *flags]
    return [*cmd, "--host", "127.0.0.1", "--port", str(port)]


def chat_body(served: str, content: str, output_tokens: int, *, stream: bool) -> dict[str, Any]:
    """The request every server gets: greedy, exactly ``output_tokens`` tokens."""
    body: dict[str, Any] = {
        "model": served,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def run_record(
    c: int, rep: int, result: dict[str, Any], streams: Sequence[Any], output_tokens: int
) -> dict[str, Any]:
    """One (server, concurrency, repeat) run: its load result and what its streams measured
    (``streams``: :class:`bench.llm_stream.StreamStats` of the completed requests)."""
    zero_share = [(sum(g == 0.0 for g in s.gaps) / len(s.gaps)) if s.gaps else 0.0 for s in streams]
    tokens = sum(s.output_tokens for s in streams)
    return {
        "c": c,
        "rep": rep,
        "seconds": result["seconds"],
        "ok": result["ok"],
        "errors": result["errors"],
        "status": result["status"],
        "output_tokens": tokens,
        "output_tok_s": tokens / result["seconds"] if result["seconds"] else 0.0,
        "wrong_length": sum(s.output_tokens != output_tokens for s in streams),
        "ttft_s": [s.ttft_s for s in streams if s.ttft_s is not None],
        "gaps_s": [g for s in streams for g in s.gaps],
        "zero_gap_share": zero_share,
    }


def fold(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The repeats of one (server, concurrency) cell: median tok/s with its range, TTFT and
    inter-token latency over every stream of every repeat, burstiness, error counts."""
    tok_s = sorted(r["output_tok_s"] for r in runs)
    gaps = [g for r in runs for g in r["gaps_s"]]
    shares = [x for r in runs for x in r["zero_gap_share"]]
    return {
        "output_tok_s": statistics.median(tok_s),
        "output_tok_s_range": [tok_s[0], tok_s[-1]],
        "ttft_ms": distribution_ms([t for r in runs for t in r["ttft_s"]]),
        "itl_ms": distribution_ms(gaps),
        "zero_gaps": sum(g == 0.0 for g in gaps) / len(gaps) if gaps else 0.0,
        "bursty_streams": sum(x > BURSTY for x in shares),
        "streams": len(shares),
        "errors": sum(r["errors"] for r in runs),
        "wrong_length": sum(r["wrong_length"] for r in runs),
        "repeats": len(runs),
    }


def compare(cell: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """servery's cell against a baseline's: tok/s ratio, TTFT p50 difference, targets met."""
    ratio = cell["output_tok_s"] / base["output_tok_s"] if base["output_tok_s"] else None
    a, b = cell["ttft_ms"]["p50"], base["ttft_ms"]["p50"]
    diff = None if a is None or b is None else a - b
    return {
        "tok_s_ratio": ratio,
        "ttft_p50_diff_ms": diff,
        "tok_s_met": ratio is not None and ratio >= TOK_S_TARGET,
        "ttft_met": diff is not None and diff <= TTFT_TARGET_MS,
    }


def report(cells: dict[str, dict[str, Any]], concurrency: Sequence[int], markdown: bool) -> str:
    """The per-server table and the servery-vs-peer comparison (``cells[server][str(c)]``)."""
    header = ["server", "c", "output tok/s", "TTFT p50", "p99 ms", "ITL p50", "p99 ms"]
    rows = []
    for server, by_c in cells.items():
        for c in concurrency:
            x = by_c[str(c)]
            lo, hi = x["output_tok_s_range"]
            tok_s = fmt(x["output_tok_s"]) + (f" ({fmt(lo, 0)}-{fmt(hi, 0)})" if lo != hi else "")
            rows.append([server, str(c), tok_s, fmt(x["ttft_ms"]["p50"]), fmt(x["ttft_ms"]["p99"])])
            rows[-1] += [fmt(x["itl_ms"]["p50"], 2), fmt(x["itl_ms"]["p99"], 2)]
            rows[-1] += [f"{x['zero_gaps']:.0%}", f"{x['bursty_streams']}/{x['streams']}"]
            rows[-1].append(str(x["errors"] + x["wrong_length"]))
    parts = [table([*header, "zero gaps", "bursty", "err"], rows, markdown)]
    peers = [s for s in cells if s != "servery"]
    if "servery" in cells and peers:
        header = ["c"] + [h for p in peers for h in (f"servery/{p} tok/s", f"TTFT p50 vs {p}")]
        rows = []
        for c in concurrency:
            rows.append([str(c)])
            for peer in peers:
                cmp = compare(cells["servery"][str(c)], cells[peer][str(c)])
                r, d = cmp["tok_s_ratio"], cmp["ttft_p50_diff_ms"]
                ok = {True: " ok", False: " MISS"} if peer == BASELINE else {True: "", False: ""}
                rows[-1].append("-" if r is None else f"{r:.3f}x" + ok[cmp["tok_s_met"]])
                rows[-1].append("-" if d is None else f"{d:+.1f} ms" + ok[cmp["ttft_met"]])
        parts.append(table(header, rows, markdown))
    return "\n\n".join(parts)


# --- set-up: store, prompt, servers -----------------------------------------------------------


def build_store(model: str, home: Path) -> tuple[str, Path]:
    """The model (and the iris classifier the router needs) in a new store at ``home``:
    ``(store tag, Hugging Face directory)``."""
    from bench.harness.store import bentoml_store, save_iris
    from models.llm_store import hf_dir

    with bentoml_store(home):
        if model == "tiny":
            from training.tiny_llm import save

            tag = str(save(MODELS[model]).tag)
        else:
            from training.smollm2 import ensure_smollm2

            tag = ensure_smollm2(progress=False, name=MODELS[model]) or ""
        save_iris()
        path, bento_model = hf_dir(tag)
        return str(bento_model.tag), path


def fit_prompt(hf_path: Path, n_tokens: int) -> tuple[str, int]:
    """A user message of English text whose chat-templated prompt is ``n_tokens`` tokens (as
    vLLM counts them: template rendered, then encoded without extra special tokens)."""
    from transformers import AutoTokenizer

    from training.tiny_llm import corpus

    tok = AutoTokenizer.from_pretrained(hf_path)

    def count(content: str) -> int:
        text = tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return len(tok(text, add_special_tokens=False)["input_ids"])

    tok.model_max_length = 1 << 30  # the source text is long on purpose: no warning
    ids = tok(" ".join(corpus()) * 4, add_special_tokens=False)["input_ids"]
    k = max(1, n_tokens - count(""))
    content, got = "", 0
    for _ in range(20):  # decode/re-encode can merge tokens at the cut: adjust and retry
        content = tok.decode(ids[:k]).strip()
        got = count(content)
        if got == n_tokens:
            break
        k = max(1, k + n_tokens - got)
    return content, got


def others_busy() -> list[str]:
    """Heavy processes that are not ours (tests, servers, engines of other sessions)."""
    import psutil

    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.children(recursive=True))}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] not in ours and BUSY.search(cmd):
            found.append(f"{proc.info['pid']} {' '.join(cmd.split())[:80]}")
    return found


def wait_idle(limit_s: float) -> dict[str, Any]:
    """Wait until no other heavy process runs and the CPUs are under 50 % busy (1 s sample)."""
    import psutil

    start = time.monotonic()
    while True:
        busy = others_busy()
        cpu = psutil.cpu_percent(interval=1.0)
        waited = time.monotonic() - start
        if (not busy and cpu < 50) or waited > limit_s:
            return {"waited_s": round(waited, 1), "cpu_percent": cpu, "others": busy}
        print(f"  waiting for idle ({cpu:.0f} % CPU; {'; '.join(busy) or '-'})", flush=True)
        time.sleep(10)


def start(server: str, ctx: dict[str, Any], tmp: Path) -> tuple[ServerProcess, dict[str, Any]]:
    """Start ``server`` and wait until it lists the model; returns it and start facts."""
    import httpx

    from bench.harness.server import start_server

    t0 = time.perf_counter()
    facts: dict[str, Any] = {}
    if server == "servery":
        env = servery_env(ctx["knobs"], ctx["served"], ctx["tag"])
        proc: ServerProcess = start_server(
            ctx["home"], "models:\n  - name: iris\n", tmp / "servery", env=env, ready_timeout=300
        )
    else:
        port = free_port()
        cmd = bare_argv(ctx["knobs"], ctx["served"], ctx["hf_path"], port)
        facts["command"] = shlex.join(cmd[1:])
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        log = tmp / f"{server}-{port}.log"
        proc = ServerProcess(
            f"http://127.0.0.1:{port}", launch(cmd, cwd=ROOT, env=env, log=log), log
        )

    def lists_model() -> bool:
        r = httpx.get(proc.url + "/v1/models", timeout=2)
        return r.status_code == 200 and ctx["served"] in {m["id"] for m in r.json()["data"]}

    proc.wait_ready(lists_model, 300, f"{server} /v1/models")
    facts["ready_s"] = round(time.perf_counter() - t0, 1)
    if server == "bare-pinned":
        from services.llm.service import pin_cpus  # the pinning servery's LLM service applies

        time.sleep(1)  # the engine's threads are up once it answers; let stragglers start
        facts["pinned"] = pin_cpus(proc.proc.pid)
    return proc, facts


def check(url: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """One unstreamed request: token counts as intended, and the text (compared across servers)."""
    import httpx

    body = chat_body(ctx["served"], ctx["prompt"], ctx["output_tokens"], stream=False)
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    answer = r.json()
    usage = answer["usage"]
    if usage["prompt_tokens"] != ctx["prompt_tokens"]:
        raise RuntimeError(
            f"{url}: prompt_tokens {usage['prompt_tokens']} != {ctx['prompt_tokens']}"
        )
    if usage["completion_tokens"] != ctx["output_tokens"]:
        raise RuntimeError(f"{url}: completion_tokens {usage['completion_tokens']}")
    return {"text": answer["choices"][0]["message"]["content"], "usage": usage}


async def load(url: str, body: bytes, c: int, n: int, timeout: float) -> tuple[Any, list[Any]]:
    """``c`` unrecorded warm-up streams, then a closed loop of ``c`` clients for ``n`` streams."""
    from bench.endpoints import Target, drive, http_sender

    target = Target("openai", url + "/v1/chat/completions", [body], [1])
    async with http_sender(target, c, timeout) as send:
        await drive(send, concurrency=c, requests=c)
        return await drive(send, concurrency=c, requests=n)


def measure(args: argparse.Namespace, ctx: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Every block of the plan; returns the raw runs, start facts and checks per server."""
    body = json.dumps(chat_body(ctx["served"], ctx["prompt"], args.output_tokens, stream=True))
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.servers}
    starts: dict[str, list[dict[str, Any]]] = {s: [] for s in args.servers}
    texts: dict[str, str] = {}
    for server, reps in block_plan(args.servers, args.repeats):
        idle = wait_idle(args.idle_wait)
        print(f"starting {server} (repeats {[r + 1 for r in reps]}) ...", flush=True)
        proc, facts = start(server, ctx, tmp)
        try:
            facts["idle"] = idle
            texts[server] = check(proc.url, ctx)["text"]
            for rep in reps:
                for c in args.concurrency:
                    coro = load(proc.url, body.encode(), c, args.requests, args.timeout)
                    result, streams = asyncio.run(coro)
                    record = run_record(c, rep, result.as_dict(), streams, args.output_tokens)
                    record["others_after"] = others_busy()  # did anyone start meanwhile?
                    runs[server].append(record)
                    print(
                        f"  [{rep + 1}/{args.repeats}] {server:<11} c={c:<2} "
                        f"{record['output_tok_s']:8.1f} tok/s  TTFT p50 "
                        f"{fmt(distribution_ms(record['ttft_s'])['p50'])} ms  errors "
                        f"{record['errors']}  wrong length {record['wrong_length']}",
                        flush=True,
                    )
        finally:
            proc.stop()
        facts["log"] = proc.log.name
        starts[server].append(facts)
    return {"runs": runs, "starts": starts, "texts": texts}


# --- main ---------------------------------------------------------------------------------------


def summary_lines(cells: dict[str, Any], concurrency: Sequence[int]) -> list[str]:
    """The verdict against the targets, per concurrency (servery vs bare, as-is)."""
    if "servery" not in cells or BASELINE not in cells:
        return []
    lines = []
    for c in concurrency:
        cmp = compare(cells["servery"][str(c)], cells[BASELINE][str(c)])
        ok = cmp["tok_s_met"] and cmp["ttft_met"]
        r, d = cmp["tok_s_ratio"], cmp["ttft_p50_diff_ms"]
        lines.append(
            f"{'PASS' if ok else 'FAIL'} c={c}: servery/bare output tok/s "
            f"{'-' if r is None else f'{r:.3f}'} (target >= {TOK_S_TARGET}), TTFT p50 "
            f"{'-' if d is None else f'{d:+.1f}'} ms vs bare (target <= +{TTFT_TARGET_MS:g} ms)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's legacy variable (whole GiB) would override --kv-cache-memory-bytes on either server
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    # a plain `kill` must still stop the servers (the finally blocks run on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = " ".join(["python -m bench.studies.llm_peer", *map(shlex.quote, raw)])
    meta = machine(command, "aiohttp streaming client (bench.endpoints)")
    with tempfile.TemporaryDirectory(prefix="servery-llm-peer-") as tmp_name:
        tmp, t0 = Path(tmp_name), time.perf_counter()
        tag, hf_path = build_store(args.model, tmp / "bentoml")
        prompt, got = fit_prompt(hf_path, args.prompt_tokens)
        print(f"{tag} built in {time.perf_counter() - t0:.1f}s; prompt {got} tokens", flush=True)
        ctx = {"served": args.model, "tag": tag, "home": tmp / "bentoml", "hf_path": hf_path}
        ctx |= {"knobs": engine_knobs(args), "prompt": prompt, "prompt_tokens": got}
        ctx["output_tokens"] = args.output_tokens
        measured = measure(args, ctx, tmp)
    cells = {
        s: {str(c): fold([r for r in runs if r["c"] == c]) for c in args.concurrency}
        for s, runs in measured["runs"].items()
    }
    lines = summary_lines(cells, args.concurrency)
    shared = [r for rs in measured["runs"].values() for r in rs if r["others_after"]]
    shared += [f for fs in measured["starts"].values() for f in fs if f["idle"]["others"]]
    if shared:
        lines.append(f"WARNING: other heavy processes ran during {len(shared)} starts/runs")
    texts = set(measured["texts"].values())
    lines.append(
        "greedy answers identical on every server"
        if len(texts) == 1
        else f"greedy answers differ between servers ({len(texts)} distinct texts)"
    )
    print("\n" + report(cells, args.concurrency, markdown=False) + "\n\n" + "\n".join(lines))
    drop = ("gaps_s", "zero_gap_share")  # thousands of numbers; summarised in the cells
    entry = {
        **meta,
        "model": tag,
        "vllm": vllm_version(),
        "concurrency": args.concurrency,
        "prompt_tokens": got,
        "output_tokens": args.output_tokens,
        "requests": args.requests,
        "repeats": args.repeats,
        "knobs": ctx["knobs"],
        "starts": measured["starts"],
        "cells": cells,
        "summary": lines,
        "texts": measured["texts"],
        "runs": {
            s: [{k: v for k, v in r.items() if k not in drop} for r in rs]
            for s, rs in measured["runs"].items()
        },
    }
    # one entry per model: a smollm2 run keeps the tiny run's numbers, and the other way round
    stored = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    by_model = {**stored.get("models", {}), args.model: entry}
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps({"models": by_model}, indent=2))
    md = ["## LLM: servery vs bare vLLM (issue 6)", ""]
    md += [markdown(name, by_model[name]) for name in sorted(by_model)]
    write_section(RESULTS_MD, "llm", "\n".join([*md, READING]))
    return 0 if all(not line.startswith("FAIL") for line in lines) else 1


def markdown(served: str, entry: dict[str, Any]) -> str:
    """One model's subsection of bench/RESULTS.md, from its JSON entry."""
    ready = ", ".join(
        f"{s} {statistics.median(f['ready_s'] for f in fs):.0f} s"
        for s, fs in entry["starts"].items()
    )
    knobs = entry["knobs"]
    setup = (
        f"`{entry['model']}` served as `{served}` by {entry['vllm']} on CPU, "
        f"{knobs['cpu_kvcache_gib']:g} GiB KV cache, `--enforce-eager`, the same engine flags on "
        f"every server. Streamed chat completions of {entry['prompt_tokens']} prompt tokens and "
        f"exactly {entry['output_tokens']} output tokens (`ignore_eos`), greedy; "
        f"{entry['requests']} requests per cell after a warm-up, {entry['repeats']} repeats, one "
        "server at a time. tok/s: median of the repeats (range); TTFT and ITL (gaps between "
        "content chunks) over all streams; *zero gaps*: chunks read together with the one "
        f"before; *bursty*: streams with most gaps zero. Ready after (median): {ready}."
    )
    lines = [f"### {served}", "", run_line(entry), "", setup, ""]
    lines += [report(entry["cells"], entry["concurrency"], markdown=True), ""]
    return "\n".join([*lines, *(f"- {line}" for line in entry["summary"]), ""])


READING = """Raw numbers: `bench/out/llm_peer.json`. How to read it: *bare* is vLLM's own
OpenAI server as it comes; on 2 cores vllm-cpu pins only its model worker, so its engine core
and HTTP process share the other core, and whole streams can arrive in one burst (*bursty*).
servery's LLM service pins its engine core beside the worker and its HTTP process on the other
core; *bare-pinned* is bare vLLM pinned the same way by this benchmark. servery vs bare is what
a user of either sees (the targets); servery vs bare-pinned is the cost of servery's own layers
(router proxy, BentoML service) at the same pinning. A model's decode step sets how much those
layers matter: every token is one SSE chunk that servery forwards through one more HTTP hop
(LLM service -> router proxy -> client) on the core the engine leaves free. With the tiny model
(~3 ms a step at c=1) that hop is a visible share of each token's time; with SmolLM2-135M
(~37 ms) it is in the noise."""


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        with contextlib.suppress(PackageNotFoundError):
            return f"{dist} {version(dist)}"
    return "vLLM"


if __name__ == "__main__":
    sys.exit(main())

"""LLM features under load (issue 26): LoRA adapters, adapter switching, tool calls and
``json_schema`` beside plain chat, all streamed through the router of one real server.

One ``bentoml serve services:Router`` with the tiny test LLM (``training/tiny_llm.py``, vLLM on
CPU) as ``tiny``, three random rank-8 LoRA adapters of it from the store (``training/lora.py``'s
``random_adapter``, saved with ``servery llm lora add``'s function) served with ``max_loras: 3``
(all three fit in one batch), tool calling (``pythonic`` parser) and xgrammar guided
decoding; ``--model smollm2`` serves SmolLM2 (converted into the run's store) instead.
Cells, each a closed loop of ``c`` streaming clients, interleaved round by round so the busy
machine's drift hits every cell alike:

* ``base``: plain chat with the base model, greedy, exactly ``--output-tokens`` tokens;
* ``adapter``: the same request naming one adapter;
* ``switch``: the same request, requests cycling over the three adapters;
* ``tools``: a named ``tool_choice`` (guided: the call parses), its ``delta.tool_calls`` pieces
  counted as the stream's tokens;
* ``json``: ``response_format: json_schema`` (guided).

Targets (ratios in this run, at c=8): ``adapter`` output tok/s >= 0.8x ``base``; ``switch`` p99
TTFT <= 1.2x ``adapter``'s. ``tools`` and ``json`` report TTFT/ITL beside ``base`` (their lengths
are the grammar's, so tok/s is not compared). Raw numbers: ``bench/out/llm_features.json``;
section ``llm-features`` of ``bench/RESULTS.md``.

    python -m bench.studies.llm_features [--quick] [--concurrency 1,8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness.results import OUT_DIR, RESULTS_MD, run_line, write_section
from bench.llm_stream import SSEParser, StreamStats, distribution_ms
from bench.report import machine

OUT_JSON = OUT_DIR / "llm_features.json"
ADAPTERS = ("style-a", "style-b", "style-c")
TOK_S_TARGET = 0.8
TTFT_P99_TARGET = 1.2
TARGET_C = 8
CONFIG = """models:
  - name: {served}
    tag: {store}
    enable_auto_tool_choice: true
    tool_call_parser: pythonic
    structured_outputs_backend: xgrammar
    structured_outputs_compact: true
    adapters: [style-a, style-b, style-c]
    max_loras: 3
    max_lora_rank: 8
"""
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,24}$"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,24}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
CELLS = ("base", "adapter", "switch", "tools", "json")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.studies.llm_features", description=__doc__)
    p.add_argument("--concurrency", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--requests", type=int, default=48, help="streams per cell and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every cell (default 3)")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens of a plain answer")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--quick", action="store_true", help="c=8 only, 1 round of 16 streams")
    p.add_argument(
        "--model",
        choices=("tiny", "smollm2"),
        default="tiny",
        help="tiny (the test LLM, default) or smollm2 (converted into the run's store)",
    )
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.concurrency, args.rounds, args.requests = [TARGET_C], 1, 16
    return args


# --- requests -----------------------------------------------------------------------------------


def bodies(cell: str, served: str, prompt: str, output_tokens: int) -> list[bytes]:
    """The request bodies of a cell (cycled over by the clients)."""
    chat: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": output_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    plain = {**chat, "ignore_eos": True}
    if cell == "base":
        docs = [{**plain, "model": served}]
    elif cell == "adapter":
        docs = [{**plain, "model": ADAPTERS[0]}]
    elif cell == "switch":
        docs = [{**plain, "model": a} for a in ADAPTERS]
    elif cell == "tools":
        choice = {"type": "function", "function": {"name": "get_weather"}}
        docs = [{**chat, "model": served, "tools": [TOOL], "tool_choice": choice,
                 "parallel_tool_calls": False}]  # fmt: skip
    elif cell == "json":
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
        docs = [{**chat, "model": served, "response_format": fmt}]
    else:
        raise ValueError(cell)
    return [json.dumps(d).encode() for d in docs]


class FeatureStream(StreamStats):
    """:class:`StreamStats` that counts ``delta.tool_calls`` pieces as tokens arriving, and keeps
    the text (content or tool-call arguments) to check it parses."""

    def __init__(self, t0: float) -> None:
        super().__init__(t0)
        self.text = ""

    def on_data(self, data: str, now: float) -> None:
        if data != "[DONE]" and '"tool_calls"' in data:
            try:
                chunk = json.loads(data)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    pieces = delta.get("tool_calls") or []
                    args = "".join((p.get("function") or {}).get("arguments") or "" for p in pieces)
                    if pieces and not delta.get("content"):
                        delta["content"] = args or "\u200b"  # a piece arrived: a token's worth
                data = json.dumps(chunk)
            except (ValueError, AttributeError, TypeError):
                pass
        before = self.content_chunks
        super().on_data(data, now)
        if self.content_chunks > before:
            chunk = json.loads(data)
            self.text += "".join(
                (c.get("delta") or {}).get("content") or "" for c in chunk["choices"]
            ).replace("\u200b", "")


async def run_cell(url: str, cell_bodies: list[bytes], c: int, n: int, timeout: float) -> dict:
    """``c`` warm-up streams, then a closed loop of ``c`` clients for ``n`` streams."""
    import aiohttp

    streams: list[FeatureStream] = []
    failures: dict[str, int] = {}
    headers = {"content-type": "application/json"}
    limits = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(
        connector=limits, timeout=aiohttp.ClientTimeout(total=timeout), headers=headers
    ) as session:

        async def one(i: int) -> FeatureStream | str:
            t0 = time.perf_counter()
            stats, parser = FeatureStream(t0), SSEParser()
            try:
                body = cell_bodies[i % len(cell_bodies)]
                async with session.post(f"{url}/v1/chat/completions", data=body) as resp:
                    if resp.status != 200:
                        return f"{resp.status}: {(await resp.read())[:200]!r}"
                    async for chunk in resp.content.iter_any():
                        now = time.perf_counter()
                        for data in parser.feed(chunk):
                            stats.on_data(data, now)
            except (TimeoutError, aiohttp.ClientError) as e:
                return type(e).__name__
            for data in parser.finish():
                stats.on_data(data, time.perf_counter())
            return stats.failure() or stats

        async def loop(next_i: list[int], limit: int, keep: bool) -> None:
            while next_i[0] < limit:
                i = next_i[0]
                next_i[0] += 1
                got = await one(i)
                if not keep:
                    continue
                if isinstance(got, str):
                    failures[got] = failures.get(got, 0) + 1
                else:
                    streams.append(got)

        await asyncio.gather(*(loop([0], 1, False) for _ in range(c)))  # warm-up: c streams
        counter = [0]
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(counter, n, True) for _ in range(c)))
        seconds = time.perf_counter() - t0
    tokens = sum(s.output_tokens for s in streams)
    return {
        "seconds": seconds,
        "streams": len(streams),
        "failures": failures,
        "output_tokens": tokens,
        "output_tok_s": tokens / seconds if seconds else 0.0,
        "ttft_s": [s.ttft_s for s in streams if s.ttft_s is not None],
        "gaps_s": [g for s in streams for g in s.gaps],
        "texts": [s.text for s in streams[:3]],
        "parsed": sum(_parses(s.text) for s in streams),
    }


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# --- the server ---------------------------------------------------------------------------------


def build_store(model: str, home: Path, tmp: Path) -> Path:
    """The LLM, iris (the router serves a classifier) and three adapters: the HF directory."""
    from bench.harness.store import bentoml_store
    from bench.studies.llm_peer import MODELS
    from bench.studies.llm_peer import build_store as build_llm
    from models.llm_lora import save_adapter
    from training.lora import random_adapter

    path = build_llm(model, home)[1]
    with bentoml_store(home):
        for seed, name in enumerate(ADAPTERS, start=1):
            save_adapter(name, MODELS[model], random_adapter(path, tmp / name, seed=seed))
    return path


def start(model: str, home: Path, tmp: Path) -> Any:
    from bench.harness.server import cpu_llm_env, start_server
    from bench.studies.llm_peer import MODELS

    (tmp / "llm.yaml").write_text(CONFIG.format(served=model, store=MODELS[model]))
    env = cpu_llm_env(models_file=str(tmp / "llm.yaml"))
    for name in ("SERVERY_API_KEYS", "SERVERY_API_KEYS_FILE"):
        os.environ.pop(name, None)  # keys off
    return start_server(home, "models:\n  - name: iris\n", tmp / "serve", env=env,
                        ready_timeout=400)  # fmt: skip


def cell_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One cell over its rounds: median tok/s of the rounds, TTFT/ITL over every stream."""
    import statistics

    return {
        "output_tok_s": statistics.median(r["output_tok_s"] for r in runs),
        "tok_s_rounds": [round(r["output_tok_s"], 1) for r in runs],
        "streams": sum(r["streams"] for r in runs),
        "failures": sum(sum(r["failures"].values()) for r in runs),
        "parsed": sum(r["parsed"] for r in runs),
        "tokens_per_stream": sum(r["output_tokens"] for r in runs)
        / max(1, sum(r["streams"] for r in runs)),
        "ttft_ms": distribution_ms([t for r in runs for t in r["ttft_s"]]),
        "itl_ms": distribution_ms([g for r in runs for g in r["gaps_s"]]),
    }


def verdicts(cells: dict[str, dict[str, Any]]) -> list[str]:
    at = cells.get(str(TARGET_C))
    if not at:
        return [f"no c={TARGET_C} run: no verdict"]
    ratio = at["adapter"]["output_tok_s"] / max(at["base"]["output_tok_s"], 1e-9)
    p99_one, p99_switch = at["adapter"]["ttft_ms"]["p99"], at["switch"]["ttft_ms"]["p99"]
    switch = (p99_switch / p99_one) if p99_one and p99_switch else float("nan")
    return [
        f"{'PASS' if ratio >= TOK_S_TARGET else 'FAIL'} c={TARGET_C}: adapter/base output tok/s "
        f"{ratio:.3f} (target >= {TOK_S_TARGET})",
        f"{'PASS' if switch <= TTFT_P99_TARGET else 'FAIL'} c={TARGET_C}: switching among 3 "
        f"adapters / one adapter, p99 TTFT {switch:.3f} (target <= {TTFT_P99_TARGET})",
    ]


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(cells: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| c | request | output tok/s | tok/stream | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
        "streams (failed) | JSON parses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, by_cell in cells.items():
        for name in CELLS:
            x = by_cell[name]
            rows.append(
                f"| {c} | {name} | {fmt(x['output_tok_s'])} | {fmt(x['tokens_per_stream'])} | "
                f"{fmt(x['ttft_ms']['p50'])} / {fmt(x['ttft_ms']['p99'])} | "
                f"{fmt(x['itl_ms']['p50'], 2)} / {fmt(x['itl_ms']['p99'], 2)} | "
                f"{x['streams']} ({x['failures']}) | "
                f"{x['parsed'] if name in ('tools', 'json') else '-'} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally stops the server
    command = " ".join(["python -m bench.studies.llm_features", *map(shlex.quote, raw)])
    meta = machine(command, "aiohttp streaming client (bench.studies.llm_features)")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(c): {name: [] for name in CELLS} for c in args.concurrency
    }
    with tempfile.TemporaryDirectory(prefix="servery-llm-features-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        hf = build_store(args.model, tmp / "bentoml", tmp)
        from bench.studies.llm_peer import fit_prompt, others_busy

        prompt, prompt_tokens = fit_prompt(hf, 64)
        print(f"store built in {time.perf_counter() - t0:.1f}s; starting the server", flush=True)
        t0 = time.perf_counter()
        server = start(args.model, tmp / "bentoml", tmp)
        ready_s = time.perf_counter() - t0
        print(f"ready in {ready_s:.1f}s", flush=True)
        busy: list[str] = []
        try:
            for rnd in range(args.rounds):
                for c in args.concurrency:
                    for name in CELLS:
                        cell = bodies(name, args.model, prompt, args.output_tokens)
                        coro = run_cell(server.url, cell, c, args.requests, args.timeout)
                        run = asyncio.run(coro)
                        runs[str(c)][name].append(run)
                        busy += others_busy()
                        print(
                            f"  [{rnd + 1}/{args.rounds}] c={c} {name:<8} "
                            f"{run['output_tok_s']:8.1f} tok/s  TTFT p99 "
                            f"{fmt(distribution_ms(run['ttft_s'])['p99'])} ms  "
                            f"failures {run['failures'] or 0}",
                            flush=True,
                        )
        finally:
            server.stop()
    cells = {c: {n: cell_summary(rs) for n, rs in by.items()} for c, by in runs.items()}
    lines = verdicts(cells)
    if busy:
        lines.append(f"WARNING: other heavy processes ran during the runs ({len(set(busy))})")
    print("\n" + table(cells) + "\n\n" + "\n".join(lines))
    entry = {
        **meta,
        "prompt_tokens": prompt_tokens,
        "output_tokens": args.output_tokens,
        "requests": args.requests,
        "rounds": args.rounds,
        "ready_s": ready_s,
        "model": args.model,
        "config": CONFIG.format(served=args.model, store=args.model),
        "cells": cells,
        "summary": lines,
        "examples": {c: {n: rs[0]["texts"] for n, rs in by.items()} for c, by in runs.items()},
    }
    suffix = "" if args.model == "tiny" else f"-{args.model}"  # each model its own numbers
    out = OUT_JSON.with_name(f"llm_features{suffix.replace('-', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entry, indent=2))
    md = [
        f"## LLM features ({args.model}): adapters, switching, tool calls, json_schema (issue 26)",
        "",
        run_line(meta),
        f"One server, LLM `{args.model}` (vLLM CPU, eager) with 3 random rank-8 LoRA adapters "
        f"(`max_loras: 3`); prompt {prompt_tokens} tokens, plain answers {args.output_tokens} "
        f"tokens (greedy, `ignore_eos`), tools/json as long as their grammar; {args.rounds} "
        f"round(s) of {args.requests} streams per cell, cells interleaved; tok/s: median of "
        "rounds, TTFT/ITL over every stream.",
        "",
        table(cells),
        "",
        *[f"- {line}" for line in lines],
    ]
    write_section(RESULTS_MD, f"llm-features{suffix}", "\n".join(md))
    return 0 if all(not line.startswith("FAIL") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())

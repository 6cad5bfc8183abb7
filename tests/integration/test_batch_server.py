"""Batch jobs on a real ``bentoml serve`` with the queue and job state in a real Redis (Debian's
redis-server on a free port, AOF on): the ``openai`` client's files -> batches -> content flow,
/predict and OIP lines, errors (404, 413, 429, per-key ids and models), cancel, expiry, and a
consumer killed with SIGKILL in the middle of a job. One server and one Redis for the module."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness.redis_server import INSTALL_HINT, RedisServer, redis_server_path
from bench.harness.server import Server, start_server
from tests.conftest import eventually

ALICE = "alice-key-0123456789"
BOB = "bob-key-0123456789ab"
KEYS = f"""keys:
  - name: alice
    key: {ALICE}
  - name: bob
    key: {BOB}
    models: [iris]
"""
QUOTA = 12000
"""SERVERY_BATCH_MAX_QUEUED_LINES of the test server."""
ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if redis_server_path() is None:
        pytest.fail(INSTALL_HINT)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="module")
def batch_server(
    demo_store: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("batch-serve")
    keys = workdir / "keys.yaml"
    keys.write_text(KEYS)
    srv = start_server(
        demo_store,
        "models:\n  - name: iris\n",
        workdir,
        env={
            "SERVERY_API_KEYS_FILE": str(keys),
            "SERVERY_BATCH_REDIS_URL": redis_url,
            "SERVERY_BATCH_DIR": str(workdir / "batch"),
            "SERVERY_BATCH_CHUNK_LINES": "50",
            "SERVERY_BATCH_CONCURRENCY": "2",
            "SERVERY_BATCH_SWEEP_INTERVAL_S": "0.5",
            "SERVERY_BATCH_LEASE_S": "3",
            "SERVERY_BATCH_MAX_FILE_BYTES": "2000000",
            "SERVERY_BATCH_MAX_QUEUED_LINES": str(QUOTA),
        },
    )
    try:
        yield srv
    finally:
        srv.stop()


def _openai(server: Server, key: str = ALICE, retries: int = 0) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=retries, timeout=30)


def _jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def _predict_line(i: int, model: str = "iris") -> dict[str, Any]:
    return {
        "custom_id": f"r{i}",
        "method": "POST",
        "url": "/predict",
        "body": {"model": model, "inputs": [ROW]},
    }


def _wait_end(client: Any, batch_id: str, timeout: float = 60) -> Any:
    return eventually(
        lambda: (
            (b := client.batches.retrieve(batch_id)).status
            in ("completed", "failed", "cancelled", "expired")
            and b
        ),
        f"batch {batch_id} ended",
        timeout=timeout,
    )


def _entries(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _each_once(client: Any, batch: Any, total: int) -> tuple[list[Any], list[Any]]:
    """The output and error entries; every custom_id r0..r{total-1} in exactly one, once."""
    out, err = _entries(client, batch.output_file_id), _entries(client, batch.error_file_id)
    ids = [e["custom_id"] for e in out + err]
    assert sorted(ids) == sorted(f"r{i}" for i in range(total)), "each custom_id answered once"
    assert batch.request_counts.total == total
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(out), len(err))
    return out, err


def _counts(server: Server) -> tuple[float, float]:
    """(servery_requests_total, servery_batch_line_calls_total), summed over every label."""
    from bench.harness.server import metric_samples

    samples = metric_samples(server.url + "/metrics")
    return tuple(  # type: ignore[return-value]
        sum(v for n, _, v in samples if n == name)
        for name in ("servery_requests_total", "servery_batch_line_calls_total")
    )


def test_the_openai_client_flow_scores_rows_with_a_classifier(batch_server: Server) -> None:
    client = _openai(batch_server)
    log_at, (requests_before, calls_before) = batch_server.log.stat().st_size, _counts(batch_server)
    lines: list[Any] = [_predict_line(i) for i in range(6)]
    lines += [
        b"not json {",  # its own error entry, the rest continue
        {
            "custom_id": "r7",
            "method": "POST",
            "url": "/predict",
            "body": {"model": "nope", "inputs": [ROW]},
        },
        {"custom_id": "r8", "method": "POST", "url": "/v1/embeddings", "body": {"model": "iris"}},
        {
            "custom_id": "r9",
            "method": "POST",
            "url": "/predict",
            "body": {"model": "iris", "inputs": [[1.0]]},
        },
    ]
    uploaded = client.files.create(file=("rows.jsonl", _jsonl(lines)), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch" and uploaded.bytes > 0
    assert client.files.retrieve(uploaded.id).filename == "rows.jsonl"
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/predict", completion_window="24h", metadata={"k": "v"}
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"k": "v"}
    done = _wait_end(client, batch.id)
    assert done.status == "completed" and done.completed_at and done.in_progress_at
    out, err = _entries(client, done.output_file_id), _entries(client, done.error_file_id)
    assert sorted(e["custom_id"] for e in out) == [f"r{i}" for i in range(6)]
    for entry in out:  # OpenAI's output line, with the platform's own /predict answer in it
        assert entry["id"].startswith("batch_req_") and entry["error"] is None
        assert entry["response"]["status_code"] == 200
        assert entry["response"]["body"]["model"] == "iris"
        assert entry["response"]["body"]["predictions"] == [0]
    by_id = {e["custom_id"]: e for e in err}
    assert set(by_id) == {None, "r7", "r8", "r9"}
    assert by_id[None]["error"]["code"] == "invalid_json"
    assert by_id["r7"]["response"]["status_code"] == 404  # unknown model: the handler's answer
    assert by_id["r8"]["error"]["code"] == "invalid_request"  # not this batch's endpoint
    assert by_id["r9"]["response"]["status_code"] in (400, 422)  # wrong row width
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 4)
    # each line that ran (8: not r8, nor the line that is not JSON) is counted once by the
    # handlers and once as a batch call, so the consumers' estimate of online traffic
    # (services/batch/priority.py) leaves it out; and no access-log line per batch line
    requests, calls = _counts(batch_server)
    assert (requests - requests_before, calls - calls_before) == (8, 8)
    with open(batch_server.log, "rb") as f:
        f.seek(log_at)
        logged = f.read()
    assert b"path=/v1/batches/" in logged  # the access log is on: the client's polls are in it
    assert b"path=/predict," not in logged
    listed = client.batches.list(limit=1)
    assert listed.data[0].id == batch.id and listed.has_more in (True, False)
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(Exception) as gone:
        client.files.retrieve(uploaded.id)
    assert getattr(gone.value, "status_code", None) == 404


def test_oip_lines_run_through_the_v2_handler(batch_server: Server) -> None:
    client = _openai(batch_server)
    infer = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v2/models/iris/infer", "body": infer}
        for i in range(3)
    ]
    f = client.files.create(file=("oip.jsonl", _jsonl(lines)), purpose="batch")
    done = _wait_end(
        client,
        client.batches.create(
            input_file_id=f.id, endpoint="/v2/models/{name}/infer", completion_window="24h"
        ).id,
    )
    out, err = _each_once(client, done, 3)
    assert not err and all(e["response"]["body"]["model_name"] == "iris" for e in out)


def test_errors_ids_sizes_quotas_and_other_keys(batch_server: Server) -> None:
    alice, bob = _openai(batch_server), _openai(batch_server, BOB)
    h = {"Authorization": f"Bearer {ALICE}"}
    url = batch_server.url
    assert httpx.get(f"{url}/v1/batches/batch_nope", headers=h).status_code == 404
    missing = httpx.get(f"{url}/v1/files/file-nope/content", headers=h)
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/batches").status_code == 401  # the gate: a key is needed
    big = httpx.post(
        f"{url}/v1/files",
        headers=h,
        files={"file": ("x.jsonl", b"x" * 2_100_000)},
        data={"purpose": "batch"},
    )
    assert (
        big.status_code == 413 and "SERVERY_BATCH_MAX_FILE_BYTES" in big.json()["error"]["message"]
    )
    f = alice.files.create(file=("a.jsonl", _jsonl([_predict_line(0)])), purpose="batch")
    wrong = httpx.post(
        f"{url}/v1/batches",
        headers=h,
        json={"input_file_id": f.id, "endpoint": "/admin/reload", "completion_window": "24h"},
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "endpoint"
    # bob sees none of alice's files and batches
    with pytest.raises(Exception) as other:
        bob.files.retrieve(f.id)
    assert getattr(other.value, "status_code", None) == 404
    b = alice.batches.create(input_file_id=f.id, endpoint="/predict", completion_window="24h")
    assert (
        httpx.get(
            f"{url}/v1/batches/{b.id}", headers={"Authorization": f"Bearer {BOB}"}
        ).status_code
        == 404
    )
    # a key limited to iris: a line for another model is refused as online (403), in the error file
    fb = bob.files.create(
        file=("b.jsonl", _jsonl([_predict_line(0), _predict_line(1, "breast_cancer")])),
        purpose="batch",
    )
    done = _wait_end(
        bob,
        bob.batches.create(input_file_id=fb.id, endpoint="/predict", completion_window="24h").id,
    )
    _, err = _each_once(bob, done, 2)
    assert [e["custom_id"] for e in err] == ["r1"] and err[0]["response"]["status_code"] == 403
    # duplicate custom_ids fail the batch as a whole, as OpenAI's validation does
    fd = alice.files.create(
        file=("d.jsonl", _jsonl([_predict_line(0), _predict_line(0)])), purpose="batch"
    )
    dup = alice.batches.create(input_file_id=fd.id, endpoint="/predict", completion_window="24h")
    assert dup.status == "failed" and dup.errors.data[0].code == "duplicate_custom_id"
    # more queued lines than the key's quota: 429
    many = alice.files.create(
        file=("m.jsonl", _jsonl([_predict_line(i) for i in range(QUOTA + 1)])), purpose="batch"
    )
    over = httpx.post(
        f"{url}/v1/batches",
        headers=h,
        json={"input_file_id": many.id, "endpoint": "/predict", "completion_window": "24h"},
    )
    assert (
        over.status_code == 429
        and "SERVERY_BATCH_MAX_QUEUED_LINES" in over.json()["error"]["message"]
    )


def _big_job(client: Any, n: int, window: str = "24h") -> Any:
    f = client.files.create(
        file=("big.jsonl", _jsonl([_predict_line(i) for i in range(n)])), purpose="batch"
    )
    return client.batches.create(input_file_id=f.id, endpoint="/predict", completion_window=window)


def test_cancel_keeps_finished_lines_and_answers_the_rest(batch_server: Server) -> None:
    client = _openai(batch_server)
    batch = _big_job(client, 3000)
    eventually(
        lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, "lines answered"
    )
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = _wait_end(client, batch.id, timeout=30)
    assert done.status == "cancelled" and done.cancelled_at
    out, err = _each_once(client, done, 3000)
    assert out and err and {e["error"]["code"] for e in err} == {"batch_cancelled"}


def test_expired_jobs_end_as_expired_with_partial_output(batch_server: Server) -> None:
    client = _openai(batch_server)
    # far more lines than 1 s can answer (a quiet 2-core machine answered 3,000 within 2 s)
    batch = _big_job(client, QUOTA, window="1s")
    done = _wait_end(client, batch.id, timeout=60)
    assert done.status == "expired" and done.expired_at
    _, err = _each_once(client, done, QUOTA)
    assert {e["error"]["code"] for e in err} == {"batch_expired"}


def test_a_consumer_killed_mid_job_loses_nothing_and_answers_each_line_once(
    batch_server: Server, redis_url: str
) -> None:
    import redis

    client = _openai(batch_server)
    r = redis.Redis.from_url(redis_url)
    batch = _big_job(client, 1500)

    def progress() -> int:
        return int(r.hlen(f"servery:batch:res:{batch.id}"))

    eventually(lambda: progress() > 0, "the first lines answered", every=0.02)
    # the consumer writes its host:pid when it sweeps
    pids = [int(k.decode().rsplit(":", 1)[1]) for k in r.hgetall("servery:batch:consumers")]
    victim = next(p for p in pids if _alive(p))
    before = progress()
    os.kill(victim, signal.SIGKILL)
    assert before < 1500, "the job ended before the kill: make it longer"
    # The consumer runs in a router worker: its kept-alive connections died with it. A new
    # client (new connections, to the worker still serving) that retries while circus restarts
    # the killed one, as any client of a restarting server would.
    client = _openai(batch_server, retries=5)
    done = _wait_end(client, batch.id, timeout=90)
    assert done.status == "completed"
    _, err = _each_once(client, done, 1500)
    assert not err
    text = httpx.get(batch_server.url + "/metrics").text
    assert "servery_batch_lines_total" in text and "servery_batch_oldest_waiting_seconds" in text


def test_a_broker_killed_mid_job_loses_nothing_and_answers_each_line_once(
    batch_server: Server, redis_server: RedisServer
) -> None:
    """Redis killed with SIGKILL in the middle of a job and started again on its AOF (which
    may lack its last second of writes: answers, chunk states, queued tasks): the job still
    completes, every custom_id once."""
    import redis

    client = _openai(batch_server, retries=8)
    r = redis.Redis.from_url(redis_server.url)
    batch = _big_job(client, 3000)

    def progress() -> int:
        return int(r.hlen(f"servery:batch:res:{batch.id}"))

    eventually(lambda: progress() > 0, "the first lines answered", every=0.02)
    before = progress()
    redis_server.kill()
    assert before < 3000, "the job ended before the kill: make it longer"
    redis_server.start()
    done = _wait_end(client, batch.id, timeout=120)
    assert done.status == "completed"
    _, err = _each_once(client, done, 3000)
    # nothing is expected there; a line that did land there says why
    assert all(e["error"] or e["response"] for e in err)
    assert not err, [e["error"] or e["response"]["status_code"] for e in err][:5]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_the_cli_submits_follows_and_downloads(
    batch_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(_jsonl([_predict_line(i) for i in range(4)]))
    auth = ["--url", batch_server.url, "--api-key", ALICE, "--no-progress"]
    out = tmp_path / "out.jsonl"
    submit = ["jobs", "submit", str(rows), "--endpoint", "/predict", "--wait", "--output", str(out)]
    assert main([*submit, *auth]) == 0
    assert sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines()) == [
        f"r{i}" for i in range(4)
    ]
    job_id = capsys.readouterr().out.split()[0]
    assert main(["jobs", "list", *auth]) == 0
    listed = capsys.readouterr().out
    assert f"{job_id}  completed" in listed and "4/4" in listed
    assert main(["jobs", "list", "--json", *auth]) == 0
    jobs = json.loads(capsys.readouterr().out)
    mine = next(j for j in jobs if j["id"] == job_id)
    assert mine["status"] == "completed" and mine["request_counts"]["completed"] == 4
    assert main(["jobs", "status", "batch_nope", *auth]) == 2
    assert "404" in capsys.readouterr().err

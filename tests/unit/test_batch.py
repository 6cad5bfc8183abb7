"""Batch jobs without a server: the SQLite job state and queue (the embedded default), chunk
recovery after a dead worker, retries with back-off, validation and quotas (services/batch/).
Lines go to a caller coroutine standing for the router's app (the integration test runs them
through the real one)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from services.batch.jobs import NotFound, window_s
from services.batch.settings import BatchSettings
from services.batch.state import SqliteState
from services.batch.worker import Batches
from services.runtime.errors import BadRequest, PayloadTooLarge, RateLimited


def _settings(tmp_path: Path, **kw: Any) -> BatchSettings:
    base = {"dir": tmp_path, "chunk_lines": 4, "sweep_interval_s": 0.05, "lease_s": 0.5}
    return BatchSettings(**{**base, **kw}, retry_delay_s=0.01)


def _file(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": "/predict", "body": {"i": i}}
        ).encode()
        + b"\n"
        for i in range(n)
    )


class Echo:
    """Answers each line with its body; ``fail`` statuses first, in order, for every line."""

    def __init__(self, fail: list[int] | None = None) -> None:
        self.fail = fail or []
        self.calls: dict[int, int] = {}

    async def __call__(
        self, method: str, url: str, body: bytes, owner: str, models: Any
    ) -> tuple[int, bytes]:
        i = json.loads(body)["i"]
        n = self.calls[i] = self.calls.get(i, 0) + 1
        if n <= len(self.fail):
            return self.fail[n - 1], b'{"error": "busy"}'
        return 200, json.dumps({"echo": i, "owner": owner}).encode()


async def _run_until_ended(batches: Batches, batch_id: str, seconds: float = 20) -> dict[str, Any]:
    consumer = asyncio.ensure_future(batches.consume(poll_s=0.01))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            rec = batches.jobs.batch("o", batch_id)
            if rec["status"] in ("completed", "cancelled", "expired", "failed"):
                return rec
            await asyncio.sleep(0.02)
        raise AssertionError(f"batch not ended within {seconds} s: {rec}")
    finally:
        consumer.cancel()


def _lines(batches: Batches, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    path = batches.jobs.file_content("o", file_id)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sqlite_state_keeps_first_answers_and_compares_before_setting(tmp_path: Path) -> None:
    state = SqliteState(tmp_path / "s.db")
    assert state.hsetnx("h", "1", b"first") and not state.hsetnx("h", "1", b"second")
    assert state.hgetall("h") == {"1": b"first"} and state.hmget("h", ["1", "2"]) == [
        b"first",
        None,
    ]
    state.set("k", b"a")
    assert not state.cas("k", b"b", b"c") and state.cas("k", b"a", b"c") and state.get("k") == b"c"
    assert state.hincrby("n", "x") == 1 and state.hincrby("n", "x", 2) == 3
    state.zadd("z", "b", 2)
    state.zadd("z", "a", 1)
    assert state.zmembers("z") == ["a", "b"]
    # a second connection (another process) sees the same
    assert SqliteState(tmp_path / "s.db").hgetall("h") == {"1": b"first"}


def test_a_job_runs_each_line_once_in_input_order(tmp_path: Path) -> None:
    async def main() -> None:
        caller = Echo()
        batches = Batches(_settings(tmp_path), caller)
        f = batches.jobs.put_file("o", "in.jsonl", "batch", _file(10) + b"\n\n{oops\n")
        rec = batches.jobs.create("o", None, f["id"], "/predict", "24h", None)
        done = await _run_until_ended(batches, rec["id"])
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 11, "completed": 10, "failed": 1}
        out = _lines(batches, done["output_file_id"])
        assert [e["custom_id"] for e in out] == [f"r{i}" for i in range(10)]
        assert out[3]["response"]["body"] == {"echo": 3, "owner": "o"}
        (err,) = _lines(batches, done["error_file_id"])
        assert err["custom_id"] is None and err["error"]["code"] == "invalid_json"
        assert set(caller.calls.values()) == {1}

    asyncio.run(main())


def test_a_chunk_of_a_dead_worker_is_run_again_and_keeps_its_first_answers(tmp_path: Path) -> None:
    async def main() -> None:
        settings = _settings(tmp_path)
        first = Batches(settings, Echo())
        f = first.jobs.put_file("o", "in.jsonl", "batch", _file(8))
        rec = first.jobs.create("o", None, f["id"], "/predict", "24h", None)
        # what a worker killed mid-chunk leaves: chunk 0 taken from the queue (gone from it),
        # two of its lines answered, its lease running out
        task = first.huey.dequeue()
        assert task.args == (rec["id"], 0)
        for n in (0, 1):
            first.jobs.answer(rec["id"], n, True, {"custom_id": f"r{n}", "before": "kill"})
        first.jobs.lease(rec["id"], 0)
        caller = Echo()
        done = await _run_until_ended(Batches(settings, caller), rec["id"])  # a new process
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 8
        out = _lines(first, done["output_file_id"])
        assert [e["custom_id"] for e in out] == [f"r{i}" for i in range(8)]
        assert out[0] == {"custom_id": "r0", "before": "kill"}  # the first answer stays
        assert sorted(caller.calls) == [2, 3, 4, 5, 6, 7]

    asyncio.run(main())


def test_transient_failures_are_retried_then_answered_with_the_last_status(tmp_path: Path) -> None:
    async def main() -> None:
        batches = Batches(_settings(tmp_path, line_retries=2), Echo(fail=[503, 429]))
        f = batches.jobs.put_file("o", "in.jsonl", "batch", _file(2))
        done = await _run_until_ended(
            batches, batches.jobs.create("o", None, f["id"], "/predict", "24h", None)["id"]
        )
        assert done["request_counts"]["completed"] == 2  # the third attempt answered
        batches = Batches(_settings(tmp_path / "b", line_retries=1), Echo(fail=[503, 503, 503]))
        f = batches.jobs.put_file("o", "in.jsonl", "batch", _file(1))
        done = await _run_until_ended(
            batches, batches.jobs.create("o", None, f["id"], "/predict", "24h", None)["id"]
        )
        (err,) = _lines(batches, done["error_file_id"])
        assert err["response"]["status_code"] == 503 and err["custom_id"] == "r0"

    asyncio.run(main())


def test_cancel_before_any_line_answers_every_line_in_the_error_file(tmp_path: Path) -> None:
    async def main() -> None:
        batches = Batches(_settings(tmp_path), Echo())
        f = batches.jobs.put_file("o", "in.jsonl", "batch", _file(5))
        rec = batches.jobs.create("o", None, f["id"], "/predict", "24h", None)
        assert batches.jobs.cancel("o", rec["id"])["status"] == "cancelling"
        done = await _run_until_ended(batches, rec["id"])
        assert done["status"] == "cancelled" and done["output_file_id"] is None
        codes = [
            (e["custom_id"], e["error"]["code"]) for e in _lines(batches, done["error_file_id"])
        ]
        assert codes == [(f"r{i}", "batch_cancelled") for i in range(5)]
        assert batches.jobs.cancel("o", rec["id"])["status"] == "cancelled"  # a no-op now

    asyncio.run(main())


def test_validation_quota_and_ownership(tmp_path: Path) -> None:
    batches = Batches(_settings(tmp_path, max_queued_lines=5, max_file_bytes=1000), Echo())
    jobs = batches.jobs
    with pytest.raises(PayloadTooLarge):
        jobs.put_file("o", "x", "batch", b"x" * 1001)
    with pytest.raises(BadRequest):
        jobs.put_file("o", "x", "fine-tune", b"{}")
    f = jobs.put_file("o", "in.jsonl", "batch", _file(3))
    with pytest.raises(NotFound):
        jobs.file("someone-else", f["id"])
    with pytest.raises(NotFound):
        jobs.file("o", "../../etc/passwd")
    with pytest.raises(BadRequest):
        jobs.create("o", None, f["id"], "/admin/reload", "24h", None)
    with pytest.raises(BadRequest):
        jobs.create("o", None, f["id"], "/predict", "forever", None)
    assert jobs.create("o", None, f["id"], "/predict", "24h", None)["status"] == "in_progress"
    with pytest.raises(RateLimited):  # 3 queued + 3 more > 5
        jobs.create("o", None, f["id"], "/predict", "24h", None)
    dup = jobs.put_file("o", "d.jsonl", "batch", _file(2) + _file(1))
    failed = jobs.create("o", None, dup["id"], "/predict", "24h", None)
    assert failed["status"] == "failed" and failed["errors"]["data"][0]["line"] == 3
    page, more = jobs.batches("o", limit=1)
    assert page[0]["id"] == failed["id"] and more
    assert jobs.batches("o", after=failed["id"])[0][0]["status"] == "in_progress"


@pytest.mark.parametrize(("window", "seconds"), [("24h", 86400), ("90s", 90), ("7d", 604800)])
def test_completion_windows(window: str, seconds: int) -> None:
    assert window_s(window) == seconds


@pytest.mark.parametrize("window", ["", "0h", "8d", "24", "1w", "-1h"])
def test_bad_completion_windows(window: str) -> None:
    with pytest.raises(BadRequest):
        window_s(window)


def test_json_answers_go_into_output_lines_unparsed(tmp_path: Path) -> None:
    """An answer whose content type is JSON (JsonBytes) is put in the output line as it is; the
    line is still one valid JSON object in OpenAI's shape."""
    from services.batch.worker import JsonBytes

    async def caller(*_: Any) -> tuple[int, bytes]:
        return 200, JsonBytes(b'{"predictions":[0],"x":"\\u00e9"}')

    async def run() -> None:
        batches = Batches(_settings(tmp_path), caller)
        line = json.dumps({"custom_id": 'a"b', "url": "/predict", "body": {}}).encode()
        ok, entry = await batches.run_line(
            {"endpoint": "/predict", "_owner": "", "_models": None}, line
        )
        assert ok and isinstance(entry, bytes)
        doc = json.loads(entry)
        assert doc["custom_id"] == 'a"b' and doc["error"] is None
        assert doc["response"]["status_code"] == 200
        assert doc["response"]["body"] == {"predictions": [0], "x": "é"}
        assert doc["id"].startswith("batch_req_") and doc["response"]["request_id"].startswith(
            "req_"
        )

    asyncio.run(run())


def test_online_traffic_makes_batch_lines_run_one_at_a_time(tmp_path: Path) -> None:
    """Priority: requests the handlers counted beyond the batch's own calls make the consumer
    busy (one line at a time, paced); the batch's own calls do not."""
    from services.batch.worker import Priority
    from services.ops import metrics as ops

    async def run() -> None:
        p = Priority(share=0.5)
        p.WATCH_S, p.HOLD_S = 0.01, 0.05
        watch = asyncio.ensure_future(p.watch())
        try:
            await asyncio.sleep(0.03)
            from services.batch import metrics

            async def own_lines() -> None:  # the batch's own calls: not online traffic
                ops.REQUESTS.labels("batch-test", "v", "200").inc(10)
                metrics.LINE_CALLS.inc(10)
                await asyncio.sleep(0.03)

            await p.run(own_lines)
            assert not p.busy
            assert not p.busy
            gate = asyncio.Event()

            async def waiting() -> None:
                await gate.wait()

            held = asyncio.ensure_future(p.run(waiting))  # a line runs: the counters are read
            await asyncio.sleep(0.03)
            ops.REQUESTS.labels("online-test", "v", "200").inc(10)
            for _ in range(100):
                if p.busy:
                    break
                await asyncio.sleep(0.01)
            assert p.busy
            gate.set()
            await held
            running, most = 0, 0

            async def line() -> None:
                nonlocal running, most
                running += 1
                most = max(most, running)
                await asyncio.sleep(0.002)
                running -= 1

            await asyncio.gather(*(p.run(line) for _ in range(4)))
            assert most == 1  # busy: one line at a time
            for _ in range(100):  # no online request for HOLD_S: not busy any more
                if not p.busy:
                    break
                await asyncio.sleep(0.01)
            assert not p.busy
            most = 0
            await asyncio.gather(*(p.run(line) for _ in range(4)))
            assert most == 4
        finally:
            watch.cancel()

    asyncio.run(run())


def test_prediction_lines_call_the_fast_path_handlers_with_the_owner_key() -> None:
    """AsgiCaller: a line for a fast-path route calls that route's handler (the one online
    requests reach) with the owner's key in the scope, counted once in servery_requests_total;
    another URL runs through the app."""
    from fastapi import FastAPI

    from services.batch.asgi import AsgiCaller, JsonBytes
    from services.batch.priority import counted
    from services.gateway.auth import ApiKey
    from services.gateway.fastpath import prediction_routes

    app = FastAPI()  # no registry on it: an admitted prediction is answered 503 (loading)
    reached: list[str] = []

    @app.post("/other")
    async def other() -> dict[str, str]:
        reached.append("app")
        return {"via": "app"}

    @app.post("/predict")
    async def shadowed() -> dict[str, str]:  # the direct route is called, never this one
        reached.append("fastapi /predict")
        return {}

    def key_of(owner: str, models: list[str] | None) -> ApiKey | None:
        return ApiKey(owner, b"", None if models is None else frozenset(models)) if owner else None

    call = AsgiCaller(app, key_of, [(r.pattern, r.handler) for r in prediction_routes()])
    row = json.dumps({"model": "other", "inputs": [[1.0, 2.0, 3.0, 4.0]]}).encode()
    infer = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}
    ).encode()

    async def run() -> None:
        before = counted()[0]
        status, body = await call("POST", "/predict", row, "bob", ["iris"])
        assert status == 403 and isinstance(body, JsonBytes)
        assert "may not use model 'other'" in json.loads(body)["error"]["message"]
        status, body = await call("POST", "/predict", row, "", None)  # created without keys
        assert status == 503 and "loading" in json.loads(body)["error"]["message"]
        status, body = await call("POST", "/v2/models/other/versions/3/infer", infer, "", None)
        assert status == 503 and isinstance(body, JsonBytes)
        assert counted()[0] - before == 3  # each line counted once, as an online request
        status, body = await call("POST", "/other", b"{}", "", None)
        assert (status, json.loads(body)) == (200, {"via": "app"})

    asyncio.run(run())
    assert reached == ["app"]


def test_a_chunk_queued_by_another_process_wakes_an_idle_consumer(tmp_path: Path) -> None:
    """Two workers on one SQLite queue: a batch created on one starts on the other long
    before the other's next poll (it looks at the queue's file between polls)."""

    async def main() -> None:
        consumer = Batches(_settings(tmp_path), Echo())
        other = Batches(_settings(tmp_path))  # the worker the batch is created on
        consumer.settings.sweep_interval_s = 3600.0
        running = asyncio.ensure_future(consumer.consume(poll_s=3600.0))
        try:
            await asyncio.sleep(0.3)  # the consumer is idle, waiting
            f = other.jobs.put_file("o", "in.jsonl", "batch", _file(3))
            rec = other.jobs.create("o", None, f["id"], "/predict", "24h", None)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while other.jobs.batch("o", rec["id"])["status"] != "completed":
                assert loop.time() < deadline, "the idle consumer never took the chunk"
                await asyncio.sleep(0.02)
        finally:
            running.cancel()

    asyncio.run(main())

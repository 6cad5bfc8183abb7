"""The queue (huey: SQLite embedded, Redis in production), its consumer, and how one line runs.

**Why huey, not Celery.** Both keep tasks in Redis; huey also has a SQLite storage in the
library, so ``make serve`` needs no broker (Celery's SQLite broker is kombu's SQLAlchemy transport,
marked experimental, plus SQLAlchemy). Huey is one pure-Python package with no other
dependency, and its queue can be consumed from inside a process that is already running an
event loop (below), which Celery's worker (its own process pool and signal handling) cannot.

**Nothing accepted is lost.** Huey removes a task from the queue when a consumer takes it: a
consumer killed while running it would lose it. So the task is only a pointer (batch id, chunk
number); the chunk's state (queued, running with a lease, done) and every line's answer are in
the job state (services/batch/jobs.py), and the sweeper queues a chunk again when its lease ran
out. A line answered twice keeps its first answer.

**One line** runs in this process (:class:`AsgiCaller`) through the handlers online requests
reach (for ``/predict`` and ``/v2/models/{name}/infer`` the fast path's, called directly; for
the rest the router's FastAPI app): the same validation, micro-batcher, model, LLM proxy and
metrics, without a socket. Online requests go first (:class:`Priority`): while they come,
lines run one at a time, paced to ``SERVERY_BATCH_BUSY_SHARE`` of the time; with none,
``SERVERY_BATCH_CONCURRENCY`` at once. Transient answers (429, 502, 503, 504, a connection
error) are retried with back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from services.batch import metrics
from services.batch.asgi import AsgiCaller, JsonBytes
from services.batch.jobs import Jobs, endpoint_matches, error_entry
from services.batch.priority import Priority
from services.batch.settings import BatchSettings
from services.batch.state import RedisState, SqliteState, State

logger = logging.getLogger("servery.batch")

__all__ = ["AsgiCaller", "Batches", "make_queue", "make_state"]

TRANSIENT = frozenset({408, 429, 502, 503, 504})
"""Statuses a line is retried on (with back-off) before it is answered with them."""

FLUSH_LINES = 32
"""Answers recorded in one write to the job state."""

WAKE_S = 0.05
"""How often an idle consumer on the SQLite queue looks for a chunk another process queued
(one ``stat``; the queue itself is read every ``poll_s``)."""

Caller = Callable[[str, str, bytes, str, list[str] | None], Awaitable[tuple[int, bytes]]]
"""``(method, url, body, owner, owner's models) -> (status, body)``: one request in-process."""


def make_queue(settings: BatchSettings) -> Any:
    """The huey instance: Redis (priority queue) with ``SERVERY_BATCH_REDIS_URL``, else SQLite in
    ``SERVERY_BATCH_DIR``."""
    if settings.redis_url:
        from huey import PriorityRedisHuey

        return PriorityRedisHuey("servery-batch", url=settings.redis_url, results=False)
    from huey import Huey
    from huey.storage import SqliteStorage

    class Storage(SqliteStorage):  # type: ignore[misc]
        """huey's SQLite storage with ``synchronous=normal``, as the job state's: WAL commits
        survive a killed process without an fsync each. huey's default (``full``) cost about
        6 ms per chunk task (enqueue and dequeue) here, bench/studies/batch.py measured."""

        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            conn.execute("pragma synchronous=normal")
            return conn

    settings.dir.mkdir(parents=True, exist_ok=True)
    return Huey(
        "servery-batch",
        storage_class=Storage,
        filename=str(settings.dir / "queue.db"),
        results=False,
    )


def make_state(settings: BatchSettings) -> State:
    if settings.redis_url:
        return RedisState(settings.redis_url)
    return SqliteState(settings.dir / "state.db")


class Batches:
    """Queue, jobs and (when this process consumes) the consumer, for one process."""

    def __init__(self, settings: BatchSettings, call: Caller | None = None) -> None:
        self.settings = settings
        self.huey = make_queue(settings)
        self._queue_wal = settings.dir / "queue.db-wal"  # make_queue's file (SQLite)
        self.call = call
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._lines = asyncio.Semaphore(settings.concurrency)
        self._wake = asyncio.Event()
        self.priority = Priority(settings.busy_share)
        # the chunk task: huey retries it (2 times, 1 s then 2 s) if it raises; a chunk whose
        # worker died is queued again by the sweeper
        self.run_chunk = self.huey.task(retries=2, retry_delay=1, retry_backoff=2, name="chunk")(
            self._run_chunk_blocking
        )
        self.jobs = Jobs(make_state(settings), settings, self._enqueue)

    def _enqueue(self, batch_id: str, chunk: int) -> None:
        self.run_chunk(batch_id, chunk)
        if self._loop is not None:  # this process consumes: take it now, not at the next poll
            self._loop.call_soon_threadsafe(self._wake.set)

    # --- the consumer --------------------------------------------------------------------------

    async def consume(self, poll_s: float = 0.25) -> None:
        """Take chunks from the queue and run them (two at a time, so a worker never waits
        between chunks), sweep every ``SERVERY_BATCH_SWEEP_INTERVAL_S``; until cancelled."""
        self._loop = asyncio.get_running_loop()
        watch = asyncio.ensure_future(self.priority.watch())
        try:
            await self._consume(poll_s)
        finally:
            watch.cancel()

    async def _consume(self, poll_s: float) -> None:
        running: set[asyncio.Task[Any]] = set()
        next_sweep = 0.0
        while not self._stopping:
            try:
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + self.settings.sweep_interval_s
                    await asyncio.to_thread(self._sweep)
                if len(running) >= 2:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                stamp = self._queue_stamp()  # before the read: a write after it is seen
                task = await asyncio.to_thread(self._next_task)
                if task is None:
                    self._wake.clear()
                    await self._idle(poll_s, stamp)
                    continue
                job = asyncio.ensure_future(asyncio.to_thread(self.huey.execute, task))
                running.add(job)
                job.add_done_callback(running.discard)
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is unreachable (Redis restarting): try again soon
                logger.exception("batch consumer: the queue or the job state failed; retrying")
                await asyncio.sleep(1.0)

    def _queue_stamp(self) -> tuple[int, int] | None:
        """What changes when the SQLite queue is written (its WAL file's time and size): a
        chunk queued by another worker's process. None with Redis."""
        if self.settings.redis_url:
            return None
        try:
            st = os.stat(self._queue_wal)
        except OSError:
            return (0, 0)
        return st.st_mtime_ns, st.st_size

    async def _idle(self, poll_s: float, stamp: tuple[int, int] | None) -> None:
        """Wait for work: until this process queues a chunk, ``poll_s`` passes, or (SQLite)
        the queue's file changes, looked at every :data:`WAKE_S` (a ``stat``), so a batch
        created on another worker starts here within that rather than at the next poll."""
        loop = asyncio.get_running_loop()
        end = loop.time() + poll_s
        step = poll_s if stamp is None else min(WAKE_S, poll_s)
        while (left := end - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(step, left))
                return
            if stamp is not None and self._queue_stamp() != stamp:
                return

    def _next_task(self) -> Any:
        for due in self.huey.read_schedule():  # chunks whose retry delay has passed
            self.huey.enqueue(due)
        return self.huey.dequeue()

    def _sweep(self) -> None:
        # who consumes, and when it last swept (``servery jobs workers``; the tests find the
        # process to kill here)
        self.jobs.state.hset(
            "consumers", f"{socket.gethostname()}:{os.getpid()}", b"%d" % time.time()
        )
        by_status = self.jobs.sweep(queue_empty=self.huey.pending_count() == 0)
        metrics.observe_queue(self, by_status)

    def _run_chunk_blocking(self, batch_id: str, chunk: int) -> None:
        """The task's body, in one of huey's threads: the chunk runs on this process's loop."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self.run(batch_id, chunk), self._loop).result()

    # --- one chunk -----------------------------------------------------------------------------

    async def run(self, batch_id: str, chunk: int) -> None:
        jobs = self.jobs
        # the store's reads and writes (and a finalization's files) run in threads: the event
        # loop serves online requests meanwhile
        started = await asyncio.to_thread(self._start_chunk, batch_id, chunk)
        if started is None:
            return  # cancelled, expired or gone: the sweeper ends it
        rec, lines, done = started
        status = _StatusWatch(jobs, batch_id)
        leased = [time.monotonic()]
        pending: list[tuple[int, bool, dict[str, Any] | bytes]] = []
        flushing = asyncio.Lock()

        async def flush() -> None:
            # answers are recorded FLUSH_LINES at a time, in a thread: one transaction instead
            # of two per line, and the event loop (online requests) never waits on the store.
            # A worker killed before a flush loses those answers only: their lines run again.
            async with flushing:
                if not pending:
                    return
                items = pending[:]
                pending.clear()
                first = await asyncio.to_thread(jobs.answer_many, batch_id, items)
                for was_first, (_, ok, _) in zip(first, items, strict=True):
                    if was_first:
                        metrics.LINES.labels("completed" if ok else "failed").inc()
                if time.monotonic() - leased[0] > self.settings.lease_s / 3:
                    leased[0] = time.monotonic()
                    await asyncio.to_thread(jobs.lease, batch_id, chunk)

        async def one(number: int, line: bytes) -> None:
            async with self._lines:
                if not status.running():
                    return
                ok, entry = await self.priority.run(lambda: self.run_line(rec, line))
            pending.append((number, ok, entry))
            if len(pending) >= FLUSH_LINES:
                await flush()

        await asyncio.gather(*(one(n, line) for n, line in lines if n not in done))
        await flush()
        await asyncio.to_thread(self._end_chunk, batch_id, chunk, lines)

    def _start_chunk(
        self, batch_id: str, chunk: int
    ) -> tuple[dict[str, Any], list[tuple[int, bytes]], set[int]] | None:
        jobs = self.jobs
        rec = jobs.record(batch_id)
        if rec is None or rec["status"] not in ("validating", "in_progress"):
            return None
        jobs.lease(batch_id, chunk)
        lines = jobs.lines_of(rec, chunk)
        return rec, lines, jobs.answered(batch_id, [n for n, _ in lines])

    def _end_chunk(self, batch_id: str, chunk: int, lines: list[tuple[int, bytes]]) -> None:
        jobs = self.jobs
        complete = len(jobs.answered(batch_id, [n for n, _ in lines])) == len(lines)
        jobs.chunk_state(batch_id, chunk, b"d" if complete else b"s")
        jobs.maybe_finish(batch_id)

    async def run_line(
        self, rec: dict[str, Any], line: bytes
    ) -> tuple[bool, dict[str, Any] | bytes]:
        """One input line: ``(True, output line)`` for a 2xx answer, else ``(False, error
        line)``; a line is a dict, or its JSON when the answer's JSON went in unparsed."""
        try:
            doc = orjson.loads(line)
        except ValueError:  # orjson.JSONDecodeError is one
            return False, error_entry(None, "invalid_json", "this line is not JSON")
        if not isinstance(doc, dict):
            return False, error_entry(None, "invalid_json", "this line is not a JSON object")
        cid = doc.get("custom_id")
        cid = cid if isinstance(cid, str) else None
        why = _line_problem(doc, rec["endpoint"])
        if why is not None:
            return False, error_entry(cid, "invalid_request", why)
        body = orjson.dumps(doc["body"])
        status, answer = 0, b""
        for attempt in range(self.settings.line_retries + 1):
            if attempt:
                await asyncio.sleep(self.settings.retry_delay_s * 2 ** (attempt - 1))
            try:
                assert self.call is not None
                status, answer = await self.call(
                    "POST", doc["url"], body, rec["_owner"], rec["_models"]
                )
            except Exception as e:  # the handler or what it calls broke: retried, then answered
                logger.warning("batch line %s: %s", cid, type(e).__name__)
                status, answer = 0, b""
            metrics.LINE_CALLS.inc()
            if status not in TRANSIENT and status != 0:
                break
            metrics.RETRIES.inc()
        if status == 0:
            return False, error_entry(cid, "server_error", "the line could not be run")
        ok = 200 <= status < 300
        if isinstance(answer, JsonBytes) and b"\n" not in answer:
            # the handler's JSON as it is: no parse and dump again (a JSONL line has no newline)
            return ok, b"".join(
                (
                    b'{"id":"',
                    _line_id("batch_req_").encode(),
                    b'","custom_id":',
                    json.dumps(cid).encode(),
                    b',"response":{"status_code":%d,"request_id":"' % status,
                    _line_id("req_").encode(),
                    b'","body":',
                    answer,
                    b'},"error":null}',
                )
            )
        try:
            parsed: Any = json.loads(answer)
        except ValueError:
            parsed = answer.decode("utf-8", "replace")
        out = {
            "id": _line_id("batch_req_"),
            "custom_id": cid,
            "response": {"status_code": status, "request_id": _line_id("req_"), "body": parsed},
            "error": None,
        }
        return ok, out

    async def stop(self) -> None:
        self._stopping = True


class _StatusWatch:
    """Whether the batch still runs, read from the store at most every 0.5 s: a cancel or
    expiry stops the chunk's lines that have not started within about that."""

    def __init__(self, jobs: Jobs, batch_id: str) -> None:
        self.jobs, self.batch_id = jobs, batch_id
        self._at, self._running = 0.0, True

    def running(self) -> bool:
        now = time.monotonic()
        if now - self._at > 0.5:
            self._at = now
            rec = self.jobs.record(self.batch_id)
            self._running = rec is not None and rec["status"] in ("validating", "in_progress")
            self._running = self._running and time.time() < rec["expires_at"]  # type: ignore[index]
        return self._running


def _line_id(prefix: str) -> str:
    """An output line's id or request id: unique, not a secret (nothing is reached by it), so
    not from the OS's random source, which cost two system calls per line."""
    return f"{prefix}{random.getrandbits(96):024x}"


def _line_problem(doc: dict[str, Any], endpoint: str) -> str | None:
    """Why a parsed line cannot run in a batch for ``endpoint`` (None: it can)."""
    if not isinstance(doc.get("custom_id"), str):
        return "custom_id: a string is required"
    if doc.get("method", "POST") != "POST":
        return "method must be POST"
    if not endpoint_matches(endpoint, doc.get("url")):
        return f"url {str(doc.get('url'))[:100]!r} is not this batch's endpoint {endpoint}"
    if not isinstance(doc.get("body"), dict):
        return "body: a JSON object is required"
    if doc["body"].get("stream"):
        return "body.stream: batch lines cannot stream"
    return None

"""The router's asyncio micro-batcher.

Concurrent requests for one model version are merged into one ``predict`` call and the results
scattered back. The batch is flushed on the next event-loop tick (``loop.call_soon``), so
everything that arrived during the previous tick rides together, and a request with no traffic
around it never waits. In a trial on this project's 2-core machines a fixed 1.5 ms window lost to
that at every concurrency, and predicting inline in the loop beat handing the batch to a thread
(docs/internals/stack.md); the holds below are not a fixed window: they apply only where they were
seen to pay.

A lone request may wait a little when that is likely to pay. gRPC calls reach the loop one at a
time (grpc.aio hands each call over through its poller thread, several loop turns per call), so
at c=64 the next-tick batch holds ~1.1 rows and a model with a high per-call cost (XGBoost's
``inplace_predict``, 300 trees: ~0.4 ms for 1 row, ~22 us a row in a batch of 32) pays it for
every call. With
``hold_s`` > 0, a flush that finds a single request waits ``hold_s`` for company (a timer;
uvloop's resolution is 1 ms, so shorter holds are no holds). A hold that gathers nobody was
wasted: the batcher then skips the next 1, 2, 4, ... up to ``MAX_BACKOFF`` single-request
flushes before it tries again, so sequential traffic (c=1) is almost never held, while under
load holds keep paying and stay on. A hold ends early once ``max_batch_size`` rows are waiting.

The same hold covers clients coming back. Under load the requests of one batch are answered
together and their clients (closed loop: each waits for its answer) send the next requests within
a round trip, a few at a time: a flush on the next tick would pay a model call for the first few
and another for the rest right after. So a flush that finds fewer than half as many requests as
the previous batch had waits too, until as many as the previous batch are back or ``hold_s``
has passed (measured at c=64: mean batch 14 -> 23 rows and +30 % req/s for the XGBoost model,
10 -> 16 rows for the 8.5 M-parameter MLP). Sequential traffic (batches of one) is never held by
this rule.

The queue is bounded too (load shedding): with ``max_queue`` set, a request arriving while that
many of this batcher's requests are unanswered (waiting or in a model call) fails at once with
:class:`QueueFull` (the routes answer 503 with ``Retry-After``) instead of adding to everyone's
latency; what is admitted is answered within about ``max_queue`` / throughput.

Batches are bounded: requests are packed in arrival order into chunks of at most
``max_batch_size`` rows; a single request larger than that forms a chunk of its own (requests are
never split, so one request's rows always come from one model call).

Metrics (``metrics``, a :class:`services.ops.metrics.BatchMetrics`) are written per batch, not per
request: after every model call its time and each carried request's wait since :meth:`submit`
(one write per histogram bucket hit), after every successful one the rows and requests. Its
decisions are counted too: every flush by its reason (``services.ops.metrics.FLUSH_REASONS``),
every hold's length, and every request shed. The in-flight and queue-depth gauges cost the hot
path nothing: a metrics thread samples :attr:`MicroBatcher.queued` and
:attr:`MicroBatcher.waiting` (``services.ops.metrics.sample_gauges``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np

from services.runtime.errors import Overloaded

if TYPE_CHECKING:
    from services.ops.metrics import BatchMetrics

Rows = Any
"""A request's rows: an array ``[n, ...]``, or a dict of such arrays by input name (a model with
several inputs, or a DataFrame model's columns)."""
Result = Any
"""A model call's answer for a batch: a dict of arrays by output name (a runtime's outputs), or a
tuple of arrays; every array has one row per input row."""
SyncPredict = Callable[[Rows], Result]
AsyncPredict = Callable[[Rows], Awaitable[Result]]
BatchHook = Callable[[int, int], None]

# rows, the request's future, perf_counter() when it was submitted
_Pending = tuple[Rows, "asyncio.Future[Result]", float]

logger = logging.getLogger("servery")

MAX_BACKOFF = 256
"""At most this many single-request flushes are skipped between two holds that gathered nobody
(so at c=1 about 0.4 % of requests wait the hold)."""


class QueueFull(Overloaded):
    """A request found ``max_queue`` requests unanswered in its batcher (load shedding): 503 with
    ``Retry-After`` on REST, UNAVAILABLE on gRPC. Not logged per request."""

    logged = False


class MicroBatcher:
    """Merge concurrent :meth:`submit` calls into batched ``predict`` calls.

    ``predict`` takes a batch of rows (an array, or a dict of arrays by input name: the
    requests' rows concatenated on the first dimension) and returns a dict of arrays (or a tuple)
    with one row per input row; each request gets its slice of every array. With
    ``is_async=False`` it runs inline on the event loop (cheap in-process models); with
    ``is_async=True`` it is awaited in a task (a call to another service), with at most
    ``max_in_flight`` batches outstanding: requests arriving meanwhile wait and leave together
    when a batch returns, so a slow remote model gets full batches instead of a stream of tiny
    ones that queue up behind each other.
    ``on_batch(rows, requests)`` is called after every successful model call; ``metrics``
    records the batch series (see the module docstring).
    """

    def __init__(
        self,
        predict: SyncPredict | AsyncPredict,
        *,
        max_batch_size: int,
        is_async: bool = False,
        max_in_flight: int = 1,
        hold_s: float = 0.0,
        on_batch: BatchHook | None = None,
        max_queue: int | None = None,
        metrics: BatchMetrics | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_queue is not None and max_queue < 1:
            raise ValueError("max_queue must be >= 1 (or None: unbounded)")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if hold_s < 0:
            raise ValueError("hold_s must be >= 0")
        self._predict = predict
        self._max = max_batch_size
        self._is_async = is_async
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._on_batch = on_batch
        self._metrics = metrics
        if metrics is not None:
            metrics.watch(self)
        self.max_queue = max_queue
        self.queued = 0  # requests submitted and not answered yet
        self.shed = 0  # requests refused because the queue was full
        # Remote (async) batchers already gather while a batch is in flight: no holds there.
        self._hold_s = 0.0 if is_async else hold_s
        self._hold: asyncio.TimerHandle | None = None
        self._hold_start = 0.0  # loop time when the current hold began (holds are loop timers)
        self._hold_until = 0  # requests waiting that end the current hold early (0: none)
        self._last_batch = 0  # requests in the previous flush
        self._backoff = 0  # single-request flushes to skip before the next hold
        self._next_backoff = 1
        self.holds = 0
        self.useful_holds = 0
        self._pending: list[_Pending] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.rows = 0
        self.largest_batch = 0

    @property
    def waiting(self) -> int:
        """Requests queued for a model call that has not started yet."""
        return len(self._pending)

    async def submit(self, x: Rows) -> Result:
        """Queue ``x`` (validated rows) for the next flush and wait for its slice of the result.

        Raises :class:`QueueFull` at once when ``max_queue`` requests are unanswered already.
        """
        if self.max_queue is not None and self.queued >= self.max_queue:
            self.shed += 1
            if self._metrics is not None:
                self._metrics.shed()
            raise QueueFull(
                f"overloaded: {self.queued} requests already queued for this model version "
                "(max_queue); retry after the Retry-After seconds"
            )
        self.queued += 1
        try:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[Result] = loop.create_future()
            self._pending.append((x, fut, perf_counter()))
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._flush)
            elif self._hold is not None:
                # Everyone expected is back, or a full batch waits: no reason to hold any longer.
                if sum(n_rows(p[0]) for p in self._pending) >= self._max:
                    self._cut_hold(loop, "full")
                elif 0 < self._hold_until <= len(self._pending):
                    self._cut_hold(loop, "hold_ended")
            return await fut
        finally:
            self.queued -= 1

    def _cut_hold(self, loop: asyncio.AbstractEventLoop, reason: str) -> None:
        self._hold.cancel()  # type: ignore[union-attr]
        self._hold = None
        loop.call_soon(self._end_hold, reason)

    def _hold_for(self, loop: asyncio.AbstractEventLoop) -> None:
        self._hold_start = loop.time()
        self._hold = loop.call_later(self._hold_s, self._end_hold)

    def _end_hold(self, reason: str = "hold_ended") -> None:
        self._hold = None
        self.holds += 1
        if len(self._pending) > 1:
            self.useful_holds += 1
            self._next_backoff = 1
        else:  # nobody came: hold less often while traffic stays sequential
            self._backoff = self._next_backoff
            self._next_backoff = min(2 * self._next_backoff, MAX_BACKOFF)
            reason = "hold_alone"
        if self._metrics is not None:
            try:
                self._metrics.held(asyncio.get_running_loop().time() - self._hold_start)
            except Exception:  # metrics must never fail requests
                logger.exception("micro-batcher metrics failed")
        self._flush(held=True, reason=reason)

    def _chunks(self, pending: list[_Pending]) -> Iterator[list[_Pending]]:
        chunk: list[_Pending] = []
        rows = 0
        for item in pending:
            n = n_rows(item[0])
            if chunk and rows + n > self._max:
                yield chunk
                chunk, rows = [], 0
            chunk.append(item)
            rows += n
        if chunk:
            yield chunk

    def _flush(self, held: bool = False, reason: str = "tick") -> None:
        n = len(self._pending)
        if self._hold_s and not held and n < self._max:
            if 2 * n < self._last_batch:
                # The requests of the last batch were answered and most have not come back yet:
                # in a closed loop they are on their way, so wait for them (until as many as last
                # time are here, at most hold_s) instead of paying a model call for a handful now
                # and another for the rest right after.
                self._hold_until = self._last_batch
                self._hold_for(asyncio.get_running_loop())
                return
            if n == 1:
                if self._backoff:
                    self._backoff -= 1
                else:  # probe: does a lone request find company? (the whole hold_s)
                    self._hold_until = 0
                    self._hold_for(asyncio.get_running_loop())
                    return
        if self._metrics is not None and n:
            try:
                self._metrics.flushed(reason)
            except Exception:  # metrics must never fail requests
                logger.exception("micro-batcher metrics failed")
        self._scheduled = False
        self._last_batch = n
        pending, self._pending = self._pending, []
        chunks = list(self._chunks(pending))
        for n, chunk in enumerate(chunks):
            # A client that went away cancelled its future: do not spend model time on it.
            live = [item for item in chunk if not item[1].done()]
            if not live:
                continue
            if self._is_async:
                if self._in_flight >= self._max_in_flight:
                    # Keep the rest, in order, for when a batch in flight returns.
                    self._pending = [item for c in chunks[n:] for item in c] + self._pending
                    return
                self._in_flight += 1
                task = asyncio.ensure_future(self._run_async(live))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                x = _stack(live)
                start = perf_counter()
                try:
                    result = self._predict(x)
                except Exception as e:
                    self._called(live, start)
                    _fail(live, e)
                    continue
                self._called(live, start)
                self._scatter(live, n_rows(x), result)

    async def _run_async(self, live: list[_Pending]) -> None:
        try:
            x = _stack(live)
            start = perf_counter()
            try:
                result = await self._predict(x)  # type: ignore[misc]
            except Exception as e:
                self._called(live, start)
                _fail(live, e)
                return
            self._called(live, start)
            self._scatter(live, n_rows(x), result)
        finally:
            self._in_flight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _called(self, live: list[_Pending], start: float) -> None:
        """Record a model call that began at ``start`` (failed or not) and its requests' waits."""
        if self._metrics is None:
            return
        try:
            self._metrics.called(perf_counter() - start, [start - item[2] for item in live])
        except Exception:  # metrics must never fail requests
            logger.exception("micro-batcher metrics failed")

    def _scatter(self, live: list[_Pending], total: int, result: Any) -> None:
        """Hand each request its rows of ``result``; fail them all if ``result`` is malformed."""
        try:
            arrays = result.values() if isinstance(result, dict) else result
            for a in arrays:
                if len(a) != total:
                    raise RuntimeError(f"batch size mismatch: {len(a)} results for {total} rows")
        except Exception as e:
            _fail(live, e)
            return
        offset = 0
        if len(live) == 1:
            fut = live[0][1]
            if not fut.done():
                fut.set_result(result)
        else:
            for x, fut, _ in live:
                n = n_rows(x)
                if not fut.done():
                    end = offset + n
                    if isinstance(result, dict):
                        fut.set_result({k: v[offset:end] for k, v in result.items()})
                    else:
                        fut.set_result(tuple(a[offset:end] for a in result))
                offset += n
        self.batches += 1
        self.rows += total
        self.largest_batch = max(self.largest_batch, total)
        if self._metrics is not None:
            try:
                self._metrics.batch(total, len(live))
            except Exception:  # metrics must never fail requests that were answered
                logger.exception("micro-batcher metrics failed")
        if self._on_batch is not None:
            try:
                self._on_batch(total, len(live))
            except Exception:  # metrics must never fail requests that were answered
                logger.exception("micro-batcher on_batch hook failed")


def n_rows(x: Rows) -> int:
    """Rows in a request's (or a batch's) rows."""
    if type(x) is dict:
        return len(next(iter(x.values())))
    return int(x.shape[0])


def _stack(items: list[_Pending]) -> Rows:
    if len(items) == 1:
        return items[0][0]
    first = items[0][0]
    if type(first) is dict:
        return {k: np.concatenate([item[0][k] for item in items]) for k in first}
    return np.concatenate([item[0] for item in items])


def _fail(items: list[_Pending], exc: BaseException) -> None:
    for _, fut, _ in items:
        if not fut.done():
            fut.set_exception(exc)
